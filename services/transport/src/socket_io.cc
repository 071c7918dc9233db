#include "socket_io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace cleave::transport {
namespace {

// Linux's UIO_MAXIOV: one readv/sendmsg takes at most this many iovecs.
constexpr size_t kMaxIov = 1024;

absl::Status ErrnoStatus(const std::string& what, int err) {
  // SO_RCVTIMEO / SO_SNDTIMEO expiry surfaces as EAGAIN: name it for what it means here.
  if (err == EAGAIN)
    return absl::DeadlineExceededError(
        absl::StrCat(what, ": peer made no progress within the I/O timeout"));
  const std::string msg = absl::StrCat(what, ": ", std::strerror(err));
  switch (err) {
    case ETIMEDOUT:
      return absl::DeadlineExceededError(msg);
    case ECONNREFUSED:
    case ECONNRESET:
    case EPIPE:
    case ENETUNREACH:
    case EHOSTUNREACH:
    case ENOTCONN:
      return absl::UnavailableError(msg);
    default:
      return absl::InternalError(msg);
  }
}

absl::Status SetBlocking(int fd, bool blocking) {
  const int flags = fcntl(fd, F_GETFL, 0);
  if (flags < 0) return ErrnoStatus("fcntl(F_GETFL)", errno);
  const int want = blocking ? (flags & ~O_NONBLOCK) : (flags | O_NONBLOCK);
  if (fcntl(fd, F_SETFL, want) < 0) return ErrnoStatus("fcntl(F_SETFL)", errno);
  return absl::OkStatus();
}

absl::StatusOr<UniqueFd> ConnectOne(const addrinfo* ai, int timeout_ms, const std::string& name) {
  UniqueFd fd(socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
  if (!fd.valid()) return ErrnoStatus("socket", errno);
  if (auto s = SetBlocking(fd.get(), false); !s.ok()) return s;
  if (connect(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
    if (errno != EINPROGRESS) return ErrnoStatus(absl::StrCat("connect to ", name), errno);
    pollfd p{fd.get(), POLLOUT, 0};
    int r;
    do {
      r = poll(&p, 1, timeout_ms);
    } while (r < 0 && errno == EINTR);
    if (r < 0) return ErrnoStatus("poll", errno);
    if (r == 0) {
      return absl::DeadlineExceededError(
          absl::StrCat("connect to ", name, ": no answer within ", timeout_ms, " ms"));
    }
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) err = errno;
    if (err != 0) return ErrnoStatus(absl::StrCat("connect to ", name), err);
  }
  if (auto s = SetBlocking(fd.get(), true); !s.ok()) return s;
  const int one = 1;
  // Frames are written whole; Nagle would only hold back the tail of each one.
  if (setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0) {
    return ErrnoStatus("setsockopt(TCP_NODELAY)", errno);
  }
  return fd;
}

// Skips `n` bytes already transferred at the front of the iovec array.
void Advance(struct iovec*& iov, size_t& count, size_t n) {
  while (count > 0 && n >= iov->iov_len) {
    n -= iov->iov_len;
    ++iov;
    --count;
  }
  if (count > 0 && n > 0) {
    iov->iov_base = static_cast<char*>(iov->iov_base) + n;
    iov->iov_len -= n;
  }
  // Zero-length entries would make the next call transfer nothing and look like EOF.
  while (count > 0 && iov->iov_len == 0) {
    ++iov;
    --count;
  }
}

}  // namespace

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) {
    Reset();
    fd_ = std::exchange(o.fd_, -1);
  }
  return *this;
}

void UniqueFd::Reset() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

absl::StatusOr<HostPort> ParseHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("peer address '", address, "' is not HOST:PORT"));
  }
  HostPort hp;
  hp.host = address.substr(0, colon);
  if (hp.host.size() >= 2 && hp.host.front() == '[' && hp.host.back() == ']') {
    hp.host = hp.host.substr(1, hp.host.size() - 2);
  }
  if (!absl::SimpleAtoi(address.substr(colon + 1), &hp.port) || hp.port <= 0 || hp.port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("peer address '", address, "' has a bad port"));
  }
  return hp;
}

absl::StatusOr<UniqueFd> ConnectTcp(const HostPort& peer, int timeout_ms) {
  const std::string name = absl::StrCat(peer.host, ":", peer.port);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(peer.host.c_str(), std::to_string(peer.port).c_str(), &hints, &res);
  if (rc != 0) {
    return absl::UnavailableError(absl::StrCat("resolve ", name, ": ", gai_strerror(rc)));
  }
  absl::Status last = absl::UnavailableError(absl::StrCat("no address for ", name));
  for (const addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
    auto fd = ConnectOne(ai, timeout_ms, name);
    if (fd.ok()) {
      freeaddrinfo(res);
      return fd;
    }
    last = fd.status();
  }
  freeaddrinfo(res);
  return last;
}

