// Authentication of TCP KV transport connections by a cluster secret (services/transport/src/
// auth.h), over real loopback sockets: matching secrets transfer, a wrong or missing secret on
// either side fails with Unauthenticated and writes nothing, a peer that skips, forges, replays
// or reflects its proof is closed before any frame is read, a peer that stalls mid-exchange is
// dropped after the io timeout without holding up anyone else, and the secret never reaches a
// log line or a status. The auth messages here are encoded by hand from the layout in auth.h,
// so they also pin that wire format. Also: address() reports advertise_host.
#include <arpa/inet.h>
#include <gmock/gmock.h>
#include "wire_bytes.h"
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "cleave/transport/kv_transport.h"
#include "unit/kv_transport_test_util.h"

namespace cleave::transport {
namespace {

using namespace testing_util;  // NOLINT: test helpers only
using ::testing::HasSubstr;
using wire_test::Bytes;
using Clock = std::chrono::steady_clock;

constexpr std::string_view kSecret = "cluster-secret/0123456789abcdef0123456789abcdef";
constexpr std::string_view kOtherSecret = "other-secret/fedcba9876543210fedcba9876543210";

// auth.h: 0 magic u32 "CKVA" | 4 version u16 (1) | 6 kind u16 | 8 body [32].
constexpr uint32_t kAuthMagic = 0x41564b43;
constexpr uint16_t kOpen = 1, kChallenge = 2, kProof = 3, kConfirm = 4, kDenied = 5, kNoAuth = 6;
constexpr size_t kAuthBytes = 40;
constexpr std::string_view kSenderLabel = "cleave-kv-auth-v1 sender";
constexpr std::string_view kReceiverLabel = "cleave-kv-auth-v1 receiver";
// frame.h, unchanged by authentication.
constexpr uint32_t kHelloMagic = 0x31564b43;
constexpr uint32_t kFrameMagic = 0x46564b43;
constexpr uint16_t kWireVersion = 2;

using wire_test::Get;
using wire_test::Put;
Bytes Cat(Bytes a, const Bytes& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

Bytes AuthMessage(uint16_t kind, const Bytes& body, uint16_t version = 1) {
  Bytes b;
  Put(b, kAuthMagic, 4);
  Put(b, version, 2);
  Put(b, kind, 2);
  b.insert(b.end(), body.begin(), body.end());
  b.resize(kAuthBytes, std::byte{0});
  return b;
}
struct AuthReply {
  uint32_t magic = 0;
  uint16_t version = 0;
  uint16_t kind = 0;
  Bytes body;
};
AuthReply ParseAuth(const Bytes& b) {
  return {static_cast<uint32_t>(Get(b, 0, 4)), static_cast<uint16_t>(Get(b, 4, 2)),
          static_cast<uint16_t>(Get(b, 6, 2)), Bytes(b.begin() + 8, b.begin() + kAuthBytes)};
}

// HMAC-SHA256(secret, label || a || b || wire version u16 LE), as auth.h defines the proofs.
Bytes Mac(std::string_view secret, std::string_view label, const Bytes& a, const Bytes& b,
          uint16_t wire_version = kWireVersion) {
  Bytes msg;
  for (char c : label) msg.push_back(static_cast<std::byte>(c));
  msg = Cat(Cat(std::move(msg), a), b);
  Put(msg, wire_version, 2);
  Bytes mac(32);
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
       reinterpret_cast<const unsigned char*>(msg.data()), msg.size(),
       reinterpret_cast<unsigned char*>(mac.data()), &len);
  EXPECT_EQ(len, 32u);
  return mac;
}

Bytes Nonce(uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes n(32);
  for (auto& b : n) b = static_cast<std::byte>(rng());
  return n;
}

// A version 2 hello for a KV-only geometry (48 bytes).
Bytes HelloFor(const KvGeometry& g) {
  Bytes b;
  for (auto [v, n] : {std::pair<uint64_t, int>{kHelloMagic, 4},
                      {kWireVersion, 2},
                      {0, 2},
                      {static_cast<uint64_t>(g.num_layers), 4},
                      {0, 4},
                      {g.block_bytes(), 8},
                      {0, 8},
                      {0, 8},
                      {0, 8}}) {
    Put(b, v, n);
  }
  return b;
}
Bytes FrameHeader(uint16_t type, uint64_t req, uint32_t layer, uint32_t n_blocks,
                  uint64_t payload) {
  Bytes b;
  for (auto [v, n] : {std::pair<uint64_t, int>{kFrameMagic, 4},
                      {type, 2},
                      {0, 2},
                      {req, 8},
                      {0, 4},
                      {layer, 4},
                      {n_blocks, 4},
                      {0, 4},
                      {payload, 8}}) {
    Put(b, v, n);
  }
  return b;
}
// Every layer of a transfer (LAYER frames of PatternByte(req) data), then FINISH.
Bytes TransferFrames(const KvGeometry& g, uint64_t req, const std::vector<int32_t>& ids) {
  Bytes b;
  const size_t bb = g.block_bytes();
  for (int layer = 0; layer < g.num_layers; ++layer) {
    b = Cat(std::move(b),
            FrameHeader(1, req, layer, static_cast<uint32_t>(ids.size()), 2 * ids.size() * bb));
    for (int32_t id : ids) Put(b, static_cast<uint32_t>(id), 4);
    for (bool v : {false, true}) {
      for (int32_t id : ids) {
        for (size_t i = 0; i < bb; ++i) b.push_back(PatternByte(req, layer, id, v, i));
      }
    }
  }
  return Cat(std::move(b), FrameHeader(2, req, 0, 0, 0));
}

// A raw TCP peer that says whatever the test tells it to.
class RawPeer {
 public:
  explicit RawPeer(int port) : fd_(socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  }
  ~RawPeer() { close(fd_); }
  bool connected() const { return connected_; }
  void Send(const Bytes& b) { SendPrefix(b, b.size()); }
  // Errors ignored: the receiver may hang up.
  void SendPrefix(const Bytes& b, size_t len) {
    size_t off = 0;
    while (off < len) {
      const ssize_t n = send(fd_, b.data() + off, len - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += static_cast<size_t>(n);
    }
  }
  // Exactly n bytes, or nullopt when the peer hangs up or `timeout` passes first.
  std::optional<Bytes> Recv(size_t n, milliseconds timeout = milliseconds(5000)) {
    Bytes b(n);
    size_t got = 0;
    const auto deadline = Clock::now() + timeout;
    while (got < n) {
      const auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
      pollfd p{fd_, POLLIN, 0};
      if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0) return std::nullopt;
      const ssize_t r = recv(fd_, b.data() + got, n - got, 0);
      if (r <= 0) return std::nullopt;
      got += static_cast<size_t>(r);
    }
    return b;
  }
  std::optional<AuthReply> RecvAuth() {
    std::optional<Bytes> b = Recv(kAuthBytes);
    if (!b) return std::nullopt;
    return ParseAuth(*b);
  }
  // True once the receiver has closed its end (EOF or reset) within `timeout`.
  bool WaitClosed(milliseconds timeout = milliseconds(5000)) {
    const auto deadline = Clock::now() + timeout;
    char buf[256];
    while (Clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 20) <= 0) continue;
      if (recv(fd_, buf, sizeof(buf), 0) <= 0) return true;
    }
    return false;
  }

