#include "tcp_receiver.h"

#include <arpa/inet.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "auth.h"
#include "cleave/common/logging.h"
#include "cleave/common/status.h"
#include "frame.h"

namespace cleave::transport {
namespace {

constexpr size_t kScratchBytes = 64u << 10;

// Serves one accepted connection: handshake, then frames until it closes or breaks the protocol.
class ConnectionServer {
 public:
  ConnectionServer(int fd, KvBlockStore& store, TransferTracker& tracker,
                   const TransportOptions& options, RecvPayloadPath* payload)
      : fd_(fd),
        store_(store),
        tracker_(tracker),
        io_timeout_ms_(options.io_timeout_ms),
        secret_(options.secret),
        payload_(payload) {}

  // Returns once the connection is done, having failed the transfers it left open.
  void Run() {
    const std::string peer = PeerAddress(fd_);  // now: a reset peer has no address later
    absl::Status st = Handshake();
    if (st.ok() && payload_ != nullptr) {
      absl::StatusOr<std::unique_ptr<RecvPayloadChannel>> channel = payload_->Accept(fd_);
      if (channel.ok()) {
        channel_ = *std::move(channel);
      } else {
        st = absl::Status(channel.status().code(),
                          absl::StrCat("GPU setup: ", channel.status().message()));
      }
    }
    if (st.ok()) st = ServeFrames();
    const bool clean = absl::IsNotFound(st);
    if (!clean) {
      CLEAVE_LOG(Warning) << "kv receiver: connection from " << peer << " ended: " << st.message();
    }
    if (blame_) tracker_.Fail(*blame_, absl::StrCat("protocol violation: ", st.message()));
    const std::string why = clean ? "sender closed the connection before the finish frame"
                                  : absl::StrCat("connection lost mid-transfer: ", st.message());
    for (const TransferKey& key : open_) tracker_.Fail(key, why);
  }

 private:
  absl::Status Handshake() {
    CLEAVE_RETURN_IF_ERROR(SetIoTimeout(fd_, io_timeout_ms_));
    // The shared prefix first: a peer of another version may send no more than that.
    std::array<std::byte, wire::kHelloBytes> buf{};
    CLEAVE_RETURN_IF_ERROR(Authenticate(buf));
    wire::Hello hello = wire::DecodeHello(buf.data());
    // Not one of ours: say nothing, in case it is something that would misread a reply.
    if (hello.magic != wire::kHelloMagic) return absl::InvalidArgumentError("bad hello magic");

    wire::Hello ack = HelloFor(tracker_.geometry());
    size_t ack_bytes = wire::kHelloBytes;
    if (hello.version != wire::kVersion) {
      ack.status = static_cast<uint16_t>(wire::HelloStatus::kVersionMismatch);
      ack_bytes = wire::kHelloPrefixBytes;  // what every version reads
    } else {
      CLEAVE_RETURN_IF_ERROR(ReadFull(fd_, buf.data() + wire::kHelloPrefixBytes,
                                      wire::kHelloBytes - wire::kHelloPrefixBytes));
      hello = wire::DecodeHello(buf.data());
      if (!SameGeometry(hello, ack)) {
        ack.status = static_cast<uint16_t>(wire::HelloStatus::kGeometryMismatch);
      }
    }
    auto out = wire::EncodeHello(ack);
    iovec iov{out.data(), ack_bytes};
    CLEAVE_RETURN_IF_ERROR(WriteFullv(fd_, &iov, 1));
    if (ack.status != 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "refused sender: version ", hello.version, ", ", DescribeGeometry(hello),
          "; this receiver has version ", wire::kVersion, ", ", DescribeGeometry(ack)));
    }
    return absl::OkStatus();
  }

