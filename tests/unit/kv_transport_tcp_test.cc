// The TCP backend at the wire: unreachable and stalled peers must fail the sender with an
// error (never a hang), and a hand-written client speaking garbage, lying lengths or stalling
// mid-frame must not crash, hang or write through the receiver, which keeps serving good
// transfers afterwards. The frames here are encoded by hand from the layout in frame.h, so they
// also pin the wire format (version 2: STATE frames and the state layout in the hello).
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <random>
#include <thread>
#include <utility>

#include "cleave/transport/kv_transport.h"
#include "unit/kv_transport_test_util.h"

namespace cleave::transport {
namespace {

using namespace testing_util;  // NOLINT: test helpers only
using Clock = std::chrono::steady_clock;

constexpr uint32_t kHelloMagic = 0x31564b43;
constexpr uint32_t kFrameMagic = 0x46564b43;
constexpr uint16_t kLayer = 1, kFinish = 2, kState = 3;
constexpr uint16_t kWireVersion = 2;

void Put(std::vector<std::byte>& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<std::byte>(v >> (8 * i)));
}

// The hello's state fields: which layers carry state (FNV-1a 64 over their u32 LE indices),
// and a slot's conv and SSM bytes.
struct StateLayout {
  uint32_t num_state_layers = 0;
  uint64_t conv_bytes = 0;
  uint64_t ssm_bytes = 0;
  uint64_t layers_hash = 0;
};
StateLayout LayoutOf(const KvGeometry& g) {
  StateLayout s;
  uint64_t h = 0xcbf29ce484222325ull;
  for (int l : StateLayers(g)) {
    for (int i = 0; i < 4; ++i) {
      h ^= static_cast<uint8_t>(static_cast<uint32_t>(l) >> (8 * i));
      h *= 0x100000001b3ull;
    }
  }
  s.num_state_layers = static_cast<uint32_t>(StateLayers(g).size());
  if (s.num_state_layers > 0) {
    s.conv_bytes = g.conv_state_bytes, s.ssm_bytes = g.ssm_state_bytes, s.layers_hash = h;
  }
  return s;
}

// A version 2 hello (48 bytes); version 1 stopped after block_bytes (24 bytes).
std::vector<std::byte> Hello(uint32_t layers, uint64_t block_bytes, uint32_t magic = kHelloMagic,
                             StateLayout state = {}, uint16_t version = kWireVersion) {
  std::vector<std::byte> b;
  for (auto [v, n] : {std::pair<uint64_t, int>{magic, 4},
                      {version, 2},
                      {0, 2},
                      {layers, 4},
                      {state.num_state_layers, 4},
                      {block_bytes, 8}}) {
    Put(b, v, n);
  }
  if (version >= 2) {
    for (uint64_t v : {state.conv_bytes, state.ssm_bytes, state.layers_hash}) Put(b, v, 8);
  }
  return b;
}
std::vector<std::byte> HelloFor(const KvGeometry& g) {
  return Hello(static_cast<uint32_t>(g.num_layers), KvLayers(g).empty() ? 0 : g.block_bytes(),
               kHelloMagic, LayoutOf(g));
}

struct Header {
  uint32_t magic = kFrameMagic;
  uint16_t type = kLayer;
  uint64_t request_id = 0;
  uint32_t attempt = 0;
  uint32_t layer = 0;
  uint32_t n_blocks = 0;
  uint64_t payload_bytes = 0;
  uint32_t slot = 0;  // STATE frames
};
std::vector<std::byte> Encode(const Header& h) {
  std::vector<std::byte> b;
  for (auto [v, n] : {std::pair<uint64_t, int>{h.magic, 4},
                      {h.type, 2},
                      {0, 2},
                      {h.request_id, 8},
                      {h.attempt, 4},
                      {h.layer, 4},
                      {h.n_blocks, 4},
                      {h.slot, 4},
                      {h.payload_bytes, 8}}) {
    Put(b, v, n);
  }
  return b;
}

// A full STATE frame: header, conv state, SSM state, bytes from StateByte(seed).
// `payload_delta` lies about (and changes) the payload's length.
std::vector<std::byte> StateFrame(const KvGeometry& g, uint64_t req, uint32_t layer, uint32_t slot,
                                  uint64_t seed, int64_t payload_delta = 0) {
  const uint64_t n = g.conv_state_bytes + g.ssm_state_bytes + payload_delta;
  std::vector<std::byte> b =
      Encode({.type = kState, .request_id = req, .layer = layer, .payload_bytes = n, .slot = slot});
  for (size_t i = 0; i < n; ++i) {
    const bool ssm = i >= g.conv_state_bytes;
    b.push_back(StateByte(seed, static_cast<int>(layer), static_cast<int>(slot), ssm,
                          ssm ? i - g.conv_state_bytes : i));
  }
  return b;
}

// A full LAYER frame: header, ids, K blocks, V blocks, bytes from PatternByte(seed).
std::vector<std::byte> LayerFrame(const KvGeometry& g, uint64_t req, uint32_t layer,
                                  const std::vector<int32_t>& ids, uint64_t seed) {
  const size_t bb = g.block_bytes();
  std::vector<std::byte> b = Encode({.request_id = req,
                                     .layer = layer,
                                     .n_blocks = static_cast<uint32_t>(ids.size()),
                                     .payload_bytes = 2 * ids.size() * bb});
  for (int32_t id : ids) Put(b, static_cast<uint32_t>(id), 4);
  for (bool v : {false, true}) {
    for (int32_t id : ids) {
      for (size_t i = 0; i < bb; ++i)
        b.push_back(PatternByte(seed, static_cast<int>(layer), id, v, i));
    }
  }
  return b;
}

// A raw TCP client that says whatever the test tells it to.
class RawClient {
 public:
  explicit RawClient(int port) : fd_(socket(AF_INET, SOCK_STREAM, 0)) {
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  }
  ~RawClient() { close(fd_); }
  bool connected() const { return connected_; }
  void Send(const std::vector<std::byte>& b) { SendPrefix(b, b.size()); }
  // The first `len` bytes of `b` only: a frame cut short. Errors ignored: the receiver may hang
  // up. (Not resize(): GCC's -Wstringop-overflow misjudges a shrinking resize under ASan.)
  void SendPrefix(const std::vector<std::byte>& b, size_t len) {
    size_t off = 0;
    while (off < len) {
      const ssize_t n = send(fd_, b.data() + off, len - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += static_cast<size_t>(n);
    }
  }
  void CloseWrite() { shutdown(fd_, SHUT_WR); }
  // The ack's status field, or -1 when the receiver hung up instead. A receiver answers a
  // hello of its own version with 48 bytes, any other with the 24 every version shares.
  int Handshake(uint32_t layers, uint64_t block_bytes) {
    return Handshake(Hello(layers, block_bytes));
  }
  int Handshake(const std::vector<std::byte>& hello) {
    Send(hello);
    std::byte ack[48];
    size_t got = 0;
    while (got < 24) {
      const ssize_t n = recv(fd_, ack + got, 24 - got, 0);
      if (n <= 0) return -1;
      got += static_cast<size_t>(n);
    }
    const int status =
        static_cast<int>(static_cast<uint16_t>(ack[6]) | static_cast<uint16_t>(ack[7]) << 8);
    const int version =
        static_cast<int>(static_cast<uint16_t>(ack[4]) | static_cast<uint16_t>(ack[5]) << 8);
    if (version != kWireVersion || status == 1) return status;
    while (got < sizeof(ack)) {
      const ssize_t n = recv(fd_, ack + got, sizeof(ack) - got, 0);
      if (n <= 0) return -1;
      got += static_cast<size_t>(n);
    }
    return status;
  }
  // True once the receiver has closed its end (EOF or reset) within `timeout`.
  bool WaitClosed(milliseconds timeout = milliseconds(5000)) {
    const auto deadline = Clock::now() + timeout;
    char buf[256];
    while (Clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      const ssize_t n = recv(fd_, buf, sizeof(buf), 0);
      if (n <= 0) return true;
    }
    return false;
  }

 private:
  int fd_;
  bool connected_ = false;
};

int PortOf(const std::string& address) { return std::stoi(address.substr(address.rfind(':') + 1)); }

int UnusedPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

class KvTcpTest : public ::testing::Test {
 protected:
  void SetUp() override {
    geometry_ = TestGeometry(/*num_layers=*/3, /*num_blocks=*/64);
    store_ = std::make_unique<TestStore>(geometry_);
    options_.geometry = geometry_;
    options_.connect_timeout_ms = 1000;
    options_.io_timeout_ms = 300;  // short, so stalls are detected quickly
    auto r = CreateKvReceiver("tcp", options_, *store_, events_.Callbacks());
    ASSERT_TRUE(r.ok()) << r.status();
    receiver_ = std::move(*r);
    peer_ = receiver_->address();
    port_ = PortOf(peer_);
  }