 private:
  int fd_;
  bool connected_ = false;
};

int PortOf(const std::string& address) { return std::stoi(address.substr(address.rfind(':') + 1)); }

// A listening socket on loopback for fake receivers.
struct Listener {
  Listener() : fd(socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    EXPECT_EQ(listen(fd, 4), 0);
    socklen_t len = sizeof(a);
    getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    address = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  }
  ~Listener() { close(fd); }
  int fd;
  std::string address;
};

class KvAuthTest : public ::testing::Test {
 protected:
  void SetUp() override { geometry_ = TestGeometry(/*num_layers=*/3, /*num_blocks=*/64); }

  TransportOptions Options(std::string_view secret, int io_timeout_ms = 300) const {
    TransportOptions o;
    o.geometry = geometry_;
    o.connect_timeout_ms = 1000;
    o.io_timeout_ms = io_timeout_ms;  // short, so stalls are detected quickly
    o.secret = std::string(secret);
    return o;
  }

  void StartReceiver(std::string_view secret, int io_timeout_ms = 300) {
    receiver_.reset();
    store_ = std::make_unique<TestStore>(geometry_);
    auto r = CreateKvReceiver("tcp", Options(secret, io_timeout_ms), *store_, events_.Callbacks());
    ASSERT_TRUE(r.ok()) << r.status();
    receiver_ = std::move(*r);
    peer_ = receiver_->address();
    port_ = PortOf(peer_);
  }

