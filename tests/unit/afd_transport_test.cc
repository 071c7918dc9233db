// The AFD activation transport (cleave/transport/activation.h) over real loopback sockets:
// pipelined dense and expert calls, handler errors that leave the connection up, HELLO geometry
// and auth refusals, malformed frames (hand-encoded here from the header's layout, so they also
// pin the wire format) that close only their own connection, a server stopped mid-call, a missed
// deadline that must never let a late answer write into a freed buffer, and a stalled HELLO.
#include <gmock/gmock.h>
#include "wire_bytes.h"
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "cleave/transport/activation.h"

namespace cleave::transport {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using wire_test::Bytes;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

constexpr int kHidden = 8;
constexpr int kLayers = 4;
constexpr std::string_view kSecret = "0123456789abcdef0123456789abcdef";
constexpr std::string_view kOtherSecret = "fedcba9876543210fedcba9876543210";

ActivationOptions Options(int hidden = kHidden, int layers = kLayers) {
  ActivationOptions o;
  o.hidden_size = hidden;
  o.num_layers = layers;
  o.max_rows = 16;
  return o;
}

// dense: out = 2 * rows + layer. experts: out[i] = rows[assign_rows[i]] * (expert + 1), and
// experts >= 4 live elsewhere.
absl::Status Compute(const FfnRequest& r, std::span<float> out) {
  if (r.op == FfnOp::kDense) {
    for (size_t i = 0; i < r.rows.size(); ++i) out[i] = 2 * r.rows[i] + static_cast<float>(r.layer);
    return absl::OkStatus();
  }
  for (size_t i = 0; i < r.assign_rows.size(); ++i) {
    const int e = r.assign_experts[i];
    if (e < 0 || e >= 4) return absl::NotFoundError("expert " + std::to_string(e) + " is not here");
    for (int h = 0; h < kHidden; ++h) {
      out[i * kHidden + h] = r.rows[r.assign_rows[i] * kHidden + h] * static_cast<float>(e + 1);
    }
  }
  return absl::OkStatus();
}

std::unique_ptr<FfnServer> StartServer(ActivationOptions o = Options(), FfnHandler h = Compute) {
  auto server = FfnServer::Start(o, std::move(h));
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

std::unique_ptr<FfnConnection> Dial(const FfnServer& s, ActivationOptions o = Options()) {
  auto c = FfnConnection::Connect(s.address(), o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

std::vector<float> Rows(int n, float base) {
  std::vector<float> v(static_cast<size_t>(n) * kHidden);
  for (size_t i = 0; i < v.size(); ++i) v[i] = base + static_cast<float>(i);
  return v;
}

FfnCall Dense(int layer, const std::vector<float>& rows, std::vector<float>& out) {
  out.assign(rows.size(), -1.0f);
  return FfnCall{.op = FfnOp::kDense,
                 .layer = layer,
                 .num_rows = static_cast<int>(rows.size() / kHidden),
                 .rows = rows.data(),
                 .out = out.data()};
}

Clock::time_point In(int ms) { return Clock::now() + milliseconds(ms); }

// One dense call, checked; how a test shows a server or connection still works.
void ExpectDenseWorks(FfnConnection& c, int layer = 1) {
  const std::vector<float> rows = Rows(2, 10.0f);
  std::vector<float> out;
  absl::StatusOr<uint64_t> t = c.Send(Dense(layer, rows, out));
  ASSERT_TRUE(t.ok()) << t.status();
  ASSERT_TRUE(c.Wait(*t, In(5000)).ok());
  for (size_t i = 0; i < rows.size(); ++i) ASSERT_EQ(out[i], 2 * rows[i] + layer) << i;
}

bool WaitFor(const std::function<bool()>& pred, int ms = 5000) {
  for (const auto end = In(ms); Clock::now() < end; std::this_thread::sleep_for(milliseconds(5))) {
    if (pred()) return true;
  }
  return pred();
}

// A raw socket speaking the wire format by hand.
class Raw {
 public:
  explicit Raw(const std::string& address) {
    const int port = std::stoi(address.substr(address.rfind(':') + 1));
    fd_ = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    EXPECT_EQ(connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  }
  ~Raw() { close(fd_); }
  void Send(const Bytes& b) {
    ASSERT_EQ(send(fd_, b.data(), b.size(), MSG_NOSIGNAL), static_cast<ssize_t>(b.size()));
  }
  void Send(const void* p, size_t n) {
    Send(Bytes(static_cast<const std::byte*>(p), static_cast<const std::byte*>(p) + n));
  }
  void CloseWrite() { shutdown(fd_, SHUT_WR); }
  Bytes Recv(size_t n, int timeout_ms = 5000) {
    SetTimeout(timeout_ms);
    Bytes b(n);
    size_t got = 0;
    while (got < n) {
      const ssize_t r = recv(fd_, b.data() + got, n - got, 0);
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    b.resize(got);
    return b;
  }
  // True when the server closed (EOF or reset) within timeout_ms.
  bool ClosedWithin(int timeout_ms) {
    SetTimeout(timeout_ms);
    std::byte b[64];
    const ssize_t r = recv(fd_, b, sizeof(b), 0);
    return r == 0 || (r < 0 && errno == ECONNRESET);
  }

 private:
  void SetTimeout(int ms) {
    timeval tv{ms / 1000, (ms % 1000) * 1000};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }
  int fd_ = -1;
};

using wire_test::Get;
using wire_test::Put;
// "CAFH" as a little-endian u32, then version 1, geometry, zeros to 32 bytes.
Bytes Hello(uint32_t hidden = kHidden, uint32_t layers = kLayers) {
  Bytes b;
  Put(b, 0x48464143, 4), Put(b, 1, 2), Put(b, 0, 2), Put(b, hidden, 4), Put(b, layers, 4);
  Put(b, 16, 4);
  b.resize(32, std::byte{0});
  return b;
}
Bytes CallHeader(uint16_t op, uint64_t ticket, uint32_t layer, uint32_t rows, uint32_t assigns,
                 uint32_t hidden = kHidden, uint32_t magic = 0x51464143 /* "CAFQ" */) {
  Bytes b;
  Put(b, magic, 4), Put(b, op, 2), Put(b, 0, 2), Put(b, ticket, 8), Put(b, layer, 4);
  Put(b, rows, 4), Put(b, assigns, 4), Put(b, hidden, 4);
  return b;
}

// A raw connection past a successful HELLO / HELLO_ACK.
std::unique_ptr<Raw> RawAfterHello(const FfnServer& s) {
  auto raw = std::make_unique<Raw>(s.address());
  raw->Send(Hello());
  const Bytes ack = raw->Recv(32);
  EXPECT_EQ(ack.size(), 32u);
  if (ack.size() == 32) {
    EXPECT_EQ(Get(ack, 0, 4), 0x4b464143u);  // "CAFK"
    EXPECT_EQ(Get(ack, 6, 2), 0u);           // status ok
    EXPECT_EQ(Get(ack, 8, 4), uint64_t{kHidden});
  }
  return raw;
}

TEST(AfdTransport, PipelinedDenseCallsRoundTrip) {
  auto server = StartServer(Options(), [](const FfnRequest& r, std::span<float> out) {
    if (r.layer == 2) std::this_thread::sleep_for(milliseconds(3));
    return Compute(r, out);
  });
  auto conn = Dial(*server);
  ASSERT_NE(conn, nullptr);
  const int rows_per_call[3] = {3, 5, 1};
  std::vector<float> rows[3], out[3];
  uint64_t tickets[3];
  for (int i = 0; i < 3; ++i) {  // three calls in flight before the first Wait
    rows[i] = Rows(rows_per_call[i], 100.0f * static_cast<float>(i));
    absl::StatusOr<uint64_t> t = conn->Send(Dense(i, rows[i], out[i]));
    ASSERT_TRUE(t.ok()) << t.status();
    tickets[i] = *t;
  }
  EXPECT_EQ(tickets[0], 1u);
  EXPECT_EQ(tickets[2], 3u);
  for (int i = 0; i < 3; ++i) {
    FfnTiming timing{-1, -1};
    ASSERT_TRUE(conn->Wait(tickets[i], In(5000), &timing).ok());
    for (size_t j = 0; j < rows[i].size(); ++j) ASSERT_EQ(out[i][j], 2 * rows[i][j] + i) << i;
    EXPECT_GE(timing.compute_us, i == 2 ? 2000 : 0);
    EXPECT_LE(timing.compute_us, timing.round_trip_us);
  }
  EXPECT_EQ(server->num_connections(), 1);
  EXPECT_TRUE(WaitFor([&] { return server->calls_answered() == 3; }));
  EXPECT_FALSE(conn->Wait(tickets[0], In(100)).ok()) << "a ticket is waited for once";
  conn.reset();
  EXPECT_TRUE(WaitFor([&] { return server->num_connections() == 0; }));
}

TEST(AfdTransport, ConcurrentSendersShareOneConnection) {
  auto server = StartServer();
  auto conn = Dial(*server);
  ASSERT_NE(conn, nullptr);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < 25; ++i) ExpectDenseWorks(*conn, (t + i) % kLayers);
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_TRUE(WaitFor([&] { return server->calls_answered() == 100; }));
}

TEST(AfdTransport, ExpertCallsAnswerOneRowPerAssignment) {
  auto server = StartServer();
  auto conn = Dial(*server);
  ASSERT_NE(conn, nullptr);
  const std::vector<float> rows = Rows(3, 1.0f);
  const std::vector<int32_t> assign_rows[2] = {{0, 2, 2, 1}, {1}};
  const std::vector<int32_t> experts[2] = {{3, 0, 1, 2}, {1}};
  std::vector<float> out[2];
  uint64_t tickets[2];
  for (int c = 0; c < 2; ++c) {
    out[c].assign(assign_rows[c].size() * kHidden, -1.0f);
    FfnCall call{.op = FfnOp::kExperts,
                 .layer = 3,
                 .num_rows = 3,
                 .rows = rows.data(),
                 .num_assign = static_cast<int>(assign_rows[c].size()),
                 .assign_rows = assign_rows[c].data(),
                 .assign_experts = experts[c].data(),
                 .out = out[c].data()};
    absl::StatusOr<uint64_t> t = conn->Send(call);
    ASSERT_TRUE(t.ok()) << t.status();
    tickets[c] = *t;
  }
  for (int c = 1; c >= 0; --c) {  // out of order: the earlier answer waits in the connection
    ASSERT_TRUE(conn->Wait(tickets[c], In(5000)).ok());
    for (size_t i = 0; i < assign_rows[c].size(); ++i) {
      for (int h = 0; h < kHidden; ++h) {
        ASSERT_EQ(out[c][i * kHidden + h],
                  rows[assign_rows[c][i] * kHidden + h] * static_cast<float>(experts[c][i] + 1))
            << c << " " << i;
      }
    }
  }
  // A bad call is the caller's mistake: refused locally, the connection stays up.
  const int32_t bad_row = 3, expert = 0;
  FfnCall bad{.op = FfnOp::kExperts,
              .layer = 0,
              .num_rows = 3,
              .rows = rows.data(),
              .num_assign = 1,
              .assign_rows = &bad_row,
              .assign_experts = &expert,
              .out = out[0].data()};
  EXPECT_TRUE(absl::IsInvalidArgument(conn->Send(bad).status()));
  EXPECT_TRUE(conn->broken().ok());
  ExpectDenseWorks(*conn);
}

TEST(AfdTransport, HandlerErrorFailsOnlyThatCall) {
  std::string long_message(10000, 'x');
  auto server = StartServer(Options(), [&](const FfnRequest& r, std::span<float> out) {
    if (r.layer == 2) return absl::InternalError(long_message);
    return Compute(r, out);
  });
  auto conn = Dial(*server);
  ASSERT_NE(conn, nullptr);
  const std::vector<float> rows = Rows(2, 0.0f);
  const int32_t assign_row = 1, expert = 9;
  std::vector<float> out(kHidden);
  FfnCall call{.op = FfnOp::kExperts,
               .layer = 0,
               .num_rows = 2,
               .rows = rows.data(),
               .num_assign = 1,
               .assign_rows = &assign_row,
               .assign_experts = &expert,
               .out = out.data()};
  absl::StatusOr<uint64_t> t = conn->Send(call);
  ASSERT_TRUE(t.ok()) << t.status();
  absl::Status st = conn->Wait(*t, In(5000));
  EXPECT_TRUE(absl::IsInternal(st)) << st;
  EXPECT_THAT(st.message(), HasSubstr("expert 9 is not here"));
  EXPECT_THAT(st.message(), HasSubstr(server->address()));
  EXPECT_TRUE(conn->broken().ok());
  ExpectDenseWorks(*conn);

  std::vector<float> out2;
  t = conn->Send(Dense(2, rows, out2));
  ASSERT_TRUE(t.ok());
  st = conn->Wait(*t, In(5000));
  EXPECT_TRUE(absl::IsInternal(st));
  EXPECT_LE(st.message().size(), 4096u + 100u) << "the message is truncated to 4096 bytes";
  EXPECT_THAT(st.message(), HasSubstr(std::string(4000, 'x')));
  ExpectDenseWorks(*conn);
  EXPECT_TRUE(WaitFor([&] { return server->calls_answered() == 4; }));
}

TEST(AfdTransport, GeometryMismatchIsRefusedAtHello) {
  auto server = StartServer();
  auto c = FfnConnection::Connect(server->address(), Options(16, kLayers));
  ASSERT_TRUE(absl::IsFailedPrecondition(c.status())) << c.status();
  EXPECT_THAT(c.status().message(), HasSubstr("FFN worker at " + server->address() +
                                              " has hidden 8, this attention worker 16"));
  c = FfnConnection::Connect(server->address(), Options(kHidden, 3));
  ASSERT_TRUE(absl::IsFailedPrecondition(c.status())) << c.status();
  EXPECT_THAT(c.status().message(), HasSubstr("4 layers, this attention worker 3"));
  auto good = Dial(*server);
  ASSERT_NE(good, nullptr);
  ExpectDenseWorks(*good);
}

TEST(AfdTransport, AuthenticatesBySharedSecret) {
  ActivationOptions with = Options(), other = Options(), none = Options();
  with.secret = kSecret;
  other.secret = kOtherSecret;
  auto server = StartServer(with);
  auto plain_server = StartServer(none);
  auto good = Dial(*server, with);
  ASSERT_NE(good, nullptr);
  ExpectDenseWorks(*good);

  struct Case {
    const FfnServer* server;
    ActivationOptions client;
    const char* what;
  };
  for (const Case& k : {Case{server.get(), other, "different secrets"},
                        Case{server.get(), none, "client without a secret"},
                        Case{plain_server.get(), with, "server without a secret"}}) {
    auto c = FfnConnection::Connect(k.server->address(), k.client);
    ASSERT_TRUE(absl::IsUnauthenticated(c.status())) << k.what << ": " << c.status();
    EXPECT_THAT(c.status().message(), HasSubstr(k.server->address())) << k.what;
    EXPECT_THAT(c.status().message(), Not(HasSubstr(std::string(kSecret)))) << k.what;
    EXPECT_THAT(c.status().message(), Not(HasSubstr(std::string(kOtherSecret)))) << k.what;
    ExpectDenseWorks(*good);  // the refused peer cost the server nothing
    auto again = Dial(*k.server, k.server == server.get() ? with : none);
    ASSERT_NE(again, nullptr) << k.what;
    ExpectDenseWorks(*again);
  }
}

TEST(AfdTransport, MalformedFramesCloseOnlyTheirConnection) {
  auto server = StartServer();
  auto good = Dial(*server);
  ASSERT_NE(good, nullptr);
  {  // First the format itself: a hand-encoded call gets a hand-decoded answer.
    auto raw = RawAfterHello(*server);
    const std::vector<float> rows = Rows(1, 5.0f);
    raw->Send(CallHeader(1, 77, 2, 1, 0));
    raw->Send(rows.data(), rows.size() * sizeof(float));
    const Bytes a = raw->Recv(32 + kHidden * sizeof(float));
    ASSERT_EQ(a.size(), 32 + kHidden * sizeof(float));
    EXPECT_EQ(Get(a, 0, 4), 0x41464143u);  // "CAFA"
    EXPECT_EQ(Get(a, 4, 2), 0u);
    EXPECT_EQ(Get(a, 8, 8), 77u);
    EXPECT_EQ(Get(a, 16, 4), 1u);
    EXPECT_EQ(Get(a, 20, 4), uint64_t{kHidden});
    EXPECT_EQ(Get(a, 28, 4), 0u);
    float first;
    std::memcpy(&first, &a[32], sizeof(first));
    EXPECT_EQ(first, 2 * 5.0f + 2);
  }
  // Counted once written, which may be after we read it.
  ASSERT_TRUE(WaitFor([&] { return server->calls_answered() == 1; }));
  const uint64_t answered = 1;
  const std::vector<float> two_rows = Rows(2, 0.0f);
  const std::function<void(Raw&)> cases[] = {
      [](Raw& r) { r.Send(CallHeader(1, 1, 0, 1, 0, kHidden, 0xdeadbeef)); },  // bad magic
      [](Raw& r) { r.Send(CallHeader(1, 1, kLayers, 1, 0)); },                 // layer out of range
      [](Raw& r) { r.Send(CallHeader(1, 1, 0, 17, 0)); },                      // rows > max_rows
      [](Raw& r) { r.Send(CallHeader(1, 1, 0, 0, 0)); },                       // no rows
      [](Raw& r) { r.Send(CallHeader(3, 1, 0, 1, 0)); },                       // unknown op
      [](Raw& r) { r.Send(CallHeader(1, 1, 0, 1, 0, kHidden + 1)); },          // hidden differs
      [](Raw& r) { r.Send(CallHeader(1, 1, 0, 1, 2)); },   // dense with assignments
      [](Raw& r) { r.Send(CallHeader(2, 1, 0, 1, 65)); },  // > rows * 64 assignments
      [&](Raw& r) {                                        // assignment row out of range
        const int32_t assign[2] = {2, 0};
        r.Send(CallHeader(2, 1, 0, 2, 1));
        r.Send(two_rows.data(), two_rows.size() * sizeof(float));
        r.Send(assign, sizeof(assign));
      },
      [&](Raw& r) {  // truncated payload, then close
        r.Send(CallHeader(1, 1, 0, 2, 0));
        r.Send(two_rows.data(), two_rows.size() * sizeof(float) / 2);
        r.CloseWrite();
      },
  };
  for (size_t i = 0; i < std::size(cases); ++i) {
    auto raw = RawAfterHello(*server);
    cases[i](*raw);
    EXPECT_TRUE(raw->ClosedWithin(3000)) << "case " << i;
    ExpectDenseWorks(*good);
  }
  EXPECT_TRUE(WaitFor([&] { return server->num_connections() == 1; }));
  // The good client's calls only.
  EXPECT_TRUE(WaitFor([&] { return server->calls_answered() == answered + std::size(cases); }));
}

TEST(AfdTransport, ServerStoppedMidCallFailsTheCallPromptly) {
  std::promise<void> entered, release;
  std::shared_future<void> released = release.get_future().share();
  std::atomic<bool> first{true};
  auto server = StartServer(Options(), [&](const FfnRequest& r, std::span<float> out) {
    if (first.exchange(false)) entered.set_value();
    released.wait();
    return Compute(r, out);
  });
  auto conn = Dial(*server);  // io timeout 5 s: the failure must come long before it
  ASSERT_NE(conn, nullptr);
  const std::vector<float> rows = Rows(1, 0.0f);
  std::vector<float> out;
  absl::StatusOr<uint64_t> t = conn->Send(Dense(0, rows, out));
  ASSERT_TRUE(t.ok());
  ASSERT_EQ(entered.get_future().wait_for(milliseconds(5000)), std::future_status::ready);
  std::thread stopper([&] { server->Stop(); });  // waits for the handler to return
  const auto start = Clock::now();
  const absl::Status st = conn->Wait(*t, In(10000));
  EXPECT_TRUE(absl::IsUnavailable(st)) << st;
  EXPECT_THAT(st.message(), HasSubstr("connection lost"));
  EXPECT_LT(Clock::now() - start, milliseconds(2000));
  const auto send_start = Clock::now();
  EXPECT_TRUE(absl::IsUnavailable(conn->Send(Dense(0, rows, out)).status()));
  EXPECT_LT(Clock::now() - send_start, milliseconds(100));
  EXPECT_FALSE(conn->broken().ok());
  release.set_value();
  stopper.join();
  server->Stop();  // idempotent
}

TEST(AfdTransport, MissedDeadlineBreaksTheConnectionAndDropsTheLateAnswer) {
  auto server = StartServer(Options(), [](const FfnRequest& r, std::span<float> out) {
    if (r.layer == 1) std::this_thread::sleep_for(milliseconds(400));
    return Compute(r, out);
  });
  auto conn = Dial(*server);
  ASSERT_NE(conn, nullptr);
  const std::vector<float> rows = Rows(4, 0.0f);
  // Heap buffers freed right after Wait returns: ASan catches any late write into them.
  auto slow_out = std::make_unique<float[]>(rows.size());
  auto next_out = std::make_unique<float[]>(rows.size());
  FfnCall slow{
      .op = FfnOp::kDense, .layer = 1, .num_rows = 4, .rows = rows.data(), .out = slow_out.get()};
  FfnCall next = slow;
  next.layer = 2;
  next.out = next_out.get();
  absl::StatusOr<uint64_t> t1 = conn->Send(slow), t2 = conn->Send(next);
  ASSERT_TRUE(t1.ok() && t2.ok());
  const auto start = Clock::now();
  absl::Status st = conn->Wait(*t1, In(100));
  EXPECT_LT(Clock::now() - start, milliseconds(350));
  slow_out.reset();
  EXPECT_TRUE(absl::IsDeadlineExceeded(st)) << st;
  EXPECT_THAT(st.message(), HasSubstr("did not answer layer 1 within"));
  EXPECT_FALSE(conn->broken().ok());
  st = conn->Wait(*t2, In(5000));  // broken: at once
  next_out.reset();
  EXPECT_FALSE(st.ok());
  EXPECT_LT(Clock::now() - start, milliseconds(350));
  EXPECT_FALSE(conn->Send(next).ok());
  std::this_thread::sleep_for(milliseconds(600));  // past the late answer
  auto fresh = Dial(*server);
  ASSERT_NE(fresh, nullptr);
  ExpectDenseWorks(*fresh);
}

TEST(AfdTransport, PeerStalledMidHelloIsDropped) {
  ActivationOptions o = Options();
  o.io_timeout_ms = 300;
  auto server = StartServer(o);
  Raw stalled(server->address());
  const Bytes hello = Hello();
  stalled.Send(Bytes(hello.begin(), hello.begin() + 10));
  const auto start = Clock::now();
  auto good = Dial(*server);  // served meanwhile, on its own thread
  ASSERT_NE(good, nullptr);
  ExpectDenseWorks(*good);
  EXPECT_TRUE(stalled.ClosedWithin(3000));
  EXPECT_GE(Clock::now() - start, milliseconds(200));
  EXPECT_TRUE(WaitFor([&] { return server->num_connections() == 1; }));
  ExpectDenseWorks(*good);
}

}  // namespace
}  // namespace cleave::transport