  // Replaces the receiver with one over a fresh store of geometry `g`.
  void Restart(const KvGeometry& g) {
    receiver_.reset();
    geometry_ = g;
    store_ = std::make_unique<TestStore>(geometry_);
    options_.geometry = geometry_;
    auto r = CreateKvReceiver("tcp", options_, *store_, events_.Callbacks());
    ASSERT_TRUE(r.ok()) << r.status();
    receiver_ = std::move(*r);
    peer_ = receiver_->address();
    port_ = PortOf(peer_);
  }

  // Over an already greeted raw client: every KV layer and every state layer, then finish.
  void RawHybridTransfer(RawClient& c, uint64_t req, const std::vector<int32_t>& blocks,
                         uint32_t slot) {
    for (int layer : KvLayers(geometry_)) c.Send(LayerFrame(geometry_, req, layer, blocks, req));
    for (int layer : StateLayers(geometry_)) c.Send(StateFrame(geometry_, req, layer, slot, req));
    c.Send(Encode({.type = kFinish, .request_id = req}));
  }
  void ExpectHybridLanded(uint64_t req, const std::vector<int32_t>& blocks, int slot) {
    for (int layer : KvLayers(geometry_)) EXPECT_TRUE(LayerMatches(*store_, req, layer, blocks));
    for (int layer : StateLayers(geometry_)) EXPECT_TRUE(StateMatches(*store_, req, layer, slot));
  }

