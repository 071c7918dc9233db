// AdminServer over real loopback sockets: the standard routes, error answers, HEAD, keep-alive,
// concurrent clients, a silent client, and Stop().
#include "cleave/admin/admin_server.h"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>

#include "cleave/common/metrics.h"

namespace cleave::admin {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

struct Reply {
  int status = 0;
  std::string content_type;
  std::string body;
  std::string content_length;
  std::string allow;
  bool keep_alive = false;
};

// One blocking client connection.
class Client {
 public:
  explicit Client(int port) : socket_(ioc_) {
    socket_.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), port));
  }

  Reply Send(http::verb method, const std::string& target, bool keep_alive = true) {
    http::request<http::string_body> req{method, target, 11};
    req.set(http::field::host, "localhost");
    req.keep_alive(keep_alive);
    if (method == http::verb::post) req.body() = "{}";
    req.prepare_payload();
    http::write(socket_, req);
    http::response_parser<http::string_body> parser;
    parser.skip(method == http::verb::head);  // a HEAD response has headers only
    http::read(socket_, buffer_, parser);
    const auto& res = parser.get();
    return Reply{static_cast<int>(res.result_int()),
                 std::string(res[http::field::content_type]),
                 res.body(),
                 std::string(res[http::field::content_length]),
                 std::string(res[http::field::allow]),
                 res.keep_alive()};
  }

  // True when the server closed the connection (reads EOF) before `timeout`.
  bool ClosedByServerWithin(std::chrono::seconds timeout) {
    socket_.non_blocking(false);
    timeval tv{static_cast<time_t>(timeout.count()), 0};
    setsockopt(socket_.native_handle(), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    char c;
    boost::system::error_code ec;
    socket_.read_some(net::buffer(&c, 1), ec);
    return ec == net::error::eof || ec == net::error::connection_reset;
  }

  tcp::socket& socket() { return socket_; }

 private:
  net::io_context ioc_;
  tcp::socket socket_;
  beast::flat_buffer buffer_;
};

class AdminServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto counter = registry_.AddCounter("cleave_test_events_total", "Events for the test.");
    ASSERT_TRUE(counter.ok()) << counter.status();
    (*counter)->Inc(3);
    auto routes = StandardRoutes(registry_, [this] {
      std::lock_guard<std::mutex> lock(mu_);
      return reason_;
    });
    routes["/extra"] = [] { return AdminResponse{200, "application/json", "[1,2]"}; };
    auto server = AdminServer::Start({}, std::move(routes));
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
  }

  void SetNotReady(std::string reason) {
    std::lock_guard<std::mutex> lock(mu_);
    reason_ = std::move(reason);
  }

  metrics::Registry registry_;
  std::mutex mu_;
  std::string reason_;  // guarded by mu_
  std::unique_ptr<AdminServer> server_;
};

TEST_F(AdminServerTest, ServesStandardRoutes) {
  ASSERT_GT(server_->port(), 0);
  EXPECT_EQ(server_->address(), "127.0.0.1:" + std::to_string(server_->port()));
  Client c(server_->port());
  Reply metrics = c.Send(http::verb::get, "/metrics");
  EXPECT_EQ(metrics.status, 200);
  EXPECT_EQ(metrics.content_type, metrics::kContentType);
  EXPECT_NE(metrics.body.find("cleave_test_events_total 3\n"), std::string::npos) << metrics.body;

  Reply health = c.Send(http::verb::get, "/health");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(health.content_type, "application/json");
  EXPECT_EQ(health.body, R"({"status":"alive"})");

  Reply ready = c.Send(http::verb::get, "/ready?verbose=1");  // the query string is ignored
  EXPECT_EQ(ready.status, 200);
  EXPECT_EQ(ready.body, R"({"ready":true})");

  Reply extra = c.Send(http::verb::get, "/extra");
  EXPECT_EQ(extra.status, 200);
  EXPECT_EQ(extra.body, "[1,2]");
  EXPECT_TRUE(extra.keep_alive);  // four requests answered on one connection
}

TEST_F(AdminServerTest, ReadyAnswers503WithTheReason) {
  SetNotReady("engine loop \"stalled\" for 3.2 s");
  Client c(server_->port());
  Reply r = c.Send(http::verb::get, "/ready");
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(r.content_type, "application/json");
  EXPECT_EQ(r.body, R"({"ready":false,"reason":"engine loop \"stalled\" for 3.2 s"})");
  SetNotReady("");
  EXPECT_EQ(c.Send(http::verb::get, "/ready").status, 200);
}

TEST_F(AdminServerTest, UnknownPathIs404AndOtherMethodsAre405) {
  Client c(server_->port());
  Reply missing = c.Send(http::verb::get, "/nope?x=1");
  EXPECT_EQ(missing.status, 404);
  EXPECT_EQ(missing.content_type, "application/json");
  EXPECT_EQ(missing.body, R"({"error":{"message":"no route for /nope"}})");

  Reply post = c.Send(http::verb::post, "/metrics");
  EXPECT_EQ(post.status, 405);
  EXPECT_EQ(post.allow, "GET, HEAD");
  EXPECT_EQ(post.body, R"({"error":{"message":"/metrics accepts GET and HEAD only"}})");
  // The request body was consumed: the connection is still in step.
  EXPECT_EQ(c.Send(http::verb::delete_, "/health").status, 405);
  EXPECT_EQ(c.Send(http::verb::get, "/health").status, 200);
}