  // Leaves the sender's Hello prefix (kHelloPrefixBytes) in `buf`, once the sender has proven
  // it holds the cluster secret; without a secret, only a peer that does not ask to
  // authenticate gets that far (auth.h). A peer refused here has had no frame read.
  absl::Status Authenticate(std::array<std::byte, wire::kHelloBytes>& buf) {
    static_assert(wire::kHelloPrefixBytes <= auth::kMessageBytes);
    const bool required = !secret_.empty();
    auth::Nonce nr{};
    // Challenge at once, before the peer says anything: a sender without a secret then finds
    // the challenge where it expects its HelloAck and can tell its operator why it stops.
    if (required) CLEAVE_RETURN_IF_ERROR(auth::SendChallenge(fd_, nr));
    if (absl::Status s = ReadFull(fd_, buf.data(), wire::kHelloPrefixBytes); !s.ok()) {
      if (!required) return s;
      return absl::Status(s.code(), absl::StrCat("authentication: waiting for the peer's opening: ",
                                                 s.message()));
    }
    const wire::Hello first = wire::DecodeHello(buf.data());
    if (first.magic == auth::kAuthMagic) {
      if (!required) return auth::RefuseAuthentication(fd_, buf.data(), wire::kHelloPrefixBytes);
      CLEAVE_RETURN_IF_ERROR(
          auth::AuthenticateSender(fd_, secret_, nr, buf.data(), wire::kHelloPrefixBytes));
      return ReadFull(fd_, buf.data(), wire::kHelloPrefixBytes);
    }
    if (!required) return absl::OkStatus();
    if (first.magic == wire::kHelloMagic && first.version == wire::kVersion) {
      // Read the rest of the Hello (never a frame) so the close is clean and the sender reads
      // the challenge, which tells it why.
      (void)ReadFull(fd_, buf.data() + wire::kHelloPrefixBytes,
                     wire::kHelloBytes - wire::kHelloPrefixBytes);
    }
    return absl::UnauthenticatedError(
        "authentication: peer did not authenticate (this receiver requires the cluster secret)");
  }

  // Ends with NotFound("closed") when the sender closes cleanly between frames.
  absl::Status ServeFrames() {
    for (;;) {
      // An idle connection may wait forever (it is reused across requests); a frame, once
      // started, must keep moving (SO_RCVTIMEO set in Handshake).
      CLEAVE_RETURN_IF_ERROR(WaitReadable(fd_));
      std::array<std::byte, wire::kFrameHeaderBytes> buf{};
      CLEAVE_RETURN_IF_ERROR(ReadFull(fd_, buf.data(), buf.size(), /*eof_ok_at_start=*/true));
      const wire::FrameHeader h = wire::DecodeFrameHeader(buf.data());
      if (h.magic != wire::kFrameMagic) return absl::InvalidArgumentError("bad frame magic");
      const TransferKey key{h.request_id, h.attempt};
      if (h.reserved0 != 0) return Violation(key, "reserved header field set");
      if (h.slot != 0 && h.type != static_cast<uint16_t>(wire::FrameType::kState)) {
        return Violation(key, "state slot set on a frame that is not a state frame");
      }
      switch (static_cast<wire::FrameType>(h.type)) {
        case wire::FrameType::kLayer:
          CLEAVE_RETURN_IF_ERROR(ServeLayer(h, key));
          break;
        case wire::FrameType::kState:
          CLEAVE_RETURN_IF_ERROR(ServeState(h, key));
          break;
        case wire::FrameType::kFinish:
          if (h.layer != 0 || h.n_blocks != 0 || h.payload_bytes != 0) {
            return Violation(key, "finish frame with a body");
          }
          open_.erase(key);
          tracker_.Finish(key);
          break;
        default:
          return Violation(key, absl::StrCat("unknown frame type ", h.type));
      }
    }
  }

  absl::Status ServeLayer(const wire::FrameHeader& h, TransferKey key) {
    const KvGeometry& g = tracker_.geometry();
    if (absl::Status s = CheckLayerFraming(g, h.n_blocks, h.payload_bytes); !s.ok()) {
      return Violation(key, std::string(s.message()));
    }
    id_bytes_.resize(size_t{h.n_blocks} * 4);
    CLEAVE_RETURN_IF_ERROR(ReadFull(fd_, id_bytes_.data(), id_bytes_.size()));
    ids_.resize(h.n_blocks);
    for (size_t i = 0; i < ids_.size(); ++i) {
      ids_[i] = static_cast<int32_t>(wire::GetU32(&id_bytes_[4 * i]));
    }
    if (channel_) return ServeChannelLayer(h, key);

    TransferTracker::LayerTicket ticket = tracker_.BeginLayer(key, h.layer, ids_);
    if (ticket.verdict != TransferTracker::Verdict::kWrite) return Discard(h.payload_bytes);

    // Only now, with layer and every id checked, do we name store memory.
    const size_t bb = g.block_bytes();
    iov_.resize(2 * ids_.size());
    for (size_t i = 0; i < ids_.size(); ++i) {
      iov_[i] = {store_.BlockData(static_cast<int>(h.layer), false, ids_[i]), bb};
      iov_[ids_.size() + i] = {store_.BlockData(static_cast<int>(h.layer), true, ids_[i]), bb};
    }
    const absl::Status st = ReadFullv(fd_, iov_.data(), iov_.size());
    tracker_.EndLayer(ticket, st.ok(), absl::StrCat("layer frame cut short: ", st.message()));
    if (st.ok()) open_.insert(key);
    return st;
  }