  // Every layer of `req`, then Finish: the first error, else Finish's status.
  absl::Status Transfer(KvSender& sender, uint64_t req, const std::vector<int32_t>& blocks) {
    absl::Status first;
    for (int layer = 0; layer < geometry_.num_layers; ++layer) {
      absl::Status st = SendOneLayer(sender, peer_, geometry_, req, 0, layer, blocks, req);
      if (first.ok()) first = st;
    }
    absl::Status fin = FinishAndWait(sender, peer_, req, 0);
    return first.ok() ? fin : first;
  }

  void ExpectTransferWorks(std::string_view secret, uint64_t req,
                           const std::vector<int32_t>& blocks) {
    std::unique_ptr<KvSender> sender = CreateKvSender(Options(secret));
    receiver_->Expect(req, 0, blocks);
    const absl::Status st = Transfer(*sender, req, blocks);
    ASSERT_TRUE(st.ok()) << st;
    ASSERT_TRUE(events_.WaitReady(req, 0));
    for (int layer = 0; layer < geometry_.num_layers; ++layer) {
      EXPECT_TRUE(LayerMatches(*store_, req, layer, blocks)) << layer;
    }
  }

  // Nothing landed and nothing was reported for `req` (waiting a little for stragglers).
  void ExpectNothingHappened(uint64_t req) {
    std::this_thread::sleep_for(milliseconds(100));
    EXPECT_TRUE(store_->AllUntouched());
    EXPECT_EQ(events_.ReadyCount(req, 0), 0);
    EXPECT_EQ(events_.FailedCount(req, 0), 0);
  }

  // Reads the receiver's CHALLENGE and answers OPEN(ns): returns Nr, empty on failure.
  static Bytes Open(RawPeer& c, const Bytes& ns) {
    std::optional<AuthReply> challenge = c.RecvAuth();
    if (!challenge) return {};
    EXPECT_EQ(challenge->magic, kAuthMagic);
    EXPECT_EQ(challenge->version, 1);
    EXPECT_EQ(challenge->kind, kChallenge);
    c.Send(AuthMessage(kOpen, ns));
    return challenge->body;
  }
  // Sends PROOF(proof): the kind of the receiver's reply (its body in *body), -1 on hang-up.
  static int Prove(RawPeer& c, const Bytes& proof, Bytes* body = nullptr) {
    c.Send(AuthMessage(kProof, proof));
    std::optional<AuthReply> reply = c.RecvAuth();
    if (!reply) return -1;
    if (body) *body = reply->body;
    return reply->kind;
  }

  KvGeometry geometry_;
  Events events_;
  std::unique_ptr<TestStore> store_;
  std::unique_ptr<KvReceiver> receiver_;
  std::string peer_;
  int port_ = 0;
};

std::string Message(const absl::Status& s) { return std::string(s.message()); }

bool MentionsASecret(std::string_view text) {
  return text.find(kSecret) != std::string_view::npos ||
         text.find(kOtherSecret) != std::string_view::npos;
}

TEST_F(KvAuthTest, MatchingSecretsTransfer) {
  StartReceiver(kSecret);
  ExpectTransferWorks(kSecret, 1, {3, 1, 4});
  // Blocks nobody sent stay as they were.
  for (int layer = 0; layer < geometry_.num_layers; ++layer) {
    EXPECT_TRUE(store_->BlockUntouched(layer, false, 2) && store_->BlockUntouched(layer, true, 2));
  }
  // One authenticated connection carries many transfers.
  std::unique_ptr<KvSender> sender = CreateKvSender(Options(kSecret));
  for (uint64_t req = 10; req < 15; ++req) {
    const std::vector<int32_t> blocks = {static_cast<int32_t>(req), static_cast<int32_t>(req + 20)};
    receiver_->Expect(req, 0, blocks);
    ASSERT_TRUE(Transfer(*sender, req, blocks).ok());
    ASSERT_TRUE(events_.WaitReady(req, 0));
  }
}

