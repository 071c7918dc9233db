// Test helpers for the HTTP server: a small blocking HTTP/1.1 client over a raw socket (so tests
// see exactly the bytes on the wire), SSE parsing, and a harness that serves a tiny model from a
// scripted engine on a loopback port. Header-only on purpose: only tests include it.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/str_split.h"
#include "cleave/frontend/http_server.h"
#include "cleave/frontend/testing/scripted_engine.h"
#include "cleave/frontend/testing/tiny_model.h"

namespace cleave::frontend::testing {

// ---- a small blocking HTTP/1.1 client -----------------------------------------------------

struct Response {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;                            // de-chunked
  bool ok = false;                             // a complete response was read
};

class Client {
 public:
  explicit Client(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    timeval tv{10, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  }
  ~Client() { Close(); }
  bool connected() const { return connected_; }
  void Close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  bool Send(std::string_view data) {
    while (!data.empty()) {
      ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return false;
      data.remove_prefix(static_cast<size_t>(n));
    }
    return true;
  }
  // Reads until `buf_` holds `n` bytes past `from`, or EOF.
  bool Fill(size_t need) {
    char tmp[65536];
    while (buf_.size() < need) {
      ssize_t n = ::recv(fd_, tmp, sizeof(tmp), 0);
      if (n <= 0) return false;
      buf_.append(tmp, static_cast<size_t>(n));
    }
    return true;
  }
  bool ReadUntil(std::string_view marker, size_t* pos) {
    char tmp[65536];
    while ((*pos = buf_.find(marker)) == std::string::npos) {
      ssize_t n = ::recv(fd_, tmp, sizeof(tmp), 0);
      if (n <= 0) return false;
      buf_.append(tmp, static_cast<size_t>(n));
    }
    return true;
  }
  Response Read() {
    Response r;
    size_t end = 0;
    if (!ReadUntil("\r\n\r\n", &end)) return r;
    std::string head = buf_.substr(0, end);
    buf_.erase(0, end + 4);
    std::vector<std::string> lines = absl::StrSplit(head, "\r\n");
    if (lines.empty() || lines[0].size() < 12) return r;
    r.status = std::stoi(lines[0].substr(9, 3));
    for (size_t i = 1; i < lines.size(); ++i) {
      size_t colon = lines[i].find(':');
      if (colon == std::string::npos) continue;
      std::string name = lines[i].substr(0, colon);
      for (char& c : name) c = static_cast<char>(std::tolower(c));
      r.headers[name] = colon + 2 <= lines[i].size() ? lines[i].substr(colon + 2) : "";
    }
    if (r.status == 100) return Read();
    if (r.headers.count("content-length")) {
      size_t len = std::stoul(r.headers["content-length"]);
      if (!Fill(len)) return r;
      r.body = buf_.substr(0, len);
      buf_.erase(0, len);
      r.ok = true;
    } else if (r.headers.count("transfer-encoding") && r.headers["transfer-encoding"] == "chunked") {
      for (;;) {
        size_t eol = 0;
        if (!ReadUntil("\r\n", &eol)) return r;
        size_t size = std::stoul(buf_.substr(0, eol), nullptr, 16);
        buf_.erase(0, eol + 2);
        if (!Fill(size + 2)) return r;
        r.body += buf_.substr(0, size);
        buf_.erase(0, size + 2);
        if (size == 0) break;
      }
      r.ok = true;
    } else {  // until close
      char tmp[65536];
      ssize_t n;
      while ((n = ::recv(fd_, tmp, sizeof(tmp), 0)) > 0) buf_.append(tmp, static_cast<size_t>(n));
      r.body = std::move(buf_);
      buf_.clear();
      r.ok = true;
    }
    return r;
  }
  // True once the server has closed the connection.
  bool PeerClosed() {
    char c;
    ssize_t n = ::recv(fd_, &c, 1, 0);
    return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK);
  }
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string buf_;
};

inline std::string Post(const std::string& path, const std::string& body,
                        const std::string& extra = "") {
  return "POST " + path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
         "Content-Length: " + std::to_string(body.size()) + "\r\n\r\n" + body;
}
inline std::string Get(const std::string& path) {
  return "GET " + path + " HTTP/1.1\r\nHost: x\r\n\r\n";
}

// "data: ..." payloads of an SSE body; empty when an event is not a data line.
inline std::vector<std::string> SseData(const std::string& body) {
  std::vector<std::string> out;
  for (absl::string_view event : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
    std::string e(event);
    out.push_back(e.substr(0, 6) == "data: " ? e.substr(6) : std::string());
  }
  return out;
}

// A served model (MakeTinyModelDir, served as "tiny"), a ScriptedEngine whose script the test
// sets, and an HttpServer on 127.0.0.1 with a 64 KiB body limit. Run from the source root.
class HttpHarness {
 public:
  absl::Status Start() {
    absl::StatusOr<std::filesystem::path> dir = MakeTinyModelDir("http");
    if (!dir.ok()) return dir.status();
    dir_ = *dir;
    LoadFrontendModelOptions o;
    o.served_model_name = "tiny";
    absl::StatusOr<std::unique_ptr<FrontendModel>> m = LoadFrontendModel(dir_, o);
    if (!m.ok()) return m.status();
    model = *std::move(m);
    engine = std::make_unique<ScriptedEngine>([this](const v1::SubmitRequest& r) {
      std::lock_guard<std::mutex> lock(mu);
      return scripter ? scripter(r) : script;
    });
    ctx = model->MakeContext(engine.get());
    HttpServerOptions options;
    options.host = "127.0.0.1";
    options.port = 0;
    options.threads = 2;
    options.max_body_bytes = 64 << 10;
    absl::StatusOr<std::unique_ptr<HttpServer>> s = HttpServer::Start(options, ctx);
    if (!s.ok()) return s.status();
    server = *std::move(s);
    return absl::OkStatus();
  }
  ~HttpHarness() {
    server.reset();
    engine.reset();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  // Ids a model would generate for " " + text (SentencePiece's dummy prefix adds the space).
  std::vector<EngineToken> Tokens(const std::string& text) {
    std::vector<EngineToken> out;
    absl::StatusOr<std::vector<int32_t>> ids = model->tokenizer->Encode(text, false);
    for (int32_t id : ids.value_or(std::vector<int32_t>{})) out.push_back({id, -0.5f, {}});
    return out;
  }
  EngineToken Eos() { return {2, -0.1f, {}}; }
  // Every request plays `tokens` (then EOS when `eos`).
  void SetScript(std::vector<EngineToken> tokens, bool eos = true) {
    std::lock_guard<std::mutex> lock(mu);
    script = {};
    script.tokens = std::move(tokens);
    if (eos) script.tokens.push_back(Eos());
  }
  Response Call(const std::string& request) {
    Client c(server->port());
    c.Send(request);
    return c.Read();
  }
  bool NoRequestsLeft() {
    return engine->WaitFor([](size_t active, size_t, size_t) { return active == 0; });
  }

  std::unique_ptr<FrontendModel> model;
  std::unique_ptr<ScriptedEngine> engine;
  FrontendContext ctx;
  std::unique_ptr<HttpServer> server;
  std::mutex mu;  // guards script and scripter
  ScriptedEngine::Script script;
  std::function<ScriptedEngine::Script(const v1::SubmitRequest&)> scripter;

 private:
  std::filesystem::path dir_;
};

}  // namespace cleave::frontend::testing