  absl::Status ServeState(const wire::FrameHeader& h, TransferKey key) {
    const KvGeometry& g = tracker_.geometry();
    if (absl::Status s = CheckStateFraming(g, h.n_blocks, h.payload_bytes); !s.ok()) {
      return Violation(key, std::string(s.message()));
    }
    if (channel_) return ServeChannelState(h, key);
    TransferTracker::LayerTicket ticket = tracker_.BeginState(key, h.layer, h.slot);
    if (ticket.verdict != TransferTracker::Verdict::kWrite) return Discard(h.payload_bytes);

    // Layer and slot are checked: only now do we name store memory.
    const int layer = static_cast<int>(h.layer), slot = static_cast<int>(h.slot);
    std::byte* conv = store_.StateData(layer, /*is_ssm=*/false, slot);
    std::byte* ssm = store_.StateData(layer, /*is_ssm=*/true, slot);
    if ((g.conv_state_bytes > 0 && conv == nullptr) || (g.ssm_state_bytes > 0 && ssm == nullptr)) {
      // The store claims state layers it cannot hold: this transfer cannot land here.
      tracker_.EndLayer(
          ticket, false,
          absl::StrCat("store has no state memory for layer ", layer, " slot ", slot));
      return Discard(h.payload_bytes);
    }
    iov_.clear();
    if (g.conv_state_bytes > 0) iov_.push_back({conv, g.conv_state_bytes});
    if (g.ssm_state_bytes > 0) iov_.push_back({ssm, g.ssm_state_bytes});
    const absl::Status st = ReadFullv(fd_, iov_.data(), iov_.size());
    tracker_.EndLayer(ticket, st.ok(), absl::StrCat("state frame cut short: ", st.message()));
    if (st.ok()) open_.insert(key);
    return st;
  }

  // GPU schemes: the same judgement as ServeLayer, with the payload moved by the channel. The
  // parts are K of each block in id order, then V (the sender's FrameSource order).
  absl::Status ServeChannelLayer(const wire::FrameHeader& h, TransferKey key) {
    const size_t bb = tracker_.geometry().block_bytes(), n = ids_.size();
    iov_.assign(2 * n, iovec{nullptr, bb});
    CLEAVE_RETURN_IF_ERROR(channel_->ReadControl(fd_, iov_.size()));
    TransferTracker::LayerTicket ticket = tracker_.BeginLayer(key, h.layer, ids_);
    if (ticket.verdict == TransferTracker::Verdict::kWrite) {
      const int layer = static_cast<int>(h.layer);
      for (size_t i = 0; i < n; ++i) {
        iov_[i].iov_base = store_.BlockData(layer, false, ids_[i]);
        iov_[n + i].iov_base = store_.BlockData(layer, true, ids_[i]);
      }
    }
    return LandThroughChannel(h, key, ticket, ticket.verdict, "layer");
  }