  // A fresh KvSender completes a transfer into slot 7 of the (hybrid) receiver.
  void ExpectHybridTransferWorksOverTheRealSender() {
    std::unique_ptr<KvSender> sender = CreateKvSender(options_);
    const uint64_t req = 9100;
    const std::vector<int32_t> blocks = {30, 31};
    receiver_->Expect(req, 0, blocks, 7);
    for (int layer = 0; layer < geometry_.num_layers; ++layer) {
      const absl::Status st =
          geometry_.is_state_layer(layer)
              ? SendOneState(*sender, peer_, geometry_, req, 0, layer, 7, req)
              : SendOneLayer(*sender, peer_, geometry_, req, 0, layer, blocks, req);
      ASSERT_TRUE(st.ok()) << st;
    }
    ASSERT_TRUE(FinishAndWait(*sender, peer_, req, 0).ok());
    ASSERT_TRUE(events_.WaitReady(req, 0));
    for (int layer : KvLayers(geometry_)) EXPECT_TRUE(LayerMatches(*store_, req, layer, blocks));
    for (int layer : StateLayers(geometry_)) EXPECT_TRUE(StateMatches(*store_, req, layer, 7));
  }

  void ExpectGoodTransferWorks(uint64_t req, const std::vector<int32_t>& blocks) {
    std::unique_ptr<KvSender> sender = CreateKvSender(options_);
    receiver_->Expect(req, 0, blocks);
    for (int layer = 0; layer < geometry_.num_layers; ++layer) {
      ASSERT_TRUE(SendOneLayer(*sender, peer_, geometry_, req, 0, layer, blocks, req).ok());
    }
    ASSERT_TRUE(FinishAndWait(*sender, peer_, req, 0).ok());
    ASSERT_TRUE(events_.WaitReady(req, 0));
    for (int layer = 0; layer < geometry_.num_layers; ++layer) {
      EXPECT_TRUE(LayerMatches(*store_, req, layer, blocks));
    }
  }

