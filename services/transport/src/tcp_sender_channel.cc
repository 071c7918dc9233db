// TcpPeerLink's frame path for the GPU schemes (payload_path.h): a LAYER / STATE frame goes
// through the connection's payload channel, synchronously and alone on the socket. Apart from
// tcp_sender.cc (whose queue, writer and connection states it shares) to keep that file short.
#include <chrono>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tcp_sender.h"

namespace cleave::transport {

absl::Status TcpPeerLink::SendThroughChannelLocked(std::unique_lock<std::mutex>& lock,
                                                   FrameSource& frame) {
  const TransferKey key = frame.key;
  const uint64_t gen = generation_;
  // The exchange is synchronous and owns the socket: queued FINISH frames (sent before this
  // frame) go first, and nothing interleaves with the channel's own reads and writes.
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.io_timeout_ms);
  const bool turn = cv_.wait_until(lock, deadline, [&] {
    return stop_ || generation_ != gen || (queue_.empty() && !writing_);
  });
  if (stop_) return absl::CancelledError("kv sender shutting down");
  if (generation_ != gen) return open_.try_emplace(key, last_failure_).first->second;
  if (!turn) {
    const absl::Status st = PeerError(absl::DeadlineExceededError(
        absl::StrCat("connection busy for ", options_.io_timeout_ms, " ms")));
    open_[key] = st;
    return st;
  }
  writing_ = true;
  open_.try_emplace(key, absl::OkStatus());
  SendPayloadChannel* channel = channel_.get();
  const int fd = fd_.get();
  lock.unlock();

  PayloadResult r = PeerHasHungUp(fd)
                        ? PayloadResult{absl::UnavailableError("receiver closed the connection"),
                                        false}
                        : channel->Send(fd, frame);

  lock.lock();
  writing_ = false;
  std::vector<Completion> completions;
  if (!r.status.ok()) r.status = PeerError(r.status);
  if (!r.connection_ok) {
    FailConnectionLocked(gen, r.status, completions);
  } else if (!r.status.ok()) {
    open_[key] = r.status;  // this transfer only: the receiver dropped what it had of it
  }
  cv_.notify_all();
  lock.unlock();
  for (auto& [done, status] : completions) done(status);
  return r.status;
}

}  // namespace cleave::transport