  // Parts: conv state, then SSM state, each only when the geometry gives it bytes.
  absl::Status ServeChannelState(const wire::FrameHeader& h, TransferKey key) {
    const KvGeometry& g = tracker_.geometry();
    iov_.clear();
    if (g.conv_state_bytes > 0) iov_.push_back({nullptr, g.conv_state_bytes});
    if (g.ssm_state_bytes > 0) iov_.push_back({nullptr, g.ssm_state_bytes});
    CLEAVE_RETURN_IF_ERROR(channel_->ReadControl(fd_, iov_.size()));
    TransferTracker::LayerTicket ticket = tracker_.BeginState(key, h.layer, h.slot);
    TransferTracker::Verdict verdict = ticket.verdict;
    if (verdict == TransferTracker::Verdict::kWrite) {
      const int layer = static_cast<int>(h.layer), slot = static_cast<int>(h.slot);
      size_t i = 0;
      for (bool is_ssm : {false, true}) {
        if ((is_ssm ? g.ssm_state_bytes : g.conv_state_bytes) == 0) continue;
        iov_[i].iov_base = store_.StateData(layer, is_ssm, slot);
        if (iov_[i++].iov_base == nullptr) verdict = TransferTracker::Verdict::kRefuse;
      }
      if (verdict != TransferTracker::Verdict::kWrite) {
        tracker_.EndLayer(
            ticket, false,
            absl::StrCat("store has no state memory for layer ", layer, " slot ", slot));
      }
    }
    return LandThroughChannel(h, key, ticket, verdict, "state");
  }

  // Lands (or drops) the parts in iov_ and ends a written frame's ticket. Only a failure that
  // leaves the connection out of step ends the connection.
  absl::Status LandThroughChannel(const wire::FrameHeader& h, TransferKey key,
                                  TransferTracker::LayerTicket& ticket,
                                  TransferTracker::Verdict verdict, const char* what) {
    const PayloadResult r = channel_->Land(fd_, h, iov_, verdict);
    if (verdict == TransferTracker::Verdict::kWrite) {
      tracker_.EndLayer(ticket, r.status.ok(),
                        absl::StrCat(what, " frame did not land: ", r.status.message()));
      if (r.status.ok()) open_.insert(key);
    }
    return r.connection_ok ? absl::OkStatus() : r.status;
  }

  // Reads and drops a payload nobody will use, through bounded scratch.
  absl::Status Discard(uint64_t n) {
    scratch_.resize(kScratchBytes);
    while (n > 0) {
      const size_t chunk = static_cast<size_t>(std::min<uint64_t>(n, scratch_.size()));
      CLEAVE_RETURN_IF_ERROR(ReadFull(fd_, scratch_.data(), chunk));
      n -= chunk;
    }
    return absl::OkStatus();
  }

  absl::Status Violation(TransferKey key, std::string why) {
    blame_ = key;
    return absl::InvalidArgumentError(std::move(why));
  }

  const int fd_;
  KvBlockStore& store_;
  TransferTracker& tracker_;
  const int io_timeout_ms_;
  const std::string& secret_;              // the receiver's options outlive every connection
  RecvPayloadPath* const payload_;         // GPU schemes; null for plain TCP
  std::unique_ptr<RecvPayloadChannel> channel_;  // this connection's, after the GPU setup
  std::optional<TransferKey> blame_;       // the transfer whose frame broke the framing
  absl::flat_hash_set<TransferKey> open_;  // wrote at least one frame, no finish yet
  std::vector<std::byte> id_bytes_;        // <= kMaxBlocksPerFrame * 4
  std::vector<int32_t> ids_;
  std::vector<iovec> iov_;
  std::vector<std::byte> scratch_;
};

std::string JoinHostPort(const std::string& host, int port) {
  return host.find(':') != std::string::npos ? absl::StrCat("[", host, "]:", port)
                                             : absl::StrCat(host, ":", port);
}

// The host address() names: advertise_host when set (a bare host or IP, IPv6 with or without
// brackets, no port: the port is always the one bound), else listen_host.
absl::StatusOr<std::string> AdvertisedHost(const TransportOptions& options) {
  if (options.advertise_host.empty()) return options.listen_host;
  std::string host = options.advertise_host;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  in6_addr v6{};
  const bool bad_char = host.empty() || host.find_first_of(" \t\r\n/[]") != std::string::npos;
  if (bad_char ||
      (host.find(':') != std::string::npos && inet_pton(AF_INET6, host.c_str(), &v6) != 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv receiver: advertise_host '", options.advertise_host,
        "' is not a host name or IP address (give the host only; the port is the one bound)"));
  }
  return host;
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvReceiver>> TcpReceiver::Create(
    const TransportOptions& options, KvBlockStore& store, ReceiverCallbacks callbacks,
    std::unique_ptr<RecvPayloadPath> payload) {
  if (absl::Status s = CheckGeometry(store.geometry(), /*receiver=*/true); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("kv receiver: store geometry: ", s.message()));
  }
  if (options.io_timeout_ms <= 0) return absl::InvalidArgumentError("io_timeout_ms must be > 0");
  CLEAVE_ASSIGN_OR_RETURN(const std::string host, AdvertisedHost(options));
  std::unique_ptr<TcpReceiver> r(
      new TcpReceiver(options, store, std::move(callbacks), std::move(payload)));
  int port = 0;
  CLEAVE_ASSIGN_OR_RETURN(r->listen_fd_,
                          ListenTcp({options.listen_host, options.listen_port}, &port));
  r->address_ =
      absl::StrCat(r->payload_ ? r->payload_->prefix() : "", JoinHostPort(host, port));
  r->wake_fd_ = UniqueFd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!r->wake_fd_.valid()) return absl::InternalError("eventfd failed");
  r->accept_thread_ = std::thread([p = r.get()] { p->AcceptLoop(); });
  return std::unique_ptr<KvReceiver>(std::move(r));
}