  KvGeometry geometry_;
  TransportOptions options_;
  Events events_;
  std::unique_ptr<TestStore> store_;
  std::unique_ptr<KvReceiver> receiver_;
  std::string peer_;
  int port_ = 0;
};

TEST_F(KvTcpTest, UnreachablePeersFailFast) {
  std::unique_ptr<KvSender> sender = CreateKvSender(options_);
  const std::string dead = "127.0.0.1:" + std::to_string(UnusedPort());
  const auto start = Clock::now();
  const absl::Status st = SendOneLayer(*sender, dead, geometry_, 1, 0, 0, {1}, 1);
  EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  const absl::Status fin = FinishAndWait(*sender, dead, 1, 0);
  EXPECT_FALSE(fin.ok());
  EXPECT_NE(fin.code(), absl::StatusCode::kDeadlineExceeded) << "done never ran: " << fin;
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3));
  for (const char* bad : {"no-port", "host:", "host:99999", ":80"}) {
    EXPECT_EQ(SendOneLayer(*sender, bad, geometry_, 1, 0, 0, {1}, 1).code(),
              absl::StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST_F(KvTcpTest, StalledReceiverFailsSendAfterTimeout) {
  // A "receiver" that completes the handshake and then never reads.
  const int lfd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(listen(lfd, 1), 0);
  socklen_t len = sizeof(a);
  getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len);
  KvGeometry big = TestGeometry();
  big.block_size = 16, big.num_kv_heads = 8, big.head_dim = 128;  // 64 KiB blocks
  std::promise<void> release;
  std::thread fake([&, released = release.get_future()] {
    const int c = accept(lfd, nullptr, nullptr);
    std::byte hello[48];
    ASSERT_EQ(recv(c, hello, sizeof(hello), MSG_WAITALL), 48);
    const std::vector<std::byte> ack =
        Hello(static_cast<uint32_t>(big.num_layers), big.block_bytes());
    send(c, ack.data(), ack.size(), MSG_NOSIGNAL);
    released.wait_for(std::chrono::seconds(10));  // stall until the sender has given up
    close(c);
  });
  TransportOptions o = options_;
  o.geometry = big;
  o.max_queued_bytes_per_peer = 2u << 20;
  std::unique_ptr<KvSender> sender = CreateKvSender(o);
  const std::string peer = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  const auto start = Clock::now();
  absl::Status st;
  const std::vector<int32_t> blocks = {0, 1, 2, 3, 4, 5, 6, 7};  // 1 MiB frames
  for (int i = 0; i < 200 && st.ok(); ++i)
    st = SendOneLayer(*sender, peer, big, 1, 0, 0, blocks, 1);
  EXPECT_FALSE(st.ok());
  EXPECT_LT(Clock::now() - start, std::chrono::seconds(3)) << st;
  EXPECT_FALSE(FinishAndWait(*sender, peer, 1, 0).ok());
  release.set_value();
  fake.join();
  close(lfd);
}

TEST_F(KvTcpTest, HandWrittenClientCanCompleteATransfer) {
  const std::vector<int32_t> blocks = {3, 1, 4};
  receiver_->Expect(77, 0, blocks);
  RawClient c(port_);
  ASSERT_EQ(c.Handshake(3, geometry_.block_bytes()), 0);
  for (uint32_t layer = 0; layer < 3; ++layer) c.Send(LayerFrame(geometry_, 77, layer, blocks, 77));
  c.Send(Encode({.type = kFinish, .request_id = 77}));
  ASSERT_TRUE(events_.WaitReady(77, 0));
  for (int layer = 0; layer < 3; ++layer) EXPECT_TRUE(LayerMatches(*store_, 77, layer, blocks));
}

TEST_F(KvTcpTest, MaliciousClientsCannotCrashHangOrWriteThrough) {
  const uint64_t bb = geometry_.block_bytes();
  const std::vector<int32_t> agreed = {10, 11};
  uint64_t next_req = 100;
  // Each case: a fresh expected transfer, a connection that does something wrong, and whether
  // the receiver must hang up and fail the transfer.
  struct Case {
    const char* name;
    std::function<void(RawClient&, uint64_t req)> act;
    bool closes;
    bool fails_transfer;
  };
  const std::vector<Case> cases = {
      {"garbage instead of hello",
       [](RawClient& c, uint64_t) { c.Send(std::vector<std::byte>(100, std::byte{0x41})); }, true,
       false},
      {"silent after connect", [](RawClient&, uint64_t) {}, true, false},
      {"wrong geometry", [&](RawClient& c, uint64_t) { EXPECT_EQ(c.Handshake(3, bb * 2), 2); },
       true, false},
      {"bad frame magic",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(Encode(
             {.magic = 0xdeadbeef, .request_id = r, .n_blocks = 1, .payload_bytes = 2 * bb}));
       },
       true, false},
      {"huge n_blocks",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(Encode(
             {.request_id = r, .n_blocks = 0xffffffffu, .payload_bytes = 0xffffffffull * 2 * bb}));
       },
       true, true},
      {"huge payload length",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(Encode({.request_id = r, .n_blocks = 2, .payload_bytes = 1ull << 62}));
       },
       true, true},
      {"zero blocks",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(Encode({.request_id = r, .n_blocks = 0, .payload_bytes = 0}));
       },
       true, true},
      {"unknown frame type",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(Encode({.type = 99, .request_id = r}));
       },
       true, true},
      {"finish with a body",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(Encode({.type = kFinish, .request_id = r, .n_blocks = 1, .payload_bytes = 2 * bb}));
       },
       true, true},
      {"stalls mid-payload",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         const std::vector<std::byte> f = LayerFrame(geometry_, r, 0, agreed, 1);
         c.SendPrefix(f, f.size() / 2);  // then nothing: the receiver's io timeout must end it
       },
       true, true},
      {"hangs up mid-payload",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         const std::vector<std::byte> f = LayerFrame(geometry_, r, 0, agreed, 1);
         c.SendPrefix(f, f.size() - 7);
         c.CloseWrite();
       },
       true, true},
      {"layer out of range",  // agreement broken but framing sound: transfer fails, link lives
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(LayerFrame(geometry_, r, 7, agreed, 1));
       },
       false, true},
      {"block id out of pool",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(LayerFrame(geometry_, r, 0, {10, 100000}, 1));
       },
       false, true},
      {"negative block id",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(LayerFrame(geometry_, r, 0, {-1, 11}, 1));
       },
       false, true},
      {"repeated block id",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(LayerFrame(geometry_, r, 0, {10, 10}, 1));
       },
       false, true},
      {"layer frames, then hang up before finish",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         c.Send(LayerFrame(geometry_, r, 0, agreed, 1));
         c.CloseWrite();
       },
       true, true},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    const uint64_t req = next_req++;
    store_->Reset();  // earlier cases that died mid-payload did write their agreed blocks
    receiver_->Expect(req, 0, agreed);
    RawClient c(port_);
    ASSERT_TRUE(c.connected());
    k.act(c, req);
    if (k.closes) {
      EXPECT_TRUE(c.WaitClosed());
    } else {
      EXPECT_FALSE(c.WaitClosed(milliseconds(500)));  // io_timeout 300 ms: idle links stay open
    }
    if (k.fails_transfer) {
      EXPECT_TRUE(events_.WaitFailed(req, 0).has_value());
    } else {
      EXPECT_EQ(events_.FailedCount(req, 0), 0);
    }
    EXPECT_EQ(events_.ReadyCount(req, 0), 0);
    // Nothing agreed-and-complete was sent, and refused frames must not have written at all.
    if (std::string(k.name).find("mid-payload") == std::string::npos &&
        std::string(k.name) != "layer frames, then hang up before finish") {
      EXPECT_TRUE(store_->AllUntouched());
    }
  }

  // Random junk after a valid handshake, then a hang-up: must not crash the receiver.
  std::mt19937 rng(20240601);
  for (int i = 0; i < 300; ++i) {
    RawClient c(port_);
    c.Handshake(3, bb);
    Header h{.type = static_cast<uint16_t>(rng() % 4),
             .request_id = next_req - 1 - rng() % 3,
             .layer = static_cast<uint32_t>(rng() % 5),
             .n_blocks = static_cast<uint32_t>(rng() % 6),
             .payload_bytes = rng() % 3 == 0 ? rng() : (rng() % 6) * 2 * bb};
    std::vector<std::byte> f = Encode(h);
    const size_t extra = rng() % 4096;
    for (size_t j = 0; j < extra; ++j) f.push_back(static_cast<std::byte>(rng()));
    c.Send(f);
    c.CloseWrite();
  }
  // More connections than the receiver serves at once, all idle: refused or timed out.
  {
    std::vector<std::unique_ptr<RawClient>> crowd;
    for (int i = 0; i < 200; ++i) crowd.push_back(std::make_unique<RawClient>(port_));
  }
  std::this_thread::sleep_for(milliseconds(200));  // let the receiver see the hang-ups and reap
  ExpectGoodTransferWorks(9000, {20, 21, 22});
}

