// Thin POSIX socket helpers for the TCP transport: an owning fd, connect/listen with timeouts,
// and full reads/writes over iovecs that turn every failure into an absl::Status.
//
// Timeouts are progress timeouts: a socket configured with SetIoTimeout fails a read or write
// that makes no progress for that long (SO_RCVTIMEO / SO_SNDTIMEO), so a stalled peer cannot
// pin a thread, while a slow but moving one is not cut off mid-frame.
#pragma once

#include <sys/uio.h>

#include <cstddef>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cleave::transport {

// Owns one file descriptor; closes it on destruction.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { Reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void Reset();

 private:
  int fd_ = -1;
};

struct HostPort {
  std::string host;
  int port = 0;
};
// "HOST:PORT" or "[V6ADDR]:PORT".
absl::StatusOr<HostPort> ParseHostPort(const std::string& address);

// Connects within timeout_ms; the socket comes back blocking, with TCP_NODELAY set.
absl::StatusOr<UniqueFd> ConnectTcp(const HostPort& peer, int timeout_ms);

// Listens on host:port (port 0 picks one); *bound_port receives the port in use.
absl::StatusOr<UniqueFd> ListenTcp(const HostPort& where, int* bound_port);

// A read or write that makes no progress for timeout_ms fails with DeadlineExceeded.
absl::Status SetIoTimeout(int fd, int timeout_ms);

// Blocks until fd is readable (data, EOF or error); a shutdown() of fd wakes it too.
absl::Status WaitReadable(int fd);

// True when the peer has closed or reset (or sent bytes a quiet peer never sends). Non-blocking.
bool PeerHasHungUp(int fd);

// "HOST:PORT" of the socket's peer, for log lines; "unknown peer" when it cannot be told.
std::string PeerAddress(int fd);

// Reads exactly n bytes. A clean EOF before the first byte is NotFound("closed") when
// eof_ok_at_start, so callers can tell a quiet close between frames from a truncated frame.
absl::Status ReadFull(int fd, void* buf, size_t n, bool eof_ok_at_start = false);

// Reads/writes exactly the bytes the iovecs describe. The array is modified (advanced) in place.
absl::Status ReadFullv(int fd, struct iovec* iov, size_t count);
absl::Status WriteFullv(int fd, struct iovec* iov, size_t count);

// Writes what the socket takes now without blocking; returns the bytes written (possibly 0).
// The array is modified in place.
absl::StatusOr<size_t> WriteSomev(int fd, struct iovec* iov, size_t count);

// Copies the bytes the iovecs describe, from byte `skip` on, to dst.
void CopyIovTail(const struct iovec* iov, size_t count, size_t skip, std::byte* dst);

}  // namespace cleave::transport
