#include "tcp_sender.h"

#include <sys/socket.h>

#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "auth.h"
#include "cleave/common/status.h"
#include "layer_checks.h"

namespace cleave::transport {
namespace {

// One sendmsg() carries up to this much, so small frames share a syscall and a big queue does
// not hold the lock-free write for long.
constexpr size_t kMaxBatchFrames = 64;
constexpr size_t kMaxBatchBytes = 8u << 20;

// A LAYER frame: header and block ids, then the caller's K blocks, then its V blocks.
FrameSource LayerFrame(const KvLayerSend& layer, size_t block_bytes) {
  const size_t n = layer.dst_blocks.size();
  FrameSource f;
  f.key = {layer.request_id, layer.attempt};
  f.head.resize(wire::kFrameHeaderBytes + 4 * n);
  wire::FrameHeader h;
  h.type = static_cast<uint16_t>(wire::FrameType::kLayer);
  h.request_id = layer.request_id;
  h.attempt = layer.attempt;
  h.layer = static_cast<uint32_t>(layer.layer);
  h.n_blocks = static_cast<uint32_t>(n);
  h.payload_bytes = 2 * n * block_bytes;
  wire::EncodeFrameHeader(h, f.head.data());
  for (size_t i = 0; i < n; ++i) {
    wire::PutU32(&f.head[wire::kFrameHeaderBytes + 4 * i],
                 static_cast<uint32_t>(layer.dst_blocks[i]));
  }
  f.payload.reserve(2 * n);
  for (const std::byte* p : layer.k_src)
    f.payload.push_back({const_cast<std::byte*>(p), block_bytes});
  for (const std::byte* p : layer.v_src)
    f.payload.push_back({const_cast<std::byte*>(p), block_bytes});
  f.payload_bytes = h.payload_bytes;
  return f;
}

// A STATE frame: header, then the caller's conv state, then its SSM state.
FrameSource StateFrame(const KvStateSend& state, size_t conv_bytes, size_t ssm_bytes) {
  FrameSource f;
  f.key = {state.request_id, state.attempt};
  f.head.resize(wire::kFrameHeaderBytes);
  wire::FrameHeader h;
  h.type = static_cast<uint16_t>(wire::FrameType::kState);
  h.request_id = state.request_id;
  h.attempt = state.attempt;
  h.layer = static_cast<uint32_t>(state.layer);
  h.slot = static_cast<uint32_t>(state.dst_slot);
  h.payload_bytes = conv_bytes + ssm_bytes;
  wire::EncodeFrameHeader(h, f.head.data());
  if (conv_bytes > 0) f.payload.push_back({const_cast<std::byte*>(state.conv_src), conv_bytes});
  if (ssm_bytes > 0) f.payload.push_back({const_cast<std::byte*>(state.ssm_src), ssm_bytes});
  f.payload_bytes = h.payload_bytes;
  return f;
}

}  // namespace

TcpPeerLink::TcpPeerLink(HostPort peer, const TransportOptions& options,
                         std::unique_ptr<SendPayloadPath> payload)
    : peer_(std::move(peer)),
      name_(absl::StrCat(payload ? payload->prefix() : "", peer_.host, ":", peer_.port)),
      options_(options),
      pool_cap_bytes_(std::min<size_t>(options.max_queued_bytes_per_peer, 16u << 20)),
      payload_(std::move(payload)) {
  writer_ = std::thread([this] { WriterLoop(); });
}

TcpPeerLink::~TcpPeerLink() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    if (fd_.valid()) shutdown(fd_.get(), SHUT_RDWR);  // wakes a writer blocked in sendmsg
  }
  cv_.notify_all();
  writer_.join();
  const absl::Status why = absl::CancelledError(absl::StrCat("kv sender to ", name_, " shut down"));
  for (OutFrame& f : queue_) {
    if (f.done) f.done(why);
  }
}

absl::Status TcpPeerLink::PeerError(const absl::Status& s) const {
  return absl::Status(s.code(), absl::StrCat("kv peer ", name_, ": ", s.message()));
}