TEST_F(KvTcpTest, HandWrittenClientCanCompleteAHybridTransfer) {
  Restart(HybridGeometry());
  const std::vector<int32_t> blocks = {3, 1};
  receiver_->Expect(77, 0, blocks, 4);
  RawClient c(port_);
  ASSERT_EQ(c.Handshake(HelloFor(geometry_)), 0);
  RawHybridTransfer(c, 77, blocks, 4);
  ASSERT_TRUE(events_.WaitReady(77, 0));
  ExpectHybridLanded(77, blocks, 4);
  for (int slot : {0, 1, 2, 3, 5, 6, 7}) {
    EXPECT_TRUE(store_->StateUntouched(0, slot) && store_->StateUntouched(2, slot)) << slot;
  }
}

TEST_F(KvTcpTest, PureStateReceiverTakesStateFramesOnly) {
  Restart(PureStateGeometry());
  receiver_->Expect(5, 0, {}, 1);
  RawClient c(port_);
  ASSERT_EQ(c.Handshake(HelloFor(geometry_)), 0);
  RawHybridTransfer(c, 5, {}, 1);
  ASSERT_TRUE(events_.WaitReady(5, 0));
  ExpectHybridLanded(5, {}, 1);

  // No KV layers: a LAYER frame's lengths cannot be judged, so it breaks the framing.
  store_->Reset();
  receiver_->Expect(6, 0, {}, 2);
  c.Send(Encode({.request_id = 6, .n_blocks = 1, .payload_bytes = 0}));
  EXPECT_TRUE(c.WaitClosed());
  EXPECT_TRUE(events_.WaitFailed(6, 0).has_value());
  EXPECT_TRUE(store_->AllUntouched());

  // A hello with a KV shape, or the wrong state layout, is refused.
  RawClient kv(port_);
  EXPECT_EQ(kv.Handshake(3, 256), 2);
  KvGeometry two_state = geometry_;
  two_state.state_layers = {1, 0, 1};
  RawClient layout(port_);
  EXPECT_EQ(layout.Handshake(HelloFor(two_state)), 2);
}