TEST_F(KvAuthTest, WrongSecretFailsWritesNothingAndTheReceiverServesTheRightPeerAfter) {
  StartReceiver(kSecret);
  const std::vector<int32_t> blocks = {5, 6};
  receiver_->Expect(1, 0, blocks);
  ::testing::internal::CaptureStderr();
  std::unique_ptr<KvSender> wrong = CreateKvSender(Options(kOtherSecret));
  const auto start = Clock::now();
  const absl::Status st = SendOneLayer(*wrong, peer_, geometry_, 1, 0, 0, blocks, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnauthenticated) << st;
  EXPECT_THAT(Message(st), HasSubstr("authentication"));
  EXPECT_THAT(Message(st), HasSubstr("secrets differ"));
  EXPECT_FALSE(MentionsASecret(Message(st)));
  // Later sends re-dial and fail the same way; Finish reports it and runs its callback.
  EXPECT_EQ(SendOneLayer(*wrong, peer_, geometry_, 1, 0, 1, blocks, 1).code(),
            absl::StatusCode::kUnauthenticated);
  const absl::Status fin = FinishAndWait(*wrong, peer_, 1, 0);
  EXPECT_EQ(fin.code(), absl::StatusCode::kUnauthenticated) << fin;
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
  ExpectNothingHappened(1);
  std::this_thread::sleep_for(milliseconds(200));  // the receiver logs after it hangs up
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_THAT(log, HasSubstr("authentication"));  // the receiver says why it dropped the peer
  EXPECT_FALSE(MentionsASecret(log)) << log;

  // The agreement still stands, and the right peer fulfils it over the same receiver.
  std::unique_ptr<KvSender> right = CreateKvSender(Options(kSecret));
  ASSERT_TRUE(Transfer(*right, 1, blocks).ok());
  ASSERT_TRUE(events_.WaitReady(1, 0));
  for (int layer = 0; layer < geometry_.num_layers; ++layer) {
    EXPECT_TRUE(LayerMatches(*store_, 1, layer, blocks));
  }
}

TEST_F(KvAuthTest, SecretOnOneSideOnlyFailsCleanlyAndAtOnce) {
  // A long io timeout: neither side may find out by waiting for it.
  constexpr int kLongIoMs = 5000;
  const std::vector<int32_t> blocks = {7};
  struct Case {
    std::string_view receiver_secret, sender_secret, says;
    uint64_t req;
  };
  for (const Case& k : {Case{"", kSecret, "no cluster secret", 2},
                        Case{kSecret, "", "requires the cluster secret", 4}}) {
    SCOPED_TRACE(k.says);
    StartReceiver(k.receiver_secret, kLongIoMs);
    receiver_->Expect(k.req, 0, blocks);
    std::unique_ptr<KvSender> sender = CreateKvSender(Options(k.sender_secret, kLongIoMs));
    const auto start = Clock::now();
    const absl::Status st = SendOneLayer(*sender, peer_, geometry_, k.req, 0, 0, blocks, k.req);
    EXPECT_EQ(st.code(), absl::StatusCode::kUnauthenticated) << st;
    EXPECT_THAT(Message(st), HasSubstr(k.says));
    const absl::Status fin = FinishAndWait(*sender, peer_, k.req, 0);
    EXPECT_EQ(fin.code(), absl::StatusCode::kUnauthenticated) << fin;
    EXPECT_LT(Clock::now() - start, std::chrono::seconds(1));
    ExpectNothingHappened(k.req);
    // A sender configured like the receiver still gets through.
    ExpectTransferWorks(k.receiver_secret, k.req + 1, blocks);
  }
}

