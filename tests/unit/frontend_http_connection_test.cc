// The HTTP server's connection handling on loopback: body and header limits, malformed input,
// client disconnects (streaming and not), shutdown with requests in flight, pipelining,
// HTTP/1.0, and 1,000 concurrent streams.
#include <chrono>
#include <map>

#include <poll.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cleave/frontend/http_protocol.h"
#include "cleave/frontend/testing/http_test_client.h"
#include "nlohmann/json.hpp"

namespace cleave::frontend {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::Client;
using testing::Get;
using testing::HttpHarness;
using testing::Post;
using testing::Response;
using testing::ScriptedEngine;
using testing::SseData;

void ExpectError(const Response& r, int status, const std::string& type, const std::string& text) {
  EXPECT_EQ(r.status, status) << r.body;
  json j = json::parse(r.body, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.body;
  ASSERT_TRUE(j.contains("error")) << r.body;
  EXPECT_EQ(j["error"]["type"], type) << r.body;
  EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr(text));
  EXPECT_TRUE(j["error"].contains("param"));
  EXPECT_TRUE(j["error"].contains("code"));
}

class HttpTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(h_.Start().ok()); }
  HttpHarness h_;
};

TEST_F(HttpTest, OversizedBodies) {
  // Declared 100 MB: refused from the headers alone, without waiting for the body.
  Client c(h_.server->port());
  ASSERT_TRUE(c.Send("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{"));
  auto start = std::chrono::steady_clock::now();
  Response r = c.Read();
  ExpectError(r, 413, "invalid_request_error", "too large");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(2));
  EXPECT_TRUE(c.PeerClosed());

  // Chunked: cut off once past the limit (64 KiB in this fixture).
  Client chunked(h_.server->port());
  ASSERT_TRUE(chunked.Send("POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"));
  std::string piece(16 << 10, 'a');
  for (int i = 0; i < 8; ++i) {
    if (!chunked.Send(HttpChunk(piece))) break;  // the server may close first
  }
  ExpectError(chunked.Read(), 413, "invalid_request_error", "too large");

  // Headers past the limit: 431.
  Client headers(h_.server->port());
  ASSERT_TRUE(headers.Send("GET /health HTTP/1.1\r\nX-Big: " + std::string(100 << 10, 'h') + "\r\n\r\n"));
  EXPECT_EQ(headers.Read().status, 431);
}

TEST_F(HttpTest, ExpectContinue) {
  Client c(h_.server->port());
  ASSERT_TRUE(c.Send("POST /tokenize HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     "Content-Length: 17\r\n\r\n"));
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ASSERT_TRUE(c.Send(R"({"prompt": "Hi"})" "\n"));
  Response r = c.Read();  // skips the interim 100
  EXPECT_EQ(r.status, 200) << r.body;
}

TEST_F(HttpTest, GarbageNeverCrashes) {
  for (const std::string& junk : {std::string("\x00\x01\x02 garbage\r\n\r\n", 15),
                                  std::string("GET\r\n\r\n"), std::string("POST / HTTP/9.9\r\n\r\n"),
                                  std::string("GET /health HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
                                  std::string("GET /health HTTP/1.1\r\nContent-Length: 1\r\n"
                                              "Content-Length: 2\r\n\r\nab")}) {
    Client c(h_.server->port());
    c.Send(junk);
    Response r = c.Read();
    if (r.status != 0) {
      EXPECT_GE(r.status, 400) << junk;
    }
  }
  EXPECT_EQ(h_.Call(Get("/health")).status, 200);  // still serving
}

TEST_F(HttpTest, ClientDisconnectCancelsStream) {
  h_.SetScript(h_.Tokens("a b c"), false);
  h_.script.hang = true;  // would run forever
  Client c(h_.server->port());
  ASSERT_TRUE(c.Send(Post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}],
                                                      "stream": true, "n": 2})")));
  size_t pos = 0;
  ASSERT_TRUE(c.ReadUntil("content", &pos));  // streaming has begun
  ASSERT_EQ(h_.engine->active(), 2u);
  c.Close();
  ASSERT_TRUE(h_.NoRequestsLeft());
  ASSERT_EQ(h_.engine->cancels().size(), 2u);
  for (const auto& [id, finished] : h_.engine->cancels()) EXPECT_FALSE(finished);
}

TEST_F(HttpTest, ClientDisconnectCancelsNonStreamingRequest) {
  h_.SetScript({}, false);
  h_.script.hang = true;
  Client c(h_.server->port());
  ASSERT_TRUE(c.Send(Post("/v1/completions", R"({"prompt": "x"})")));
  ASSERT_TRUE(h_.engine->WaitFor([](size_t active, size_t, size_t) { return active == 1; }));
  c.Close();
  ASSERT_TRUE(h_.NoRequestsLeft());
  EXPECT_EQ(h_.engine->cancels().size(), 1u);
}

TEST_F(HttpTest, StopCancelsInFlightRequests) {
  h_.SetScript({}, false);
  h_.script.hang = true;
  Client c(h_.server->port());
  ASSERT_TRUE(c.Send(Post("/v1/completions", R"({"prompt": "x", "stream": true})")));
  ASSERT_TRUE(h_.engine->WaitFor([](size_t active, size_t, size_t) { return active == 1; }));
  h_.server->Stop();
  EXPECT_EQ(h_.engine->active(), 0u);
  EXPECT_TRUE(c.PeerClosed());
}

TEST_F(HttpTest, PipelinedRequestsAreAnsweredInOrder) {
  h_.SetScript(h_.Tokens("hi"));
  Client c(h_.server->port());
  ASSERT_TRUE(c.Send(Post("/v1/completions", R"({"prompt": "x"})") + Get("/v1/models") +
                     Post("/tokenize", R"({"prompt": "Hi"})")));
  Response a = c.Read(), b = c.Read(), t = c.Read();
  EXPECT_EQ(json::parse(a.body)["object"], "text_completion");
  EXPECT_EQ(json::parse(b.body)["object"], "list");
  EXPECT_TRUE(json::parse(t.body).contains("tokens"));
}

TEST_F(HttpTest, Http10StreamEndsWithClose) {
  h_.SetScript(h_.Tokens("ok"));
  std::string body = R"({"prompt": "x", "stream": true})";
  Client c(h_.server->port());
  ASSERT_TRUE(c.Send("POST /v1/completions HTTP/1.0\r\nContent-Length: " +
                     std::to_string(body.size()) + "\r\n\r\n" + body));
  Response r = c.Read();
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.headers.count("transfer-encoding"), 0u);
  EXPECT_EQ(SseData(r.body).back(), "[DONE]");
}

