// The attention side of the activation transport: one connection to one FFN worker, calls
// pipelined over it. Send writes a call (under write_mu_, so frames never interleave) and records
// it as in flight; the reader thread matches each ANSWER to the oldest call in flight and reads
// its payload straight into that call's `out`.
//
// Who may touch a caller's `out`: only the reader, and only between taking `reading_` (under mu_,
// refused once the connection is broken) and dropping it. Any Wait that returns without the
// answer first breaks the connection (which shuts the socket down, so a read in progress ends
// promptly) and then waits for `reading_` to drop, so no byte lands in `out` after Wait returns.
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "absl/container/flat_hash_map.h"
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

int64_t Micros(Clock::duration d) {
  return std::chrono::duration_cast<std::chrono::microseconds>(d).count();
}

class FfnConnectionImpl final : public FfnConnection {
 public:
  FfnConnectionImpl(std::string address, UniqueFd fd, const ActivationOptions& options,
                    uint32_t max_rows)
      : address_(std::move(address)),
        fd_(std::move(fd)),
        hidden_(static_cast<uint32_t>(options.hidden_size)),
        num_layers_(options.num_layers),
        max_rows_(max_rows) {
    reader_ = std::thread([this] { ReadLoop(); });
  }

  ~FfnConnectionImpl() override {
    {
      std::lock_guard lock(mu_);
      BreakLocked(absl::CancelledError(
          absl::StrCat("FFN worker at ", address_, ": connection closed by this side")));
    }
    reader_.join();
  }

  absl::StatusOr<uint64_t> Send(const FfnCall& call) override {
    const Clock::time_point start = Clock::now();
    CLEAVE_RETURN_IF_ERROR(CheckCall(call));
    const bool dense = call.op == FfnOp::kDense;
    afd_wire::Call c;
    c.op = static_cast<uint16_t>(call.op);
    c.layer = static_cast<uint32_t>(call.layer);
    c.rows = static_cast<uint32_t>(call.num_rows);
    c.assigns = dense ? 0 : static_cast<uint32_t>(call.num_assign);
    c.hidden = hidden_;

    {
      // Fail at once rather than queue behind a write that the break is still unblocking.
      std::lock_guard lock(mu_);
      if (!broken_.ok()) return broken_;
    }
    // Tickets go on the wire in the order they are registered, which is the order the FFN
    // worker answers them.
    std::lock_guard write_lock(write_mu_);
    {
      std::lock_guard lock(mu_);
      if (!broken_.ok()) return broken_;
      c.ticket = next_ticket_++;
      inflight_.push_back({c.ticket, call.layer, dense ? c.rows : c.assigns, call.out, start});
    }
    afd_wire::Header head = afd_wire::EncodeCall(c);
    const size_t row_bytes = size_t{c.rows} * hidden_ * sizeof(float);
    const size_t assign_bytes = size_t{c.assigns} * sizeof(int32_t);
    // The payload iovecs only read the caller's memory; writev's API is not const-correct.
    iovec iov[4] = {{head.data(), head.size()},
                    {const_cast<float*>(call.rows), row_bytes},
                    {const_cast<int32_t*>(call.assign_rows), assign_bytes},
                    {const_cast<int32_t*>(call.assign_experts), assign_bytes}};
    if (absl::Status s = WriteFullv(fd_.get(), iov, dense ? 2 : 4); !s.ok()) {
      std::lock_guard lock(mu_);
      BreakLocked(Lost(absl::StrCat("send: ", s.message())));
      return broken_;
    }
    return c.ticket;
  }

