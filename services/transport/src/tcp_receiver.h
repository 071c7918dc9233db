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
// GPU schemes (payload_path.h): a receiver made with a RecvPayloadPath accepts that path's
// setup on each connection after the Hello, and lands LAYER / STATE payloads through the
// connection's channel instead of recv(): the frame is judged exactly as above first, and a
// frame that is not written is still consumed (into scratch, or by answering it) so the stream
// stays in step. A channel failure that leaves the stream out of step closes the connection.
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
#include "payload_path.h"
#include "socket_io.h"
#include "transfer_tracker.h"

namespace cleave::transport {

class TcpReceiver final : public KvReceiver {
 public:
  static constexpr int kMaxConnections = 128;

  // `payload`: null for plain TCP; else the GPU scheme (address() then carries its prefix).
  static absl::StatusOr<std::unique_ptr<KvReceiver>> Create(
      const TransportOptions& options, KvBlockStore& store, ReceiverCallbacks callbacks,
      std::unique_ptr<RecvPayloadPath> payload = nullptr);
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

  TcpReceiver(const TransportOptions& options, KvBlockStore& store, ReceiverCallbacks callbacks,
              std::unique_ptr<RecvPayloadPath> payload);
  void AcceptLoop();
  void ReapFinishedLocked();
  void Wake();

  const TransportOptions options_;
  KvBlockStore& store_;
  TransferTracker tracker_;
  const std::unique_ptr<RecvPayloadPath> payload_;  // outlives every connection thread
  std::string address_;
  UniqueFd listen_fd_;
  UniqueFd wake_fd_;  // eventfd: stop, or a connection finished and can be reaped

  std::mutex mu_;
  bool stopping_ = false;
  std::list<std::unique_ptr<Connection>> connections_;
  std::thread accept_thread_;
};

}  // namespace cleave::transport