// 1,000 clients streaming at once from one process on two server threads.
TEST_F(HttpTest, ThousandConcurrentStreams) {
  constexpr int kClients = 1000;
  h_.SetScript(h_.Tokens("one two three four five six seven eight"));
  h_.script.interval = std::chrono::milliseconds(20);
  std::vector<std::unique_ptr<Client>> clients;
  const std::string request = Post("/v1/completions", R"({"prompt": "x", "stream": true})");
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(std::make_unique<Client>(h_.server->port()));
    ASSERT_TRUE(clients.back()->connected()) << i;
    ASSERT_TRUE(clients.back()->Send(request)) << i;
  }
  // Every stream is open at once before any finishes.
  ASSERT_TRUE(h_.engine->WaitFor([&](size_t, size_t, size_t submitted) {
    return submitted == static_cast<size_t>(kClients);
  }, std::chrono::milliseconds(30000)));
  std::vector<std::string> bodies(kClients);
  std::vector<bool> done(kClients, false);
  int remaining = kClients;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (remaining > 0 && std::chrono::steady_clock::now() < deadline) {
    std::vector<pollfd> fds;
    std::vector<int> which;
    for (int i = 0; i < kClients; ++i) {
      if (!done[i]) {
        fds.push_back({clients[i]->fd(), POLLIN, 0});
        which.push_back(i);
      }
    }
    if (::poll(fds.data(), fds.size(), 1000) <= 0) continue;
    for (size_t k = 0; k < fds.size(); ++k) {
      if (!(fds[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[8192];
      ssize_t n = ::recv(fds[k].fd, buf, sizeof(buf), 0);
      int i = which[k];
      if (n > 0) bodies[i].append(buf, static_cast<size_t>(n));
      // The chunked terminator follows the previous chunk's CRLF; a bare "0\r\n\r\n" could also be
      // the end of the header block (an x-request-id ending in 0).
      if (n <= 0 || bodies[i].ends_with("\r\n0\r\n\r\n")) {
        done[i] = true;
        --remaining;
      }
    }
  }
  ASSERT_EQ(remaining, 0);
  for (int i = 0; i < kClients; ++i) {
    EXPECT_THAT(bodies[i], HasSubstr("data: [DONE]")) << i;
    EXPECT_THAT(bodies[i], HasSubstr("\"finish_reason\":\"stop\"")) << i;
  }
  EXPECT_TRUE(h_.NoRequestsLeft());
}

}  // namespace
}  // namespace cleave::frontend
