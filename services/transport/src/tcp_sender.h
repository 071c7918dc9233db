// The sending end of the TCP backend: one TcpPeerLink per peer address, created on first use.
//
// A link owns one connection (dialled lazily, re-dialled after a failure), a bounded queue of
// encoded frames and a writer thread that batches queued frames into sendmsg() calls.
// SendLayer / SendState on an idle link (nothing queued, nobody writing) hand the caller's
// memory to the kernel itself with a non-blocking sendmsg and copy into a queued frame only what
// the socket buffer did not take; otherwise they copy the whole frame into the queue. Either way
// the caller's memory is free when they return, and one copy is saved whenever the link keeps
// up. One thread at a time writes the socket (writing_), so frames never interleave, and LAYER
// and STATE frames of one link go out in the order they were sent.
//
// Connection states (the link's mutex guards them):
//
//   kDisconnected ──Send*/Finish──────> kConnecting ──dial + handshake ok──> kConnected
//        ^                                   │ fails: caller gets the error        │
//        └───────────────────────────────────┘                                     │
//        └──── a write fails / the peer hangs up: queued frames and every open ────┘
//              transfer of this peer fail with that error
//
// GPU schemes (payload_path.h): a link made with a SendPayloadPath opens that path's channel on
// each new connection (after the Hello) and sends LAYER / STATE frames through it, one at a
// time and synchronously: the frame waits until nothing is queued or being written, takes the
// socket (writing_), and returns once the channel says the source may be reused. FINISH frames
// still go through the queue and the writer. A channel's frame failure that leaves the stream
// in step (the receiver refused it) fails only that transfer; any other fails the connection.
//
// A transfer is "open" on a link from its first SendLayer / SendState until its Finish. Once the
// connection carrying it fails it stays failed: later sends return the error without re-dialling
// and Finish reports it, because the receiver has already dropped what it had of the transfer.
#pragma once

#include <array>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "cleave/transport/kv_transport.h"
#include "frame.h"
#include "payload_path.h"
#include "socket_io.h"
#include "transfer_tracker.h"

namespace cleave::transport {

class TcpPeerLink {
 public:
  // `payload`: null for plain TCP; else the GPU scheme whose channel moves the payload.
  TcpPeerLink(HostPort peer, const TransportOptions& options,
              std::unique_ptr<SendPayloadPath> payload = nullptr);
  // Fails what is still queued with Cancelled; callers must not be inside SendLayer/Finish.
  ~TcpPeerLink();
  TcpPeerLink(const TcpPeerLink&) = delete;
  TcpPeerLink& operator=(const TcpPeerLink&) = delete;

  // Thread-safe. Block while the queue is full, up to io_timeout_ms.
  absl::Status SendLayer(const KvLayerSend& layer);
  absl::Status SendState(const KvStateSend& state);
  // Thread-safe. `done` runs on the writer thread once the FINISH frame is written, or on the
  // calling thread when the transfer had already failed or the peer cannot be reached.
  void Finish(TransferKey key, DoneCallback done);

 private:
  enum class State { kDisconnected, kConnecting, kConnected };
  struct OutFrame {
    std::array<std::byte, wire::kFrameHeaderBytes> header{};
    size_t header_bytes = wire::kFrameHeaderBytes;  // 0: body holds the tail of a direct write
    std::unique_ptr<std::byte[]> body;              // after the header: ids (LAYER), payload
    size_t body_bytes = 0;
    size_t body_capacity = 0;
    DoneCallback done;  // FINISH
    size_t bytes() const { return header_bytes + body_bytes; }
  };
  using Completion = std::pair<DoneCallback, absl::Status>;

  absl::Status EnsureConnectedLocked(std::unique_lock<std::mutex>& lock);
  absl::Status Send(FrameSource& frame);
  absl::Status SendDirectLocked(std::unique_lock<std::mutex>& lock, FrameSource& frame);
  absl::Status SendQueuedLocked(std::unique_lock<std::mutex>& lock, FrameSource& frame);
  absl::Status SendThroughChannelLocked(std::unique_lock<std::mutex>& lock, FrameSource& frame);
  absl::StatusOr<UniqueFd> Dial() const;  // connect + geometry handshake
  void WriterLoop();
  void FailConnectionLocked(uint64_t generation, const absl::Status& why,
                            std::vector<Completion>& completions);
  absl::Status PeerError(const absl::Status& s) const;
  OutFrame NewFrameLocked(size_t body_bytes);
  void RecycleLocked(OutFrame& frame);

  const HostPort peer_;
  const std::string name_;  // "HOST:PORT", for messages
  const TransportOptions options_;
  const size_t pool_cap_bytes_;  // frame bodies kept for reuse, so steady traffic does not mmap
  const std::unique_ptr<SendPayloadPath> payload_;  // before channel_: it outlives channels

  std::mutex mu_;
  std::condition_variable cv_;  // state, queue and space changes; few waiters, so notify_all
  bool stop_ = false;
  State state_ = State::kDisconnected;
  uint64_t generation_ = 0;  // bumped on every connect and every failure
  uint64_t dial_attempts_ = 0;
  absl::Status last_dial_error_;
  absl::Status last_failure_;  // what ended the last connection
  UniqueFd fd_;
  std::unique_ptr<SendPayloadChannel> channel_;  // GPU schemes: this connection's; writing_ uses it
  bool writing_ = false;  // a thread (writer or direct SendLayer) owns fd_ for writing
  std::deque<OutFrame> queue_;
  size_t held_bytes_ = 0;  // queued + being written + reserved by SendLayers still copying
  absl::flat_hash_map<TransferKey, absl::Status> open_;
  std::vector<OutFrame> pool_;
  size_t pool_bytes_ = 0;
  std::thread writer_;
};

// Every TCP peer of one KvSender.
class TcpSender {
 public:
  explicit TcpSender(const TransportOptions& options) : options_(options) {}
  absl::Status SendLayer(const std::string& peer, const KvLayerSend& layer);
  absl::Status SendState(const std::string& peer, const KvStateSend& state);
  void Finish(const std::string& peer, TransferKey key, DoneCallback done);

 private:
  absl::StatusOr<TcpPeerLink*> Link(const std::string& peer);

  const TransportOptions options_;
  std::mutex mu_;
  // Links are never dropped: a deployment has a handful of peers, and a link re-dials itself.
  absl::flat_hash_map<std::string, std::unique_ptr<TcpPeerLink>> links_;
};

}  // namespace cleave::transport