TEST_F(AdminServerTest, HeadHasGetsHeadersAndNoBody) {
  Client c(server_->port());
  Reply get = c.Send(http::verb::get, "/health");
  Reply head = c.Send(http::verb::head, "/health");
  EXPECT_EQ(head.status, 200);
  EXPECT_EQ(head.content_type, get.content_type);
  EXPECT_EQ(head.content_length, std::to_string(get.body.size()));
  EXPECT_EQ(head.body, "");
  // Were a body sent after the HEAD headers, this GET would read it as its status line.
  EXPECT_EQ(c.Send(http::verb::get, "/health").body, get.body);
  EXPECT_EQ(c.Send(http::verb::head, "/missing").status, 404);
}

TEST_F(AdminServerTest, ConnectionCloseIsHonoured) {
  Client c(server_->port());
  Reply r = c.Send(http::verb::get, "/health", /*keep_alive=*/false);
  EXPECT_EQ(r.status, 200);
  EXPECT_FALSE(r.keep_alive);
  EXPECT_TRUE(c.ClosedByServerWithin(std::chrono::seconds(5)));
}

TEST_F(AdminServerTest, ServesConcurrentClients) {
  constexpr int kClients = 16;
  constexpr int kRequests = 25;
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kClients; ++t) {
    threads.emplace_back([&] {
      Client c(server_->port());
      for (int i = 0; i < kRequests; ++i) {
        if (c.Send(http::verb::get, i % 2 ? "/metrics" : "/ready").status == 200) ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), kClients * kRequests);
}

TEST_F(AdminServerTest, SilentClientDoesNotBlockOthersAndTimesOut) {
  Client silent(server_->port());  // connects and sends nothing
  Client partial(server_->port());
  net::write(partial.socket(), net::buffer(std::string("GET /health HTTP/1.1\r\nHo")));
  const auto start = std::chrono::steady_clock::now();
  Client c(server_->port());
  EXPECT_EQ(c.Send(http::verb::get, "/health").status, 200);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  // The read timeout (10 s) closes both stuck connections.
  EXPECT_TRUE(silent.ClosedByServerWithin(std::chrono::seconds(15)));
  EXPECT_TRUE(partial.ClosedByServerWithin(std::chrono::seconds(5)));
}

TEST_F(AdminServerTest, StopIsIdempotentAndClosesConnections) {
  const int port = server_->port();
  Client idle(port);
  Client used(port);
  EXPECT_EQ(used.Send(http::verb::get, "/health").status, 200);
  const auto start = std::chrono::steady_clock::now();
  server_->Stop();
  server_->Stop();
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));  // no timeout wait
  EXPECT_TRUE(idle.ClosedByServerWithin(std::chrono::seconds(2)));
  EXPECT_TRUE(used.ClosedByServerWithin(std::chrono::seconds(2)));
  EXPECT_THROW(Client{port}, boost::system::system_error);  // nothing listens any more
  server_.reset();  // the destructor stops again
}

TEST(AdminServerStartTest, RefusesBadAddresses) {
  auto first = AdminServer::Start({}, {});
  ASSERT_TRUE(first.ok()) << first.status();
  auto taken = AdminServer::Start({"127.0.0.1", (*first)->port()}, {});
  EXPECT_EQ(taken.status().code(), absl::StatusCode::kUnavailable) << taken.status();
  auto bad_host = AdminServer::Start({"not a host", 0}, {});
  EXPECT_EQ(bad_host.status().code(), absl::StatusCode::kInvalidArgument) << bad_host.status();
  auto bad_port = AdminServer::Start({"127.0.0.1", 70000}, {});
  EXPECT_EQ(bad_port.status().code(), absl::StatusCode::kInvalidArgument) << bad_port.status();
}

}  // namespace
}  // namespace cleave::admin

namespace cleave::admin {
namespace {

TEST(ParseAdminAddressTest, HostPortOrOff) {
  auto off = ParseAdminAddress("off", "worker http");
  ASSERT_TRUE(off.ok());
  EXPECT_FALSE(off->has_value());
  auto v4 = ParseAdminAddress("10.0.0.5:9100", "worker http");
  ASSERT_TRUE(v4.ok() && v4->has_value());
  EXPECT_EQ((*v4)->host, "10.0.0.5");
  EXPECT_EQ((*v4)->port, 9100);
  auto v6 = ParseAdminAddress("[::1]:0", "worker http");
  ASSERT_TRUE(v6.ok() && v6->has_value());
  EXPECT_EQ((*v6)->host, "::1");
  EXPECT_EQ((*v6)->port, 0);
  for (const char* bad : {"9100", ":9100", "host:", "host:x", "host:70000", "host:-1"}) {
    auto r = ParseAdminAddress(bad, "worker http");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(r.status().message().find("worker http"), std::string_view::npos) << bad;
  }
}

}  // namespace
}  // namespace cleave::admin