absl::Status TcpPeerLink::SendLayer(const KvLayerSend& layer) {
  CLEAVE_RETURN_IF_ERROR(CheckLayerSend(options_.geometry, layer));
  FrameSource frame = LayerFrame(layer, options_.geometry.block_bytes());
  return Send(frame);
}

absl::Status TcpPeerLink::SendState(const KvStateSend& state) {
  CLEAVE_RETURN_IF_ERROR(CheckStateSend(options_.geometry, state));
  FrameSource frame =
      StateFrame(state, options_.geometry.conv_state_bytes, options_.geometry.ssm_state_bytes);
  return Send(frame);
}

absl::Status TcpPeerLink::Send(FrameSource& frame) {
  std::unique_lock lock(mu_);
  if (auto it = open_.find(frame.key); it != open_.end() && !it->second.ok()) return it->second;
  CLEAVE_RETURN_IF_ERROR(EnsureConnectedLocked(lock));
  if (payload_) return SendThroughChannelLocked(lock, frame);
  if (queue_.empty() && !writing_) return SendDirectLocked(lock, frame);
  return SendQueuedLocked(lock, frame);
}

absl::Status TcpPeerLink::SendDirectLocked(std::unique_lock<std::mutex>& lock, FrameSource& frame) {
  writing_ = true;
  const uint64_t gen = generation_;
  const int fd = fd_.get();
  open_.try_emplace(frame.key, absl::OkStatus());
  lock.unlock();

  std::vector<iovec> iov;
  iov.reserve(1 + frame.payload.size());
  iov.push_back({frame.head.data(), frame.head.size()});
  iov.insert(iov.end(), frame.payload.begin(), frame.payload.end());
  const std::vector<iovec> whole = iov;  // WriteSomev advances `iov` in place
  const size_t total = frame.bytes();
  absl::StatusOr<size_t> sent = PeerHasHungUp(fd)
                                    ? absl::UnavailableError("receiver closed the connection")
                                    : WriteSomev(fd, iov.data(), iov.size());
  OutFrame rest;
  if (sent.ok() && *sent < total) {
    // The socket buffer is full: the rest goes first in the queue (we still hold writing_, so
    // nothing queued meanwhile can be written ahead of it).
    lock.lock();
    rest = NewFrameLocked(total - *sent);
    lock.unlock();
    rest.header_bytes = 0;
    CopyIovTail(whole.data(), whole.size(), *sent, rest.body.get());
  }

  lock.lock();
  writing_ = false;
  if (!sent.ok()) {
    const absl::Status st = PeerError(sent.status());
    std::vector<Completion> completions;
    FailConnectionLocked(gen, st, completions);
    cv_.notify_all();
    lock.unlock();
    for (auto& [done, status] : completions) done(status);
    return st;
  }
  if (rest.body_bytes > 0) {
    held_bytes_ += rest.bytes();
    queue_.push_front(std::move(rest));
  }
  cv_.notify_all();
  return absl::OkStatus();
}

absl::Status TcpPeerLink::SendQueuedLocked(std::unique_lock<std::mutex>& lock, FrameSource& frame) {
  const TransferKey key = frame.key;
  const size_t body_bytes = frame.bytes() - wire::kFrameHeaderBytes;
  const size_t frame_bytes = frame.bytes();
  const uint64_t gen = generation_;
  // Room for the frame; one frame may always go when nothing is held, however big.
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(options_.io_timeout_ms);
  const bool room = cv_.wait_until(lock, deadline, [&] {
    return stop_ || generation_ != gen || held_bytes_ == 0 ||
           held_bytes_ + frame_bytes <= options_.max_queued_bytes_per_peer;
  });
  if (stop_) return absl::CancelledError("kv sender shutting down");
  if (generation_ != gen) {
    // The connection failed while we waited; an open transfer already carries the cause.
    return open_.try_emplace(key, last_failure_).first->second;
  }
  if (!room) {
    const absl::Status st = PeerError(absl::DeadlineExceededError(
        absl::StrCat("send queue full for ", options_.io_timeout_ms, " ms")));
    open_[key] = st;  // the frame is lost, so the transfer is too
    return st;
  }
  held_bytes_ += frame_bytes;
  open_.try_emplace(key, absl::OkStatus());
  OutFrame f = NewFrameLocked(body_bytes);
  lock.unlock();

  // Copy outside the lock: the copy is what lets the caller reuse its memory now.
  std::memcpy(f.header.data(), frame.head.data(), wire::kFrameHeaderBytes);
  std::byte* p = f.body.get();
  const size_t ids_bytes = frame.head.size() - wire::kFrameHeaderBytes;
  if (ids_bytes > 0) std::memcpy(p, frame.head.data() + wire::kFrameHeaderBytes, ids_bytes);
  p += ids_bytes;
  for (const iovec& v : frame.payload) {
    std::memcpy(p, v.iov_base, v.iov_len);
    p += v.iov_len;
  }

  lock.lock();
  if (stop_ || generation_ != gen) {
    held_bytes_ -= frame_bytes;
    RecycleLocked(f);
    cv_.notify_all();
    if (stop_) return absl::CancelledError("kv sender shutting down");
    return open_[key];  // FailConnectionLocked set it to the cause
  }
  queue_.push_back(std::move(f));
  cv_.notify_all();
  return absl::OkStatus();
}