  absl::Status Wait(uint64_t ticket, Clock::time_point deadline, FfnTiming* timing) override {
    std::unique_lock lock(mu_);
    auto take = [&](absl::flat_hash_map<uint64_t, Result>::iterator it) {
      absl::Status st = std::move(it->second.status);
      if (timing != nullptr) *timing = it->second.timing;
      done_.erase(it);
      return st;
    };
    if (auto it = done_.find(ticket); it != done_.end()) return take(it);
    const auto call = std::find_if(inflight_.begin(), inflight_.end(),
                                   [&](const Pending& p) { return p.ticket == ticket; });
    if (call == inflight_.end()) {
      if (!broken_.ok()) return broken_;
      return absl::InvalidArgumentError(absl::StrCat(
          "FFN worker at ", address_, ": unknown ticket ", ticket, " (never sent, or waited for)"));
    }
    const int layer = call->layer;
    const Clock::time_point sent = call->sent;  // `call` dies when the answer comes
    cv_.wait_until(lock, deadline, [&] { return done_.contains(ticket) || !broken_.ok(); });
    if (auto it = done_.find(ticket); it != done_.end()) return take(it);
    absl::Status st = broken_;
    if (st.ok()) {
      const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - sent);
      st = absl::DeadlineExceededError(absl::StrCat("FFN worker at ", address_,
                                                    " did not answer layer ", layer, " within ",
                                                    ms.count(), " ms"));
      CLEAVE_LOG(Warning) << st.message() << "; closing the connection";
      BreakLocked(st);  // a late answer must not land in a buffer the caller reuses
    }
    cv_.wait(lock, [&] { return !reading_; });
    return st;
  }

  absl::Status broken() const override {
    std::lock_guard lock(mu_);
    return broken_;
  }

  const std::string& address() const override { return address_; }

 private:
  struct Pending {
    uint64_t ticket = 0;
    int layer = 0;
    uint32_t out_rows = 0;
    float* out = nullptr;
    Clock::time_point sent;
  };
  struct Result {
    absl::Status status;
    FfnTiming timing;
  };

  // Caught here so a caller's mistake fails its call, not the connection (the FFN worker would
  // close it on the same fields).
  absl::Status CheckCall(const FfnCall& call) const {
    auto bad = [&](auto... why) {
      return absl::InvalidArgumentError(absl::StrCat("FFN call to ", address_, ": ", why...));
    };
    const bool dense = call.op == FfnOp::kDense;
    if (!dense && call.op != FfnOp::kExperts) return bad("unknown op");
    if (call.layer < 0 || call.layer >= num_layers_) {
      return bad("layer ", call.layer, " out of range [0, ", num_layers_, ")");
    }
    if (call.num_rows <= 0 || static_cast<uint32_t>(call.num_rows) > max_rows_) {
      return bad(call.num_rows, " rows; the FFN worker takes 1..", max_rows_);
    }
    if (call.rows == nullptr || call.out == nullptr) return bad("rows or out is null");
    if (dense) {
      if (call.num_assign != 0) return bad("dense call with assignments");
      return absl::OkStatus();
    }
    const uint64_t max_assign =
        uint64_t{static_cast<uint32_t>(call.num_rows)} * afd_wire::kMaxAssignsPerRow;
    if (call.num_assign <= 0 || static_cast<uint64_t>(call.num_assign) > max_assign) {
      return bad(call.num_assign, " assignments for ", call.num_rows, " rows, allowed 1..",
                 max_assign);
    }
    if (call.assign_rows == nullptr || call.assign_experts == nullptr) {
      return bad("assignments are null");
    }
    for (int i = 0; i < call.num_assign; ++i) {
      if (call.assign_rows[i] < 0 || call.assign_rows[i] >= call.num_rows) {
        return bad("assignment ", i, " names row ", call.assign_rows[i], " of ", call.num_rows);
      }
    }
    return absl::OkStatus();
  }

  absl::Status Lost(absl::string_view why) const {
    return absl::UnavailableError(
        absl::StrCat("FFN worker at ", address_, ": connection lost: ", why));
  }

  // The first reason sticks. Shutting the socket down wakes the reader and a blocked Send.
  void BreakLocked(absl::Status why) {
    if (!broken_.ok()) return;
    broken_ = std::move(why);
    shutdown(fd_.get(), SHUT_RDWR);
    cv_.notify_all();
  }

  void ReadLoop() {
    std::string message;
    absl::Status st;
    do {
      st = ReadAnswer(message);
    } while (st.ok());
    std::lock_guard lock(mu_);
    reading_ = false;
    if (broken_.ok()) {
      absl::Status lost = Lost(st.message());
      CLEAVE_LOG(Warning) << lost.message();
      BreakLocked(std::move(lost));
    }
    cv_.notify_all();  // a Wait may be waiting for reading_ to drop
  }

  // Reads one ANSWER and publishes it to done_. On an error, reading_ may still be set.
  absl::Status ReadAnswer(std::string& message) {
    // No timeout while idle (nothing may be in flight for a long time); once an answer starts
    // it must keep moving (SO_RCVTIMEO).
    CLEAVE_RETURN_IF_ERROR(WaitReadable(fd_.get()));
    afd_wire::Header buf{};
    if (absl::Status s = ReadFull(fd_.get(), buf.data(), buf.size(), /*eof_ok_at_start=*/true);
        !s.ok()) {
      if (absl::IsNotFound(s)) return absl::UnavailableError("the FFN worker closed it");
      return s;
    }
    const afd_wire::Answer a = afd_wire::DecodeAnswer(buf.data());
    auto bad = [](auto... why) {
      return absl::InvalidArgumentError(absl::StrCat("protocol violation: ", why...));
    };
    if (a.magic != afd_wire::kAnswerMagic) return bad("bad answer magic 0x", absl::Hex(a.magic));
    if (a.reserved != 0) return bad("reserved answer field set");
    const bool ok = a.status == static_cast<uint16_t>(afd_wire::AnswerStatus::kOk);
    if (!ok && a.status != static_cast<uint16_t>(afd_wire::AnswerStatus::kError)) {
      return bad("unknown answer status ", a.status);
    }
    Pending call;
    {
      std::lock_guard lock(mu_);
      if (!broken_.ok()) return broken_;
      if (inflight_.empty()) return bad("answer ", a.ticket, " with no call in flight");
      call = inflight_.front();
      if (a.ticket != call.ticket) {
        return bad("answer ", a.ticket, ", the oldest call in flight is ", call.ticket);
      }
      if (ok && (a.out_rows != call.out_rows || a.hidden != hidden_ || a.message_bytes != 0)) {
        return bad("answer ", a.ticket, " is ", a.out_rows, " x ", a.hidden, " (+", a.message_bytes,
                   " message bytes), expected ", call.out_rows, " x ", hidden_);
      }
      if (!ok && (a.out_rows != 0 || a.message_bytes > afd_wire::kMaxMessageBytes)) {
        return bad("error answer ", a.ticket, " with ", a.out_rows, " rows and ", a.message_bytes,
                   " message bytes");
      }
      // From here until reading_ drops, the reader owns call.out.
      reading_ = ok;
    }
    if (ok) {
      CLEAVE_RETURN_IF_ERROR(
          ReadFull(fd_.get(), call.out, size_t{a.out_rows} * a.hidden * sizeof(float)));
    } else {
      message.resize(a.message_bytes);
      CLEAVE_RETURN_IF_ERROR(ReadFull(fd_.get(), message.data(), message.size()));
    }
    std::lock_guard lock(mu_);
    reading_ = false;
    // A Wait that gave up meanwhile broke the connection; it has told its caller already.
    if (!broken_.ok()) return broken_;
    Result r;
    if (!ok)
      r.status = absl::InternalError(absl::StrCat("FFN worker at ", address_, ": ", message));
    r.timing.round_trip_us = Micros(Clock::now() - call.sent);
    r.timing.compute_us = a.compute_us;
    done_.emplace(call.ticket, std::move(r));
    inflight_.pop_front();
    cv_.notify_all();
    return absl::OkStatus();
  }

  const std::string address_;
  const UniqueFd fd_;  // closed only by the destructor, after the reader is joined
  const uint32_t hidden_;
  const int num_layers_;
  const uint32_t max_rows_;  // the FFN worker's, from its HELLO_ACK

  std::mutex write_mu_;  // one frame on the wire at a time
  mutable std::mutex mu_;
  std::condition_variable cv_;
  absl::Status broken_;  // OK while healthy
  uint64_t next_ticket_ = 1;
  std::deque<Pending> inflight_;  // sent, unanswered, oldest first
  absl::flat_hash_map<uint64_t, Result> done_;
  bool reading_ = false;  // the reader is writing into inflight_.front().out
  std::thread reader_;
};