TEST_F(KvTcpTest, HandshakeRefusesAnotherVersionOrStateLayout) {
  Restart(HybridGeometry());
  RawClient v1(port_);
  EXPECT_EQ(v1.Handshake(Hello(4, geometry_.block_bytes(), kHelloMagic, LayoutOf(geometry_),
                               /*version=*/1)),
            1);
  EXPECT_TRUE(v1.WaitClosed());
  // Other state layers (same count, fewer, none), other conv or SSM sizes.
  const std::vector<KvGeometry> others = [&] {
    std::vector<KvGeometry> v(5, geometry_);
    v[0].state_layers = {0, 1, 0, 1};
    v[1].state_layers = {1, 0, 0, 0};
    v[2].state_layers.clear();
    v[3].conv_state_bytes *= 2;
    v[4].ssm_state_bytes += 1;
    return v;
  }();
  for (const KvGeometry& other : others) {
    RawClient c(port_);
    EXPECT_EQ(c.Handshake(HelloFor(other)), 2);
    EXPECT_TRUE(c.WaitClosed());
  }
  // The hash alone tells the layouts apart when the count agrees.
  KvGeometry moved = geometry_;
  moved.state_layers = {0, 1, 1, 0};
  std::vector<std::byte> h = HelloFor(moved);
  RawClient c(port_);
  EXPECT_EQ(c.Handshake(h), 2);
  ExpectHybridTransferWorksOverTheRealSender();
}