void TcpPeerLink::Finish(TransferKey key, DoneCallback done) {
  std::unique_lock lock(mu_);
  if (auto it = open_.find(key); it != open_.end()) {
    const absl::Status st = std::move(it->second);
    open_.erase(it);
    if (!st.ok()) {
      lock.unlock();
      done(st);
      return;
    }
  }
  if (absl::Status st = EnsureConnectedLocked(lock); !st.ok()) {
    lock.unlock();
    done(st);
    return;
  }
  // Finish frames do not wait for room: they are tiny and callers must not block here.
  OutFrame f;
  wire::FrameHeader h;
  h.type = static_cast<uint16_t>(wire::FrameType::kFinish);
  h.request_id = key.request_id;
  h.attempt = key.attempt;
  wire::EncodeFrameHeader(h, f.header.data());
  f.done = std::move(done);
  held_bytes_ += f.bytes();
  queue_.push_back(std::move(f));
  cv_.notify_all();
}

absl::Status TcpPeerLink::EnsureConnectedLocked(std::unique_lock<std::mutex>& lock) {
  for (;;) {
    if (stop_) return absl::CancelledError("kv sender shutting down");
    if (state_ == State::kConnected) return absl::OkStatus();
    if (state_ == State::kConnecting) {
      // Someone else is dialling: share their outcome rather than dial again.
      const uint64_t attempt = dial_attempts_;
      cv_.wait(lock, [&] { return stop_ || state_ != State::kConnecting; });
      if (state_ == State::kDisconnected && dial_attempts_ != attempt && !last_dial_error_.ok()) {
        return last_dial_error_;
      }
      continue;
    }
    state_ = State::kConnecting;
    lock.unlock();
    absl::StatusOr<UniqueFd> fd = Dial();
    std::unique_ptr<SendPayloadChannel> channel;
    if (fd.ok() && payload_) {
      absl::StatusOr<std::unique_ptr<SendPayloadChannel>> opened = payload_->Open(fd->get());
      if (opened.ok()) {
        channel = *std::move(opened);
      } else {
        fd = opened.status();
      }
    }
    lock.lock();
    ++dial_attempts_;
    if (fd.ok() && !stop_) {
      fd_ = *std::move(fd);
      channel_ = std::move(channel);
      state_ = State::kConnected;
      ++generation_;
      last_dial_error_ = absl::OkStatus();
    } else {
      state_ = State::kDisconnected;
      last_dial_error_ =
          fd.ok() ? absl::CancelledError("kv sender shutting down") : PeerError(fd.status());
    }
    cv_.notify_all();
    if (state_ != State::kConnected) return last_dial_error_;
  }
}

