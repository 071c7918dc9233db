// The receiving end of the TCP backend: one listening socket and one thread per accepted
// connection (a receiver has few peers: the prefill workers that feed it).
//
// Each connection starts with authentication when the receiver has a cluster secret (auth.h:
// a peer that skips or fails it is closed before a frame is read), then the geometry handshake
// (frame.h), then reads frames one at a time. A LAYER frame's header and block ids (a STATE
// frame's header) are checked (CheckLayerFraming / CheckStateFraming, then the
// TransferTracker's agreement) before a byte of payload is read; accepted payloads are recv()'d
// straight into the store's blocks (state slots), everything else is drained through a 64 KiB
// scratch buffer.
//
//   framing broken (magic, lengths, type) -> fail the named transfer, close the connection
//   agreement broken (layer, layer kind,  -> fail that transfer, drain its payload, carry on
//     block id, state slot)
//   not expected (never / Forget()ed)     -> drain silently, carry on
//   connection ends with open transfers   -> fail each of them
//
// Connections are refused beyond kMaxConnections so a port scan cannot exhaust threads.
#pragma once

#include <atomic>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "cleave/transport/kv_transport.h"
#include "layer_checks.h"
#include "socket_io.h"
#include "transfer_tracker.h"

namespace cleave::transport {

class TcpReceiver final : public KvReceiver {
 public:
  static constexpr int kMaxConnections = 128;

  static absl::StatusOr<std::unique_ptr<KvReceiver>> Create(const TransportOptions& options,
                                                            KvBlockStore& store,
                                                            ReceiverCallbacks callbacks);
  // Stops accepting, shuts every connection down and joins its thread. No callback runs once
  // the destructor has started.
  ~TcpReceiver() override;

  std::string address() const override { return address_; }
  void Expect(uint64_t request_id, uint32_t attempt, std::vector<int32_t> blocks,
              int state_slot) override;
  void Forget(uint64_t request_id, uint32_t attempt) override;
  void ForgetAll() override;

 private:
  struct Connection {
    UniqueFd fd;
    std::thread thread;
    std::atomic<bool> finished{false};
  };

  TcpReceiver(const TransportOptions& options, KvBlockStore& store, ReceiverCallbacks callbacks);
  void AcceptLoop();
  void ReapFinishedLocked();
  void Wake();

  const TransportOptions options_;
  KvBlockStore& store_;
  TransferTracker tracker_;
  std::string address_;
  UniqueFd listen_fd_;
  UniqueFd wake_fd_;  // eventfd: stop, or a connection finished and can be reaped

  std::mutex mu_;
  bool stopping_ = false;
  std::list<std::unique_ptr<Connection>> connections_;
  std::thread accept_thread_;
};

}  // namespace cleave::transport