// What differs between the two sides' geometry, for the refusal message.
std::string GeometryDiff(const afd_wire::Hello& ack, const ActivationOptions& options) {
  std::string out;
  auto add = [&](const std::string& part) { absl::StrAppend(&out, out.empty() ? "" : ", ", part); };
  if (ack.version != afd_wire::kVersion) {
    add(absl::StrCat("version ", ack.version, ", this attention worker ", afd_wire::kVersion));
  }
  if (ack.hidden != static_cast<uint32_t>(options.hidden_size)) {
    add(absl::StrCat("hidden ", ack.hidden, ", this attention worker ", options.hidden_size));
  }
  if (ack.num_layers != static_cast<uint32_t>(options.num_layers)) {
    add(absl::StrCat(ack.num_layers, " layers, this attention worker ", options.num_layers));
  }
  return out;
}

absl::StatusOr<UniqueFd> Handshake(const HostPort& peer, const ActivationOptions& options,
                                   uint32_t* max_rows) {
  CLEAVE_ASSIGN_OR_RETURN(UniqueFd fd, ConnectTcp(peer, options.connect_timeout_ms));
  CLEAVE_RETURN_IF_ERROR(SetIoTimeout(fd.get(), options.io_timeout_ms));
  if (!options.secret.empty()) {
    CLEAVE_RETURN_IF_ERROR(auth::AuthenticateToReceiver(fd.get(), options.secret));
  }
  afd_wire::Hello hello;
  hello.hidden = static_cast<uint32_t>(options.hidden_size);
  hello.num_layers = static_cast<uint32_t>(options.num_layers);
  hello.max_rows = static_cast<uint32_t>(options.max_rows);
  afd_wire::Header buf = afd_wire::EncodeHello(hello);
  iovec iov{buf.data(), buf.size()};
  CLEAVE_RETURN_IF_ERROR(WriteFullv(fd.get(), &iov, 1));
  if (absl::Status s = ReadFull(fd.get(), buf.data(), buf.size()); !s.ok()) {
    return absl::UnavailableError(absl::StrCat("no handshake reply: ", s.message()));
  }
  const afd_wire::Hello ack = afd_wire::DecodeHello(buf.data());
  if (ack.magic == auth::kAuthMagic) {
    // Its challenge, sent on accept: it requires the cluster secret and will not read our HELLO.
    return absl::UnauthenticatedError(
        "authentication: it requires the cluster secret, but this attention worker has none "
        "(configure the same secret on both sides, or on neither)");
  }
  if (ack.magic != afd_wire::kAckMagic) return absl::UnavailableError("not a cleave FFN worker");
  const std::string diff = GeometryDiff(ack, options);
  if (ack.status != static_cast<uint16_t>(afd_wire::HelloStatus::kOk) || !diff.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("has ", diff.empty() ? "refused the handshake" : diff));
  }
  if (ack.max_rows == 0) return absl::UnavailableError("handshake reply allows 0 rows per call");
  *max_rows = ack.max_rows;
  return fd;
}

}  // namespace

absl::StatusOr<std::unique_ptr<FfnConnection>> FfnConnection::Connect(
    const std::string& address, const ActivationOptions& options) {
  if (options.hidden_size <= 0 || options.num_layers <= 0 || options.max_rows <= 0 ||
      options.io_timeout_ms <= 0 || options.connect_timeout_ms <= 0) {
    return absl::InvalidArgumentError(
        "ffn connection: hidden_size, num_layers, max_rows and the timeouts must be > 0");
  }
  CLEAVE_ASSIGN_OR_RETURN(const HostPort peer, ParseHostPort(address));
  uint32_t max_rows = 0;
  absl::StatusOr<UniqueFd> fd = Handshake(peer, options, &max_rows);
  if (!fd.ok()) {
    // "FFN worker at A has hidden 64, ..." reads as a sentence; the rest as "A: why".
    const char* sep = absl::IsFailedPrecondition(fd.status()) ? " " : ": ";
    return absl::Status(fd.status().code(),
                        absl::StrCat("FFN worker at ", address, sep, fd.status().message()));
  }
  return std::unique_ptr<FfnConnection>(
      std::make_unique<FfnConnectionImpl>(address, *std::move(fd), options, max_rows));
}

}  // namespace cleave::transport