TcpReceiver::TcpReceiver(const TransportOptions& options, KvBlockStore& store,
                         ReceiverCallbacks callbacks, std::unique_ptr<RecvPayloadPath> payload)
    : options_(options),
      store_(store),
      tracker_(store.geometry(), std::move(callbacks)),
      payload_(std::move(payload)) {}

TcpReceiver::~TcpReceiver() {
  tracker_.Silence();
  {
    std::lock_guard lock(mu_);
    stopping_ = true;
  }
  Wake();
  if (accept_thread_.joinable()) accept_thread_.join();
  // No new connections now. shutdown() wakes each thread's poll/recv without freeing its fd.
  std::lock_guard lock(mu_);
  for (auto& c : connections_) shutdown(c->fd.get(), SHUT_RDWR);
  for (auto& c : connections_) c->thread.join();
  connections_.clear();
}

void TcpReceiver::Expect(uint64_t request_id, uint32_t attempt, std::vector<int32_t> blocks,
                         int state_slot) {
  tracker_.Expect({request_id, attempt}, std::move(blocks), state_slot);
}

void TcpReceiver::ForgetAll() { tracker_.ForgetAll(); }

void TcpReceiver::Forget(uint64_t request_id, uint32_t attempt) {
  tracker_.Forget({request_id, attempt});
}

void TcpReceiver::Wake() {
  const uint64_t one = 1;
  // A full counter still wakes the poller, so a failed write loses nothing.
  [[maybe_unused]] ssize_t n = write(wake_fd_.get(), &one, sizeof(one));
}

void TcpReceiver::AcceptLoop() {
  for (;;) {
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {wake_fd_.get(), POLLIN, 0}};
    if (poll(fds, 2, -1) < 0 && errno != EINTR) {
      CLEAVE_LOG(Error) << "kv receiver: poll failed, no longer accepting: " << errno;
      return;
    }
    std::lock_guard lock(mu_);
    if (stopping_) return;
    if (fds[1].revents != 0) {
      uint64_t drained;
      [[maybe_unused]] ssize_t n = read(wake_fd_.get(), &drained, sizeof(drained));
    }
    ReapFinishedLocked();
    if ((fds[0].revents & POLLIN) == 0) continue;
    UniqueFd fd(accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!fd.valid()) continue;  // the peer gave up already, or a transient error
    if (connections_.size() >= kMaxConnections) {
      CLEAVE_LOG(Warning) << "kv receiver: refusing connection beyond " << kMaxConnections;
      continue;
    }
    auto c = std::make_unique<Connection>();
    c->fd = std::move(fd);
    Connection* raw = c.get();
    c->thread = std::thread([this, raw] {
      ConnectionServer(raw->fd.get(), store_, tracker_, options_, payload_.get()).Run();
      // Tell the sender at once; the fd itself is closed when the accept loop reaps us.
      shutdown(raw->fd.get(), SHUT_RDWR);
      raw->finished.store(true);
      Wake();
    });
    connections_.push_back(std::move(c));
  }
}

void TcpReceiver::ReapFinishedLocked() {
  for (auto it = connections_.begin(); it != connections_.end();) {
    if ((*it)->finished.load()) {
      (*it)->thread.join();
      it = connections_.erase(it);
    } else {
      ++it;
    }
  }
}

}  // namespace cleave::transport