absl::StatusOr<UniqueFd> ListenTcp(const HostPort& where, int* bound_port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  const int rc = getaddrinfo(where.host.empty() ? nullptr : where.host.c_str(),
                             std::to_string(where.port).c_str(), &hints, &res);
  if (rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("listen host '", where.host, "': ", gai_strerror(rc)));
  }
  UniqueFd fd(socket(res->ai_family, res->ai_socktype | SOCK_CLOEXEC, res->ai_protocol));
  if (!fd.valid()) {
    freeaddrinfo(res);
    return ErrnoStatus("socket", errno);
  }
  const int one = 1;
  setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  const int bound = bind(fd.get(), res->ai_addr, res->ai_addrlen);
  const int bind_errno = errno;
  freeaddrinfo(res);
  if (bound != 0) {
    return ErrnoStatus(absl::StrCat("bind ", where.host, ":", where.port), bind_errno);
  }
  if (listen(fd.get(), 64) != 0) return ErrnoStatus("listen", errno);
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return ErrnoStatus("getsockname", errno);
  }
  *bound_port = addr.ss_family == AF_INET6
                    ? ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port)
                    : ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
  return fd;
}

absl::Status SetIoTimeout(int fd, int timeout_ms) {
  timeval tv{};
  tv.tv_sec = timeout_ms / 1000;
  tv.tv_usec = (timeout_ms % 1000) * 1000;
  if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0 ||
      setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0) {
    return ErrnoStatus("setsockopt(SO_RCVTIMEO/SO_SNDTIMEO)", errno);
  }
  return absl::OkStatus();
}

absl::Status WaitReadable(int fd) {
  pollfd p{fd, POLLIN, 0};
  while (poll(&p, 1, -1) < 0) {
    if (errno != EINTR) return ErrnoStatus("poll", errno);
  }
  return absl::OkStatus();
}

bool PeerHasHungUp(int fd) {
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  return poll(&p, 1, 0) > 0 && p.revents != 0;
}

std::string PeerAddress(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof(addr);
  if (getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) return "unknown peer";
  char host[INET6_ADDRSTRLEN] = {};
  if (addr.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&addr);
    if (inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host)) == nullptr) return "unknown peer";
    return absl::StrCat("[", host, "]:", ntohs(a->sin6_port));
  }
  if (addr.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&addr);
    if (inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host)) == nullptr) return "unknown peer";
    return absl::StrCat(host, ":", ntohs(a->sin_port));
  }
  return "unknown peer";
}

absl::Status ReadFull(int fd, void* buf, size_t n, bool eof_ok_at_start) {
  char* p = static_cast<char*>(buf);
  size_t got = 0;
  while (got < n) {
    const ssize_t r = recv(fd, p + got, n - got, 0);
    if (r > 0) {
      got += static_cast<size_t>(r);
    } else if (r == 0) {
      if (got == 0 && eof_ok_at_start) return absl::NotFoundError("closed");
      return absl::UnavailableError("peer closed the connection mid-frame");
    } else if (errno != EINTR) {
      return ErrnoStatus("recv", errno);
    }
  }
  return absl::OkStatus();
}

absl::Status ReadFullv(int fd, struct iovec* iov, size_t count) {
  Advance(iov, count, 0);
  while (count > 0) {
    const ssize_t r = readv(fd, iov, static_cast<int>(std::min(count, kMaxIov)));
    if (r > 0) {
      Advance(iov, count, static_cast<size_t>(r));
    } else if (r == 0) {
      return absl::UnavailableError("peer closed the connection mid-frame");
    } else if (errno != EINTR) {
      return ErrnoStatus("readv", errno);
    }
  }
  return absl::OkStatus();
}

absl::Status WriteFullv(int fd, struct iovec* iov, size_t count) {
  Advance(iov, count, 0);
  while (count > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min(count, kMaxIov);
    // MSG_NOSIGNAL: a peer that went away is an error status, not a SIGPIPE for the process.
    const ssize_t r = sendmsg(fd, &msg, MSG_NOSIGNAL);
    if (r >= 0) {
      Advance(iov, count, static_cast<size_t>(r));
    } else if (errno != EINTR) {
      return ErrnoStatus("send", errno);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> WriteSomev(int fd, struct iovec* iov, size_t count) {
  size_t total = 0;
  Advance(iov, count, 0);
  while (count > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = std::min(count, kMaxIov);
    const ssize_t r = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r >= 0) {
      total += static_cast<size_t>(r);
      Advance(iov, count, static_cast<size_t>(r));
    } else if (errno == EAGAIN) {
      break;  // the socket buffer is full: the caller queues the rest
    } else if (errno != EINTR) {
      return ErrnoStatus("send", errno);
    }
  }
  return total;
}

void CopyIovTail(const struct iovec* iov, size_t count, size_t skip, std::byte* dst) {
  for (size_t i = 0; i < count; ++i) {
    const size_t len = iov[i].iov_len;
    if (skip >= len) {
      skip -= len;
      continue;
    }
    std::memcpy(dst, static_cast<const char*>(iov[i].iov_base) + skip, len - skip);
    dst += len - skip;
    skip = 0;
  }
}

}  // namespace cleave::transport
