// The FFN side of the activation transport: one listening socket, one thread per attention
// worker's connection. A connection is authenticated (when a secret is set) and its HELLO checked
// before any call is read; each CALL header is checked field by field before a byte of payload
// is read or a buffer sized, so a peer can make us allocate no more than the configured geometry
// allows. Any framing violation closes that connection only.
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "activation_wire.h"
#include "auth.h"
#include "cleave/common/logging.h"
#include "cleave/common/status.h"
#include "cleave/transport/activation.h"
#include "socket_io.h"

namespace cleave::transport {
namespace {

using Clock = std::chrono::steady_clock;

// A port scan or a misconfigured fleet must not exhaust threads.
constexpr size_t kMaxConnections = 128;

// Serves one accepted connection: auth, HELLO, then calls until it closes or breaks the framing.
class CallServer {
 public:
  CallServer(int fd, const ActivationOptions& options, const FfnHandler& handler,
             std::atomic<uint64_t>& answered)
      : fd_(fd), options_(options), handler_(handler), answered_(answered) {}

  // NotFound when the peer closed cleanly between calls; otherwise why the connection ended.
  absl::Status Run() {
    CLEAVE_RETURN_IF_ERROR(Handshake());
    return ServeCalls();
  }

 private:
  absl::Status Handshake() {
    CLEAVE_RETURN_IF_ERROR(SetIoTimeout(fd_, options_.io_timeout_ms));
    afd_wire::Header buf{};
    CLEAVE_RETURN_IF_ERROR(Authenticate(buf));
    const afd_wire::Hello hello = afd_wire::DecodeHello(buf.data());
    // Not one of ours: say nothing, in case it is something that would misread a reply.
    if (hello.magic != afd_wire::kHelloMagic) return absl::InvalidArgumentError("bad hello magic");
    afd_wire::Hello ack;
    ack.magic = afd_wire::kAckMagic;
    ack.hidden = static_cast<uint32_t>(options_.hidden_size);
    ack.num_layers = static_cast<uint32_t>(options_.num_layers);
    ack.max_rows = static_cast<uint32_t>(options_.max_rows);
    const bool same = hello.version == afd_wire::kVersion && hello.hidden == ack.hidden &&
                      hello.num_layers == ack.num_layers;
    if (!same) ack.status = static_cast<uint16_t>(afd_wire::HelloStatus::kGeometryMismatch);
    afd_wire::Header out = afd_wire::EncodeHello(ack);
    iovec iov{out.data(), out.size()};
    CLEAVE_RETURN_IF_ERROR(WriteFullv(fd_, &iov, 1));
    if (!same) {
      return absl::FailedPreconditionError(absl::StrCat(
          "refused attention worker: version ", hello.version, ", hidden ", hello.hidden, ", ",
          hello.num_layers, " layers; this FFN worker has version ", afd_wire::kVersion,
          ", hidden ", ack.hidden, ", ", ack.num_layers, " layers"));
    }
    return absl::OkStatus();
  }

  // Leaves the peer's HELLO in `buf` once it has proven it holds the secret; without a secret,
  // only a peer that does not ask to authenticate gets that far (auth.h). An auth message is
  // longer than a HELLO, so the first kHeaderBytes are a prefix of either.
  absl::Status Authenticate(afd_wire::Header& buf) {
    static_assert(afd_wire::kHeaderBytes <= auth::kMessageBytes);
    const bool required = !options_.secret.empty();
    auth::Nonce nr{};
    // Challenge at once: a peer without a secret then reads it where it expects its ACK, and
    // can tell its operator why it stops.
    if (required) CLEAVE_RETURN_IF_ERROR(auth::SendChallenge(fd_, nr));
    if (absl::Status s = ReadFull(fd_, buf.data(), buf.size()); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("waiting for the peer's hello: ", s.message()));
    }
    if (wire::GetU32(buf.data()) == auth::kAuthMagic) {
      if (!required) return auth::RefuseAuthentication(fd_, buf.data(), buf.size());
      CLEAVE_RETURN_IF_ERROR(
          auth::AuthenticateSender(fd_, options_.secret, nr, buf.data(), buf.size()));
      return ReadFull(fd_, buf.data(), buf.size());
    }
    if (!required) return absl::OkStatus();
    return absl::UnauthenticatedError(
        "authentication: peer did not authenticate (this FFN worker requires the cluster secret)");
  }