TEST_F(KvAuthTest, HandWrittenPeerWithTheSecretCompletesATransfer) {
  StartReceiver(kSecret);
  const std::vector<int32_t> blocks = {9, 2};
  receiver_->Expect(4, 0, blocks);
  RawPeer c(port_);
  const Bytes ns = Nonce(1);
  const Bytes nr = Open(c, ns);
  ASSERT_EQ(nr.size(), 32u);
  Bytes confirm;
  ASSERT_EQ(Prove(c, Mac(kSecret, kSenderLabel, nr, ns), &confirm), kConfirm);
  EXPECT_EQ(confirm, Mac(kSecret, kReceiverLabel, ns, nr));  // the receiver proves it too
  c.Send(HelloFor(geometry_));
  std::optional<Bytes> ack = c.Recv(48);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(Get(*ack, 0, 4), kHelloMagic);
  EXPECT_EQ(Get(*ack, 6, 2), 0u);  // status kOk
  c.Send(TransferFrames(geometry_, 4, blocks));
  ASSERT_TRUE(events_.WaitReady(4, 0));
  for (int layer = 0; layer < geometry_.num_layers; ++layer) {
    EXPECT_TRUE(LayerMatches(*store_, 4, layer, blocks));
  }
}

TEST_F(KvAuthTest, PeersThatSkipAuthenticationAreClosedBeforeAnyFrame) {
  StartReceiver(kSecret);
  const std::vector<int32_t> blocks = {10, 11};
  const Bytes frames = TransferFrames(geometry_, 5, blocks);
  struct Case {
    const char* name;
    Bytes bytes;  // all sent at once, without waiting for the receiver
  };
  const std::vector<Case> cases = {
      {"valid hello and frames, no auth", Cat(HelloFor(geometry_), frames)},
      {"frames only", frames},
      {"open, then a hello and frames instead of a proof",
       Cat(Cat(AuthMessage(kOpen, Nonce(2)), HelloFor(geometry_)), frames)},
      {"open, then a forged proof, hello and frames",
       Cat(Cat(Cat(AuthMessage(kOpen, Nonce(3)), AuthMessage(kProof, Nonce(4))),
               HelloFor(geometry_)),
           frames)},
      {"open of another auth version", Cat(AuthMessage(kOpen, Nonce(5), /*version=*/2), frames)},
      {"proof first", Cat(AuthMessage(kProof, Nonce(6)), frames)},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    store_->Reset();
    receiver_->Expect(5, 0, blocks);
    RawPeer c(port_);
    ASSERT_TRUE(c.connected());
    c.Send(k.bytes);
    // The receiver speaks first, and says only CHALLENGE (and DENIED where it read an OPEN).
    std::optional<AuthReply> challenge = c.RecvAuth();
    ASSERT_TRUE(challenge.has_value());
    EXPECT_EQ(challenge->magic, kAuthMagic);
    EXPECT_EQ(challenge->kind, kChallenge);
    EXPECT_TRUE(c.WaitClosed());
    ExpectNothingHappened(5);
  }
  ExpectTransferWorks(kSecret, 6, blocks);
}