TEST_F(KvTcpTest, MaliciousStateFramesAreRefusedAndTheLinkCarriesOn) {
  Restart(HybridGeometry());
  const uint32_t agreed_slot = 4;
  const std::vector<int32_t> agreed = {10, 11};
  uint64_t next_req = 100;
  struct Case {
    const char* name;
    std::function<void(RawClient&, uint64_t req)> act;
    bool closes;
    bool fails_transfer;
  };
  const KvGeometry& g = geometry_;
  const std::vector<Case> cases = {
      // Agreement broken, framing sound: the transfer fails, the connection lives.
      {"state frame for a KV layer",
       [&](RawClient& c, uint64_t r) { c.Send(StateFrame(g, r, 1, agreed_slot, r)); }, false, true},
      {"layer frame for a state layer",
       [&](RawClient& c, uint64_t r) { c.Send(LayerFrame(g, r, 2, agreed, r)); }, false, true},
      {"state slot not agreed",
       [&](RawClient& c, uint64_t r) { c.Send(StateFrame(g, r, 0, agreed_slot + 1, r)); }, false,
       true},
      {"state slot out of pool",
       [&](RawClient& c, uint64_t r) { c.Send(StateFrame(g, r, 0, 1000, r)); }, false, true},
      {"state slot negative",
       [&](RawClient& c, uint64_t r) { c.Send(StateFrame(g, r, 0, 0xffffffffu, r)); }, false, true},
      {"state layer out of range",
       [&](RawClient& c, uint64_t r) { c.Send(StateFrame(g, r, 9, agreed_slot, r)); }, false, true},
      {"state for an unexpected transfer",  // dropped silently after the agreement wait
       [&](RawClient& c, uint64_t r) { c.Send(StateFrame(g, r + 50000, 0, agreed_slot, r)); },
       false, false},
      // Framing broken: the transfer fails and the connection is closed.
      {"state payload short",
       [&](RawClient& c, uint64_t r) { c.Send(StateFrame(g, r, 0, agreed_slot, r, -8)); }, true,
       true},
      {"state payload long",
       [&](RawClient& c, uint64_t r) { c.Send(StateFrame(g, r, 0, agreed_slot, r, +8)); }, true,
       true},
      {"state payload huge",
       [&](RawClient& c, uint64_t r) {
         c.Send(Encode({.type = kState, .request_id = r, .payload_bytes = 1ull << 62}));
       },
       true, true},
      {"state frame with block ids",
       [&](RawClient& c, uint64_t r) {
         c.Send(Encode({.type = kState,
                        .request_id = r,
                        .n_blocks = 1,
                        .payload_bytes = g.conv_state_bytes + g.ssm_state_bytes,
                        .slot = agreed_slot}));
       },
       true, true},
      {"slot set on a layer frame",
       [&](RawClient& c, uint64_t r) {
         std::vector<std::byte> f = LayerFrame(g, r, 1, agreed, r);
         f[28] = std::byte{1};
         c.Send(f);
       },
       true, true},
      {"slot set on a finish frame",
       [&](RawClient& c, uint64_t r) {
         c.Send(Encode({.type = kFinish, .request_id = r, .slot = agreed_slot}));
       },
       true, true},
      {"state stalls mid-payload",
       [&](RawClient& c, uint64_t r) {
         const std::vector<std::byte> f = StateFrame(g, r, 0, agreed_slot, r);
         c.SendPrefix(f, f.size() - 100);  // then nothing: the receiver's io timeout must end it
       },
       true, true},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.name);
    const uint64_t req = next_req++;
    store_->Reset();
    receiver_->Expect(req, 0, agreed, agreed_slot);
    RawClient c(port_);
    ASSERT_TRUE(c.connected());
    ASSERT_EQ(c.Handshake(HelloFor(g)), 0);
    k.act(c, req);
    if (k.closes) {
      EXPECT_TRUE(c.WaitClosed());
    } else {
      EXPECT_FALSE(c.WaitClosed(milliseconds(500)));
    }
    if (k.fails_transfer) {
      EXPECT_TRUE(events_.WaitFailed(req, 0).has_value());
    } else {
      EXPECT_EQ(events_.FailedCount(req, 0), 0);
    }
    EXPECT_EQ(events_.ReadyCount(req, 0), 0);
    if (std::string(k.name).find("mid-payload") == std::string::npos) {
      EXPECT_TRUE(store_->AllUntouched());
    }
    if (!k.closes) {
      // The same connection still carries a good transfer (and the refused one stays dead).
      const uint64_t good = 5000 + req;
      receiver_->Expect(good, 0, {20, 21}, 6);
      RawHybridTransfer(c, good, {20, 21}, 6);
      EXPECT_TRUE(events_.WaitReady(good, 0));
      ExpectHybridLanded(good, {20, 21}, 6);
      EXPECT_TRUE(store_->StateUntouched(0, agreed_slot) && store_->StateUntouched(2, agreed_slot));
    }
  }
  ExpectHybridTransferWorksOverTheRealSender();
}