  absl::Status ServeCalls() {
    for (;;) {
      // An idle connection may wait forever (between batches); a call, once started, must keep
      // moving (SO_RCVTIMEO).
      CLEAVE_RETURN_IF_ERROR(WaitReadable(fd_));
      afd_wire::Header buf{};
      CLEAVE_RETURN_IF_ERROR(ReadFull(fd_, buf.data(), buf.size(), /*eof_ok_at_start=*/true));
      const afd_wire::Call call = afd_wire::DecodeCall(buf.data());
      CLEAVE_RETURN_IF_ERROR(CheckCall(call));
      CLEAVE_RETURN_IF_ERROR(ServeCall(call));
    }
  }

  // Every field, before anything is sized from it.
  absl::Status CheckCall(const afd_wire::Call& c) const {
    auto bad = [](auto... why) { return absl::InvalidArgumentError(absl::StrCat(why...)); };
    if (c.magic != afd_wire::kCallMagic) return bad("bad call magic 0x", absl::Hex(c.magic));
    if (c.reserved != 0) return bad("call ", c.ticket, ": reserved header field set");
    const bool dense = c.op == static_cast<uint16_t>(FfnOp::kDense);
    if (!dense && c.op != static_cast<uint16_t>(FfnOp::kExperts)) {
      return bad("call ", c.ticket, ": unknown op ", c.op);
    }
    if (c.hidden != static_cast<uint32_t>(options_.hidden_size)) {
      return bad("call ", c.ticket, ": hidden ", c.hidden, ", the connection's is ",
                 options_.hidden_size);
    }
    if (c.layer >= static_cast<uint32_t>(options_.num_layers)) {
      return bad("call ", c.ticket, ": layer ", c.layer, " out of range [0, ", options_.num_layers,
                 ")");
    }
    if (c.rows == 0 || c.rows > static_cast<uint32_t>(options_.max_rows)) {
      return bad("call ", c.ticket, ": ", c.rows, " rows, allowed 1..", options_.max_rows);
    }
    if (dense && c.assigns != 0) {
      return bad("call ", c.ticket, ": dense call with ", c.assigns, " assignments");
    }
    if (!dense && (c.assigns == 0 || c.assigns > uint64_t{c.rows} * afd_wire::kMaxAssignsPerRow)) {
      return bad("call ", c.ticket, ": expert call with ", c.assigns, " assignments for ", c.rows,
                 " rows, allowed 1..", uint64_t{c.rows} * afd_wire::kMaxAssignsPerRow);
    }
    return absl::OkStatus();
  }

  absl::Status ServeCall(const afd_wire::Call& c) {
    const size_t hidden = c.hidden;
    const bool dense = c.op == static_cast<uint16_t>(FfnOp::kDense);
    rows_.resize(size_t{c.rows} * hidden);
    assign_rows_.resize(c.assigns);
    assign_experts_.resize(c.assigns);
    iovec iov[3] = {{rows_.data(), rows_.size() * sizeof(float)},
                    {assign_rows_.data(), assign_rows_.size() * sizeof(int32_t)},
                    {assign_experts_.data(), assign_experts_.size() * sizeof(int32_t)}};
    if (absl::Status s = ReadFullv(fd_, iov, 3); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("call ", c.ticket, ": payload: ", s.message()));
    }
    for (size_t i = 0; i < assign_rows_.size(); ++i) {
      if (assign_rows_[i] < 0 || static_cast<uint32_t>(assign_rows_[i]) >= c.rows) {
        return absl::InvalidArgumentError(absl::StrCat(
            "call ", c.ticket, ": assignment ", i, " names row ", assign_rows_[i], " of ", c.rows));
      }
    }
    const uint32_t out_rows = dense ? c.rows : c.assigns;
    out_.resize(size_t{out_rows} * hidden);
    FfnRequest request;
    request.op = static_cast<FfnOp>(c.op);
    request.layer = static_cast<int>(c.layer);
    request.num_rows = static_cast<int>(c.rows);
    request.rows = rows_;
    request.assign_rows = assign_rows_;
    request.assign_experts = assign_experts_;

