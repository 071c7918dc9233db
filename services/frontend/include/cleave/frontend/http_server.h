// The OpenAI-compatible HTTP/1.1 API (Boost.Beast over Asio): completions and chat completions
// with SSE streaming, models, tokenize/detokenize, health, readiness and a KV debug dump.
//
// Routes:
//   POST /v1/completions, POST /v1/chat/completions   (stream: SSE "data: {...}\n\n" ... "[DONE]")
//   GET  /v1/models
//   POST /tokenize, POST /detokenize                  (vLLM's shapes)
//   GET  /health  (200 while the process lives), GET /ready (200 iff engine->Ready() and not
//   draining, else 503). While the frontend drains (lifecycle.h) the generation routes answer 503
//   with Retry-After; every other route keeps answering.
// Generation responses carry an x-request-id header (request_log.h), and each request leaves one
// request_done log line.
//   GET  /debug/kv (engine->Stats() as JSON: per-worker free/used/cached blocks)
// Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}.
//
// Concurrency: every connection is a chain of async operations on a strand of one small
// io_context thread pool (no thread per connection); thousands of idle or streaming connections
// cost only their buffers. A client that disconnects mid-request has its engine requests
// cancelled at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "cleave/frontend/frontend_context.h"

namespace cleave::frontend {

struct HttpServerOptions {
  std::string host = "0.0.0.0";
  int port = 8000;                         // 0 = any free port (see HttpServer::port())
  int threads = 2;                         // io_context threads
  size_t max_body_bytes = 8 << 20;         // larger bodies: 413 (by Content-Length, before reading)
  size_t max_header_bytes = 64 << 10;      // larger headers: 431
  int idle_timeout_s = 600;                // keep-alive connections idle this long are closed
  int max_connections = 10000;             // beyond this, new connections are closed at once
};

// One GET of a route that answers at once (/ready, /debug/kv, /metrics, ...) exactly as the
// API port answers it, but with no API key check: for the frontend's admin listener, which is
// bound to an internal address. Thread-safe.
struct GetAnswer {
  int status = 200;
  std::string content_type;
  std::string body;
};
GetAnswer AnswerGet(const FrontendContext& ctx, std::string_view path);

class HttpServer {
 public:
  // Binds and starts serving on `options.threads` threads before returning. ctx (and everything
  // it points to) must outlive the server. Unavailable if the address cannot be bound.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<HttpServer>> Start(
      const HttpServerOptions& options, FrontendContext& ctx);

  ~HttpServer();  // Stop()
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  int port() const;  // the bound port
  // Stops accepting, closes every connection (cancelling their requests) and joins the threads.
  // Idempotent; thread-safe; must not be called from a server thread.
  void Stop();

  struct Impl;

 private:
  explicit HttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cleave::frontend