TEST_F(KvAuthTest, ReplayedReflectedOrMisboundProofsAreDenied) {
  StartReceiver(kSecret);
  const std::vector<int32_t> blocks = {12};
  receiver_->Expect(7, 0, blocks);
  // A genuine exchange, recorded.
  const Bytes ns = Nonce(7);
  Bytes recorded_nr, recorded_proof;
  {
    RawPeer c(port_);
    recorded_nr = Open(c, ns);
    recorded_proof = Mac(kSecret, kSenderLabel, recorded_nr, ns);
    ASSERT_EQ(Prove(c, recorded_proof), kConfirm);
  }
  struct Case {
    const char* name;
    // The proof to send, given the receiver's fresh Nr and our Ns.
    std::function<Bytes(const Bytes& nr, const Bytes& ns)> proof;
  };
  const std::vector<Case> cases = {
      {"replayed proof of an earlier connection",
       [&](const Bytes&, const Bytes&) { return recorded_proof; }},
      {"receiver's label (reflection)",
       [](const Bytes& nr, const Bytes& ns) { return Mac(kSecret, kReceiverLabel, ns, nr); }},
      {"receiver's label, sender's order",
       [](const Bytes& nr, const Bytes& ns) { return Mac(kSecret, kReceiverLabel, nr, ns); }},
      {"nonces swapped",
       [](const Bytes& nr, const Bytes& ns) { return Mac(kSecret, kSenderLabel, ns, nr); }},
      {"bound to another wire version",
       [](const Bytes& nr, const Bytes& ns) { return Mac(kSecret, kSenderLabel, nr, ns, 1); }},
      {"wrong secret",
       [](const Bytes& nr, const Bytes& ns) { return Mac(kOtherSecret, kSenderLabel, nr, ns); }},
      {"empty secret",
       [](const Bytes& nr, const Bytes& ns) { return Mac("", kSenderLabel, nr, ns); }},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    RawPeer c(port_);
    const Bytes nr = Open(c, ns);
    ASSERT_EQ(nr.size(), 32u);
    EXPECT_NE(nr, recorded_nr);  // fresh per connection
    EXPECT_EQ(Prove(c, k.proof(nr, ns)), kDenied);
    c.Send(Cat(HelloFor(geometry_), TransferFrames(geometry_, 7, blocks)));
    EXPECT_TRUE(c.WaitClosed());
  }
  {
    SCOPED_TRACE("the receiver's own nonce echoed as ours");
    RawPeer c(port_);
    std::optional<AuthReply> challenge = c.RecvAuth();
    ASSERT_TRUE(challenge.has_value());
    c.Send(AuthMessage(kOpen, challenge->body));
    EXPECT_EQ(Prove(c, Mac(kSecret, kSenderLabel, challenge->body, challenge->body)), kDenied);
    EXPECT_TRUE(c.WaitClosed());
  }
  ExpectNothingHappened(7);
}

TEST_F(KvAuthTest, StalledPeersMidAuthenticationAreDroppedWithoutBlockingOthers) {
  constexpr int kIoMs = 1000;
  StartReceiver(kSecret, kIoMs);
  const auto start = Clock::now();
  RawPeer silent(port_);  // connects, never says a word
  RawPeer half_open(port_);
  half_open.SendPrefix(AuthMessage(kOpen, Nonce(8)), 20);
  RawPeer no_proof(port_);
  ASSERT_EQ(Open(no_proof, Nonce(9)).size(), 32u);
  RawPeer half_proof(port_);
  const Bytes nr = Open(half_proof, Nonce(10));
  half_proof.SendPrefix(AuthMessage(kProof, Mac(kSecret, kSenderLabel, nr, Nonce(10))), 30);

  // Meanwhile a good peer goes straight through.
  std::unique_ptr<KvSender> sender = CreateKvSender(Options(kSecret, kIoMs));
  receiver_->Expect(8, 0, {1, 2});
  ASSERT_TRUE(Transfer(*sender, 8, {1, 2}).ok());
  ASSERT_TRUE(events_.WaitReady(8, 0));
  EXPECT_LT(Clock::now() - start, milliseconds(kIoMs / 2));

  for (RawPeer* c : {&silent, &half_open, &no_proof, &half_proof}) {
    EXPECT_TRUE(c->WaitClosed(milliseconds(5000)));
  }
  EXPECT_GE(Clock::now() - start, milliseconds(kIoMs * 9 / 10));  // dropped by the io timeout
  ExpectTransferWorks(kSecret, 9, {3});
}