    const Clock::time_point start = Clock::now();
    const absl::Status st = handler_(request, std::span<float>(out_));
    const int64_t us =
        std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start).count();

    afd_wire::Answer a;
    a.ticket = c.ticket;
    a.hidden = c.hidden;
    a.compute_us =
        static_cast<uint32_t>(std::clamp<int64_t>(us, 0, std::numeric_limits<uint32_t>::max()));
    std::string message;
    iovec out[2];
    size_t n_iov = 1;
    if (st.ok()) {
      a.out_rows = out_rows;
      out[1] = {out_.data(), out_.size() * sizeof(float)};
      n_iov = 2;
    } else {
      a.status = static_cast<uint16_t>(afd_wire::AnswerStatus::kError);
      message =
          st.message().empty() ? absl::StatusCodeToString(st.code()) : std::string(st.message());
      if (message.size() > afd_wire::kMaxMessageBytes) {
        size_t cut = afd_wire::kMaxMessageBytes;
        // Back off to a UTF-8 character boundary so the text stays valid.
        while (cut > 0 && (static_cast<unsigned char>(message[cut]) & 0xC0) == 0x80) --cut;
        message.resize(cut);
      }
      a.message_bytes = static_cast<uint32_t>(message.size());
      if (!message.empty()) {
        out[1] = {message.data(), message.size()};
        n_iov = 2;
      }
    }
    afd_wire::Header head = afd_wire::EncodeAnswer(a);
    out[0] = {head.data(), head.size()};
    if (absl::Status s = WriteFullv(fd_, out, n_iov); !s.ok()) {
      return absl::Status(s.code(), absl::StrCat("call ", c.ticket, ": answer: ", s.message()));
    }
    answered_.fetch_add(1, std::memory_order_relaxed);
    return absl::OkStatus();
  }

  const int fd_;
  const ActivationOptions& options_;  // the server's; it outlives every connection
  const FfnHandler& handler_;
  std::atomic<uint64_t>& answered_;
  // Reused across calls: sized by the checked header, so bounded by max_rows and hidden.
  std::vector<float> rows_;
  std::vector<int32_t> assign_rows_;
  std::vector<int32_t> assign_experts_;
  std::vector<float> out_;
};

class FfnServerImpl final : public FfnServer {
 public:
  FfnServerImpl(const ActivationOptions& options, FfnHandler handler)
      : options_(options), handler_(std::move(handler)) {}
  ~FfnServerImpl() override { Stop(); }

  absl::Status Listen() {
    int port = 0;
    CLEAVE_ASSIGN_OR_RETURN(listen_fd_,
                            ListenTcp({options_.listen_host, options_.listen_port}, &port));
    const std::string& host =
        options_.advertise_host.empty() ? options_.listen_host : options_.advertise_host;
    address_ = host.find(':') != std::string::npos && host.front() != '['
                   ? absl::StrCat("[", host, "]:", port)
                   : absl::StrCat(host, ":", port);
    accept_thread_ = std::thread([this] { AcceptLoop(); });
    return absl::OkStatus();
  }

  std::string address() const override { return address_; }
  int num_connections() const override { return live_.load(); }
  uint64_t calls_answered() const override { return answered_.load(); }