absl::StatusOr<UniqueFd> TcpPeerLink::Dial() const {
  CLEAVE_ASSIGN_OR_RETURN(UniqueFd fd, ConnectTcp(peer_, options_.connect_timeout_ms));
  CLEAVE_RETURN_IF_ERROR(SetIoTimeout(fd.get(), options_.io_timeout_ms));
  // With a secret, the receiver must prove it holds it (and we must) before the Hello (auth.h).
  if (!options_.secret.empty()) {
    CLEAVE_RETURN_IF_ERROR(auth::AuthenticateToReceiver(fd.get(), options_.secret));
  }
  const wire::Hello hello = HelloFor(options_.geometry);
  auto out = wire::EncodeHello(hello);
  iovec iov{out.data(), out.size()};
  CLEAVE_RETURN_IF_ERROR(WriteFullv(fd.get(), &iov, 1));
  // The shared prefix first: a receiver of another version answers with no more than that.
  std::array<std::byte, wire::kHelloBytes> in{};
  if (absl::Status s = ReadFull(fd.get(), in.data(), wire::kHelloPrefixBytes); !s.ok()) {
    return absl::UnavailableError(absl::StrCat("no handshake reply: ", s.message()));
  }
  wire::Hello ack = wire::DecodeHello(in.data());
  if (ack.magic == auth::kAuthMagic) {
    // Its challenge, sent on accept: it requires the cluster secret and will not read our Hello.
    return absl::UnauthenticatedError(
        "authentication: the receiver requires the cluster secret, but this sender has none "
        "(configure the same secret on both sides, or on neither)");
  }
  if (ack.magic != wire::kHelloMagic) return absl::UnavailableError("not a cleave KV receiver");
  if (ack.version != wire::kVersion ||
      ack.status == static_cast<uint16_t>(wire::HelloStatus::kVersionMismatch)) {
    return absl::FailedPreconditionError(
        absl::StrCat("receiver refused the handshake (version mismatch): it has version ",
                     ack.version, "; this sender has version ", wire::kVersion));
  }
  if (absl::Status s = ReadFull(fd.get(), in.data() + wire::kHelloPrefixBytes,
                                wire::kHelloBytes - wire::kHelloPrefixBytes);
      !s.ok()) {
    return absl::UnavailableError(absl::StrCat("short handshake reply: ", s.message()));
  }
  ack = wire::DecodeHello(in.data());
  if (ack.status != static_cast<uint16_t>(wire::HelloStatus::kOk)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "receiver refused the handshake (",
        ack.status == static_cast<uint16_t>(wire::HelloStatus::kGeometryMismatch) ? "geometry"
                                                                                  : "unknown",
        " mismatch): it has ", DescribeGeometry(ack), "; this sender has ",
        DescribeGeometry(hello)));
  }
  return fd;
}