TEST_F(KvAuthTest, SenderGivesUpOnAReceiverThatStallsMidAuthentication) {
  // One fake receiver never challenges; the other challenges, takes the proof, never confirms.
  for (bool challenges : {false, true}) {
    SCOPED_TRACE(challenges ? "never confirms" : "never challenges");
    Listener l;
    std::promise<void> release;
    std::thread fake([&, released = release.get_future()] {
      const int c = accept(l.fd, nullptr, nullptr);
      if (challenges) {
        const Bytes challenge = AuthMessage(kChallenge, Nonce(11));
        send(c, challenge.data(), challenge.size(), MSG_NOSIGNAL);
        std::byte in[2 * kAuthBytes];
        recv(c, in, sizeof(in), MSG_WAITALL);  // OPEN and PROOF
      }
      released.wait_for(std::chrono::seconds(10));
      close(c);
    });
    std::unique_ptr<KvSender> sender = CreateKvSender(Options(kSecret, /*io_timeout_ms=*/300));
    const auto start = Clock::now();
    const absl::Status st = SendOneLayer(*sender, l.address, geometry_, 1, 0, 0, {1}, 1);
    EXPECT_EQ(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
    EXPECT_THAT(Message(st), HasSubstr("authentication"));
    EXPECT_LT(Clock::now() - start, std::chrono::seconds(2));
    EXPECT_FALSE(FinishAndWait(*sender, l.address, 1, 0).ok());
    release.set_value();
    fake.join();
  }
}

TEST_F(KvAuthTest, ReceiverWithoutSecretAnswersOpenWithNoAuth) {
  StartReceiver("");
  RawPeer c(port_);
  c.Send(AuthMessage(kOpen, Nonce(12)));
  std::optional<AuthReply> reply = c.RecvAuth();
  ASSERT_TRUE(reply.has_value());
  EXPECT_EQ(reply->magic, kAuthMagic);
  EXPECT_EQ(reply->kind, kNoAuth);
  EXPECT_EQ(reply->body, Bytes(32));
  EXPECT_TRUE(c.WaitClosed());
  // And without a secret the wire is as before: the sender speaks first, with its Hello.
  RawPeer plain(port_);
  EXPECT_FALSE(plain.Recv(1, milliseconds(100)).has_value());
  plain.Send(HelloFor(geometry_));
  std::optional<Bytes> ack = plain.Recv(48);
  ASSERT_TRUE(ack.has_value());
  EXPECT_EQ(Get(*ack, 0, 4), kHelloMagic);
}

TEST_F(KvAuthTest, AddressReportsTheAdvertisedHost) {
  store_ = std::make_unique<TestStore>(geometry_);
  struct Case {
    std::string advertise, reported_host;
  };
  for (const Case& k :
       {Case{"", "127.0.0.1"}, Case{"kv-decode-0.cleave.svc", "kv-decode-0.cleave.svc"},
        Case{"10.1.2.3", "10.1.2.3"}, Case{"::1", "[::1]"}, Case{"[fd00::5]", "[fd00::5]"}}) {
    SCOPED_TRACE(k.advertise);
    TransportOptions o = Options(kSecret);
    o.advertise_host = k.advertise;
    auto r = CreateKvReceiver("tcp", o, *store_, events_.Callbacks());
    ASSERT_TRUE(r.ok()) << r.status();
    const std::string address = (*r)->address();
    EXPECT_EQ(address.substr(0, address.rfind(':')), k.reported_host);
    // The port is the bound one: dialling it on the listen host gets through.
    receiver_ = std::move(*r);
    peer_ = "127.0.0.1:" + std::to_string(PortOf(address));
    store_->Reset();
    ExpectTransferWorks(kSecret, 20 + k.advertise.size(), {4});
    receiver_.reset();
  }
  for (const char* bad : {"kv-0:7000", "a host", "[::1]:7000", "fd00::zz"}) {
    SCOPED_TRACE(bad);
    TransportOptions o = Options("");
    o.advertise_host = bad;
    auto r = CreateKvReceiver("tcp", o, *store_, events_.Callbacks());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST_F(KvAuthTest, InprocTransfersNeedNoSecret) {
  // Same process, no connection: the secret is ignored on both ends.
  TestStore store(geometry_);
  auto r = CreateKvReceiver("inproc://auth-test", Options(kSecret), store, events_.Callbacks());
  ASSERT_TRUE(r.ok()) << r.status();
  std::unique_ptr<KvSender> sender = CreateKvSender(Options(kOtherSecret));
  const std::vector<int32_t> blocks = {1, 2};
  (*r)->Expect(30, 0, blocks);
  for (int layer = 0; layer < geometry_.num_layers; ++layer) {
    ASSERT_TRUE(
        SendOneLayer(*sender, "inproc://auth-test", geometry_, 30, 0, layer, blocks, 30).ok());
  }
  ASSERT_TRUE(FinishAndWait(*sender, "inproc://auth-test", 30, 0).ok());
  ASSERT_TRUE(events_.WaitReady(30, 0));
  EXPECT_TRUE(LayerMatches(store, 30, 0, blocks));
}

}  // namespace
}  // namespace cleave::transport