TEST_F(KvTcpTest, PeerKilledDuringLargeTransfersFailsEveryFinish) {
  KvGeometry big = TestGeometry(/*num_layers=*/4, /*num_blocks=*/64);
  big.block_size = 16, big.num_kv_heads = 8, big.head_dim = 128;  // 64 KiB blocks
  auto store = std::make_unique<TestStore>(big);
  TransportOptions o = options_;
  o.geometry = big;
  o.io_timeout_ms = 2000;
  auto r = CreateKvReceiver("tcp", o, *store, events_.Callbacks());
  ASSERT_TRUE(r.ok());
  std::unique_ptr<KvReceiver> receiver = std::move(*r);
  const std::string peer = receiver->address();
  std::unique_ptr<KvSender> sender = CreateKvSender(o);
  std::vector<int32_t> blocks(32);
  for (int i = 0; i < 32; ++i) blocks[i] = i;
  for (uint64_t req = 1; req <= 40; ++req) receiver->Expect(req, 0, blocks);
  int failures = 0;
  std::vector<LayerSource> src;  // built once: filling 16 MiB per transfer is slow under ASan
  for (int layer = 0; layer < 4; ++layer) src.push_back(MakeLayerSource(big, 1, layer, blocks));
  std::thread prefill([&] {
    for (uint64_t req = 1; req <= 40; ++req) {
      for (int layer = 0; layer < 4; ++layer) {
        KvLayerSend send{.request_id = req,
                         .layer = layer,
                         .dst_blocks = blocks,
                         .k_src = src[layer].k_ptrs,
                         .v_src = src[layer].v_ptrs};
        (void)sender->SendLayer(peer, send);
      }
      const absl::Status st = FinishAndWait(*sender, peer, req, 0);
      EXPECT_NE(st.code(), absl::StatusCode::kDeadlineExceeded) << st;
      failures += !st.ok();
    }
  });
  std::this_thread::sleep_for(milliseconds(20));
  receiver.reset();  // mid-stream: 40 transfers of 16 MiB each cannot be done by now
  prefill.join();
  EXPECT_GT(failures, 0);  // everything after the kill fails, none of it hangs
}

}  // namespace
}  // namespace cleave::transport