void TcpPeerLink::WriterLoop() {
  std::unique_lock lock(mu_);
  std::vector<OutFrame> batch;
  std::vector<iovec> iov;
  std::vector<Completion> completions;
  for (;;) {
    cv_.wait(lock, [&] {
      return stop_ || (state_ == State::kConnected && !queue_.empty() && !writing_);
    });
    if (stop_) return;
    writing_ = true;
    size_t batch_bytes = 0;
    while (!queue_.empty() && batch.size() < kMaxBatchFrames && batch_bytes < kMaxBatchBytes) {
      batch_bytes += queue_.front().bytes();
      batch.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    const uint64_t gen = generation_;
    const int fd = fd_.get();  // only the writing_ holder closes it, so it stays ours
    lock.unlock();

    iov.clear();
    for (OutFrame& f : batch) {
      if (f.header_bytes > 0) iov.push_back({f.header.data(), f.header_bytes});
      if (f.body_bytes > 0) iov.push_back({f.body.get(), f.body_bytes});
    }
    // The receiver never writes after the handshake: readable means it hung up, and a write
    // now could still "succeed" into our socket buffer.
    absl::Status st = PeerHasHungUp(fd) ? absl::UnavailableError("receiver closed the connection")
                                        : WriteFullv(fd, iov.data(), iov.size());
    if (!st.ok()) st = PeerError(st);

    lock.lock();
    writing_ = false;
    held_bytes_ -= batch_bytes;
    for (OutFrame& f : batch) {
      if (f.done) completions.emplace_back(std::move(f.done), st);
      RecycleLocked(f);
    }
    batch.clear();
    if (!st.ok()) FailConnectionLocked(gen, st, completions);
    cv_.notify_all();
    if (!completions.empty()) {
      lock.unlock();
      for (auto& [done, status] : completions) done(status);
      completions.clear();
      lock.lock();
    }
  }
}

void TcpPeerLink::FailConnectionLocked(uint64_t generation, const absl::Status& why,
                                       std::vector<Completion>& completions) {
  if (generation != generation_ || state_ != State::kConnected) return;
  shutdown(fd_.get(), SHUT_RDWR);
  fd_.Reset();
  channel_.reset();  // no frame is using it: its user failed, or the writer owns the socket
  state_ = State::kDisconnected;
  ++generation_;
  last_failure_ = why;
  for (OutFrame& f : queue_) {
    held_bytes_ -= f.bytes();
    if (f.done) completions.emplace_back(std::move(f.done), why);
    RecycleLocked(f);
  }
  queue_.clear();
  // The receiver fails whatever it had of these when the connection drops.
  for (auto& [key, status] : open_) {
    if (status.ok()) status = why;
  }
}

TcpPeerLink::OutFrame TcpPeerLink::NewFrameLocked(size_t body_bytes) {
  OutFrame f;
  f.body_bytes = body_bytes;
  if (body_bytes == 0) return f;
  for (size_t i = 0; i < pool_.size(); ++i) {
    // Reuse only a close fit, so one huge frame's buffer does not serve tiny ones forever.
    if (pool_[i].body_capacity >= body_bytes && pool_[i].body_capacity <= 2 * body_bytes) {
      f.body = std::move(pool_[i].body);
      f.body_capacity = pool_[i].body_capacity;
      pool_bytes_ -= f.body_capacity;
      pool_.erase(pool_.begin() + static_cast<std::ptrdiff_t>(i));
      return f;
    }
  }
  f.body.reset(new std::byte[body_bytes]);  // default-init: no memset, the copy fills it
  f.body_capacity = body_bytes;
  return f;
}

void TcpPeerLink::RecycleLocked(OutFrame& frame) {
  if (frame.body && pool_bytes_ + frame.body_capacity <= pool_cap_bytes_) {
    pool_bytes_ += frame.body_capacity;
    OutFrame kept;
    kept.body = std::move(frame.body);
    kept.body_capacity = frame.body_capacity;
    pool_.push_back(std::move(kept));
  }
  frame.body.reset();
}

absl::StatusOr<TcpPeerLink*> TcpSender::Link(const std::string& peer) {
  std::lock_guard lock(mu_);
  auto it = links_.find(peer);
  if (it != links_.end()) return it->second.get();
  const SchemeAddress where = SplitScheme(peer);
  CLEAVE_ASSIGN_OR_RETURN(HostPort hp, ParseHostPort(std::string(where.host_port)));
  std::unique_ptr<SendPayloadPath> payload;
  if (where.scheme != PayloadScheme::kTcp) {
    // Not remembered on failure: the caller gets the reason on every send.
    CLEAVE_ASSIGN_OR_RETURN(payload, MakeSendPayloadPath(where.scheme, options_));
  }
  auto link = std::make_unique<TcpPeerLink>(std::move(hp), options_, std::move(payload));
  TcpPeerLink* raw = link.get();
  links_.emplace(peer, std::move(link));
  return raw;
}

absl::Status TcpSender::SendLayer(const std::string& peer, const KvLayerSend& layer) {
  CLEAVE_ASSIGN_OR_RETURN(TcpPeerLink * link, Link(peer));
  return link->SendLayer(layer);
}

absl::Status TcpSender::SendState(const std::string& peer, const KvStateSend& state) {
  CLEAVE_ASSIGN_OR_RETURN(TcpPeerLink * link, Link(peer));
  return link->SendState(state);
}

void TcpSender::Finish(const std::string& peer, TransferKey key, DoneCallback done) {
  absl::StatusOr<TcpPeerLink*> link = Link(peer);
  if (!link.ok()) {
    done(link.status());
    return;
  }
  (*link)->Finish(key, std::move(done));
}

}  // namespace cleave::transport
