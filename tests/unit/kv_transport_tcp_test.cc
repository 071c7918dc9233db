// The TCP backend at the wire: unreachable and stalled peers must fail the sender with an
// error (never a hang), and a hand-written client speaking garbage, lying lengths or stalling
// mid-frame must not crash, hang or write through the receiver, which keeps serving good
// transfers afterwards. The frames here are encoded by hand from the layout in frame.h, so they
// also pin the wire format.
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
constexpr uint16_t kLayer = 1, kFinish = 2;

void Put(std::vector<std::byte>& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<std::byte>(v >> (8 * i)));
}

std::vector<std::byte> Hello(uint32_t layers, uint64_t block_bytes, uint32_t magic = kHelloMagic) {
  std::vector<std::byte> b;
  for (auto [v, n] : {std::pair<uint64_t, int>{magic, 4}, {1, 2}, {0, 2}, {layers, 4}, {0, 4},
                      {block_bytes, 8}}) {
    Put(b, v, n);
  }
  return b;
}

struct Header {
  uint32_t magic = kFrameMagic;
  uint16_t type = kLayer;
  uint64_t request_id = 0;
  uint32_t attempt = 0;
  uint32_t layer = 0;
  uint32_t n_blocks = 0;
  uint64_t payload_bytes = 0;
};
std::vector<std::byte> Encode(const Header& h) {
  std::vector<std::byte> b;
  for (auto [v, n] : {std::pair<uint64_t, int>{h.magic, 4}, {h.type, 2}, {0, 2}, {h.request_id, 8},
                      {h.attempt, 4}, {h.layer, 4}, {h.n_blocks, 4}, {0, 4}, {h.payload_bytes, 8}}) {
    Put(b, v, n);
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
  void Send(const std::vector<std::byte>& b) {  // errors ignored: the receiver may hang up
    size_t off = 0;
    while (off < b.size()) {
      const ssize_t n = send(fd_, b.data() + off, b.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return;
      off += static_cast<size_t>(n);
    }
  }
  void CloseWrite() { shutdown(fd_, SHUT_WR); }
  // The ack's status field, or -1 when the receiver hung up instead.
  int Handshake(uint32_t layers, uint64_t block_bytes) {
    Send(Hello(layers, block_bytes));
    std::byte ack[24];
    size_t got = 0;
    while (got < sizeof(ack)) {
      const ssize_t n = recv(fd_, ack + got, sizeof(ack) - got, 0);
      if (n <= 0) return -1;
      got += static_cast<size_t>(n);
    }
    return static_cast<int>(static_cast<uint16_t>(ack[6]) | static_cast<uint16_t>(ack[7]) << 8);
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
    std::byte hello[24];
    ASSERT_EQ(recv(c, hello, sizeof(hello), MSG_WAITALL), 24);
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
         std::vector<std::byte> f = LayerFrame(geometry_, r, 0, agreed, 1);
         f.resize(f.size() / 2);
         c.Send(f);  // then nothing: the receiver's io timeout must end it
       },
       true, true},
      {"hangs up mid-payload",
       [&](RawClient& c, uint64_t r) {
         c.Handshake(3, bb);
         std::vector<std::byte> f = LayerFrame(geometry_, r, 0, agreed, 1);
         f.resize(f.size() - 7);
         c.Send(f);
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
