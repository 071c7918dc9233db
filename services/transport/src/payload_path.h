// The seam between the TCP link (connection, authentication, Hello, frame headers, the
// receiver's checks) and the way a frame's payload bytes travel. Plain TCP ("HOST:PORT") keeps
// its payload on the socket and uses none of this; the GPU schemes plug a payload path into
// the same TcpPeerLink / TcpReceiver:
//
//   nccl://HOST:PORT      payload over a 2-rank NCCL communicator made per connection
//   cuda-ipc://HOST:PORT  the receiver pulls the payload from the sender's exported device
//                         memory (two processes on one machine)
//
// A path is made once per link (sender) or receiver; a channel once per connection, right
// after the Hello / HelloAck, and dropped with the connection. Channel calls are made by one
// thread at a time: the sender's writing_ holder, the receiver's connection thread.
// Without CUDA (CLEAVE_WITH_CUDA unset) the factories fail with FailedPrecondition.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/transport/kv_transport.h"
#include "frame.h"
#include "transfer_tracker.h"

namespace cleave::transport {

enum class PayloadScheme { kTcp, kNccl, kCudaIpc };

// "nccl://h:p" -> {kNccl, "h:p"}; an address without a known scheme is TCP.
struct SchemeAddress {
  PayloadScheme scheme = PayloadScheme::kTcp;
  std::string_view host_port;
};
SchemeAddress SplitScheme(std::string_view address);
// "" / "nccl://" / "cuda-ipc://": what address() puts before HOST:PORT.
const char* SchemePrefix(PayloadScheme scheme);
// CreateKvReceiver's listen spec: "tcp", "nccl", "cuda-ipc"; nullopt for anything else.
std::optional<PayloadScheme> ListenScheme(std::string_view listen);

// One LAYER or STATE frame as the caller's memory describes it: the encoded header (and a LAYER
// frame's block ids), then the payload parts, still in the caller's buffers, in wire order
// (host memory for TCP, device memory for the GPU schemes).
struct FrameSource {
  TransferKey key;
  std::vector<std::byte> head;
  std::vector<iovec> payload;
  size_t payload_bytes = 0;
  size_t bytes() const { return head.size() + payload_bytes; }
};

// What one frame's exchange came to. connection_ok false: the connection is out of step (or
// its peer gone) and must be dropped, failing every transfer it carries; true with an error:
// only this frame's transfer failed (e.g. the receiver refused it).
struct PayloadResult {
  absl::Status status;
  bool connection_ok = true;
};

class SendPayloadChannel {
 public:
  virtual ~SendPayloadChannel() = default;
  // Writes `frame`'s head and whatever the scheme puts on the socket, moves the payload, and
  // returns once the source memory may be reused (the KvSender contract).
  virtual PayloadResult Send(int fd, const FrameSource& frame) = 0;
};

class SendPayloadPath {
 public:
  virtual ~SendPayloadPath() = default;
  virtual const char* prefix() const = 0;
  // On a connection whose Hello was accepted: the GPU setup exchange (frame.h). The channel
  // may keep a pointer to this path, which outlives it.
  virtual absl::StatusOr<std::unique_ptr<SendPayloadChannel>> Open(int fd) = 0;
};

class RecvPayloadChannel {
 public:
  virtual ~RecvPayloadChannel() = default;
  // Reads what the scheme puts on the socket after a frame's ids for `parts` payload parts,
  // before the frame is judged (so a refused frame leaves the stream in step).
  virtual absl::Status ReadControl(int fd, size_t parts) = 0;
  // Moves the frame's payload parts into parts[i].iov_base when `verdict` is kWrite (device
  // memory, checked by the caller), otherwise consumes and drops them; answers the sender as
  // the scheme requires. Returns once the bytes have landed (or failed).
  virtual PayloadResult Land(int fd, const wire::FrameHeader& header,
                             std::span<const iovec> parts, TransferTracker::Verdict verdict) = 0;
};

class RecvPayloadPath {
 public:
  virtual ~RecvPayloadPath() = default;
  virtual const char* prefix() const = 0;
  // On an accepted connection whose Hello was accepted: reads the GPU setup and answers it.
  virtual absl::StatusOr<std::unique_ptr<RecvPayloadChannel>> Accept(int fd) = 0;
};

// Whether this build has the GPU schemes.
bool GpuPayloadPathsBuilt();
// scheme is kNccl or kCudaIpc. Sender: options.cuda_device names the source memory's device.
absl::StatusOr<std::unique_ptr<SendPayloadPath>> MakeSendPayloadPath(
    PayloadScheme scheme, const TransportOptions& options);
// Receiver: the store's memory must be device memory (store.cuda_device() >= 0).
absl::StatusOr<std::unique_ptr<RecvPayloadPath>> MakeRecvPayloadPath(
    PayloadScheme scheme, const TransportOptions& options, KvBlockStore& store);

}  // namespace cleave::transport