  void Stop() override {
    std::lock_guard stop_lock(stop_mu_);  // a second, concurrent Stop returns once all is joined
    {
      std::lock_guard lock(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    stop_cv_.notify_all();
    // shutdown() of a listening socket fails the blocked accept() (EINVAL), and every later one.
    if (listen_fd_.valid()) shutdown(listen_fd_.get(), SHUT_RDWR);
    if (accept_thread_.joinable()) accept_thread_.join();
    // Nothing adds connections now. shutdown() wakes each thread's poll/recv/send without
    // freeing its fd (which is closed only after the join). A thread inside the handler is
    // waited for.
    std::list<std::unique_ptr<Connection>> connections;
    {
      std::lock_guard lock(mu_);
      for (auto& c : connections_) shutdown(c->fd.get(), SHUT_RDWR);
      connections.swap(connections_);
    }
    for (auto& c : connections) c->thread.join();
    listen_fd_.Reset();
  }

 private:
  struct Connection {
    UniqueFd fd;
    std::thread thread;
    bool finished = false;  // guarded by mu_
  };

  void AcceptLoop() {
    for (;;) {
      UniqueFd fd(accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      const int err = errno;
      std::unique_lock lock(mu_);
      if (stopping_) return;
      ReapFinishedLocked();
      if (!fd.valid()) {
        if (err == EINTR || err == ECONNABORTED || err == EPROTO) continue;
        // Out of fds or memory, say: back off rather than spin on the error; Stop wakes us.
        CLEAVE_LOG(Error) << "ffn server " << address_ << ": accept failed: " << std::strerror(err);
        stop_cv_.wait_for(lock, std::chrono::milliseconds(100), [&] { return stopping_; });
        continue;
      }
      if (connections_.size() >= kMaxConnections) {
        CLEAVE_LOG(Warning) << "ffn server " << address_ << ": refusing connection from "
                            << PeerAddress(fd.get()) << " beyond " << kMaxConnections;
        continue;
      }
      const int one = 1;
      // Answers are written whole; Nagle would only hold back the tail of each one.
      setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
      auto c = std::make_unique<Connection>();
      c->fd = std::move(fd);
      Connection* raw = c.get();
      live_.fetch_add(1);
      c->thread = std::thread([this, raw] { Serve(raw); });
      connections_.push_back(std::move(c));
    }
  }

  void Serve(Connection* c) {
    const std::string peer = PeerAddress(c->fd.get());  // now: a reset peer has no address later
    const absl::Status st = CallServer(c->fd.get(), options_, handler_, answered_).Run();
    // Tell the peer at once; the fd itself is closed when the connection is reaped.
    shutdown(c->fd.get(), SHUT_RDWR);
    std::lock_guard lock(mu_);
    if (!absl::IsNotFound(st) && !stopping_) {
      CLEAVE_LOG(Warning) << "ffn server " << address_ << ": connection from " << peer
                          << " closed: " << st.message();
    }
    c->finished = true;
    live_.fetch_sub(1);
  }

  // Joins threads that are past their last use of mu_ (finished is set as they leave).
  void ReapFinishedLocked() {
    for (auto it = connections_.begin(); it != connections_.end();) {
      if ((*it)->finished) {
        (*it)->thread.join();
        it = connections_.erase(it);
      } else {
        ++it;
      }
    }
  }

  const ActivationOptions options_;
  const FfnHandler handler_;
  std::string address_;
  UniqueFd listen_fd_;
  std::thread accept_thread_;
  std::atomic<int> live_{0};
  std::atomic<uint64_t> answered_{0};

  std::mutex stop_mu_;
  std::mutex mu_;
  std::condition_variable stop_cv_;
  bool stopping_ = false;
  std::list<std::unique_ptr<Connection>> connections_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<FfnServer>> FfnServer::Start(const ActivationOptions& options,
                                                            FfnHandler handler) {
  if (options.hidden_size <= 0 || options.num_layers <= 0 || options.max_rows <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ffn server: hidden_size (", options.hidden_size, "), num_layers (",
                     options.num_layers, ") and max_rows (", options.max_rows, ") must be > 0"));
  }
  if (options.io_timeout_ms <= 0) {
    return absl::InvalidArgumentError("ffn server: io_timeout_ms must be > 0");
  }
  if (!handler) return absl::InvalidArgumentError("ffn server: no handler");
  auto server = std::make_unique<FfnServerImpl>(options, std::move(handler));
  CLEAVE_RETURN_IF_ERROR(server->Listen());
  return std::unique_ptr<FfnServer>(std::move(server));
}

}  // namespace cleave::transport
