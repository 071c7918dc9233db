// The small HTTP/1.1 port every non-frontend process (scheduler, workers) opens for operators and
// orchestrators: GET /metrics (Prometheus text), GET /health (the process is alive), GET /ready
// (it can serve now), plus whatever extra GET routes a role adds (the scheduler's Prometheus
// service discovery). Boost.Beast over one Asio thread: the handlers are cheap, scrapes are rare,
// and a slow or stuck client cannot block another (every connection is async with a timeout).
// Connections are kept alive between requests; one that has not sent a complete request within
// 10 s (idle, or stuck mid-request) is closed. Requests are small GETs: headers over 16 KiB or a
// body over 64 KiB close the connection.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace cleave::metrics {
class Registry;
}

namespace cleave::admin {

struct AdminResponse {
  int status = 200;
  std::string content_type = "text/plain; charset=utf-8";
  std::string body;
};

// Called on the server thread for each GET (or HEAD) of its exact path (the query string is
// ignored). Must be thread-safe against the process's other threads and must not block for long.
using AdminHandler = std::function<AdminResponse()>;

struct AdminServerOptions {
  std::string host = "127.0.0.1";
  int port = 0;  // 0 = any free port (see AdminServer::port())
};

// `address` as configured: "HOST:PORT" (a bracketed IPv6 host is unbracketed; port 0 = any free
// port) or "off" (nullopt). InvalidArgument naming `what` (e.g. "worker http") otherwise.
absl::StatusOr<std::optional<AdminServerOptions>> ParseAdminAddress(const std::string& address,
                                                                    const std::string& what);

class AdminServer {
 public:
  // Binds and starts serving before returning. Unknown paths answer 404, other methods 405 (both
  // with a JSON error body). Unavailable if the address cannot be bound.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<AdminServer>> Start(
      const AdminServerOptions& options, std::map<std::string, AdminHandler> routes);
  ~AdminServer();  // Stop()
  AdminServer(const AdminServer&) = delete;
  AdminServer& operator=(const AdminServer&) = delete;

  int port() const;
  std::string address() const;  // HOST:PORT as bound (host as given)
  // Idempotent; closes every connection and joins the thread. Thread-safe, but not from inside
  // a handler (it would join its own thread).
  void Stop();

  struct Impl;

 private:
  explicit AdminServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// The three standard routes: /metrics renders `registry` (Content-Type metrics::kContentType);
// /health answers 200 {"status":"alive"}; /ready calls `not_ready_reason` and answers 200
// {"ready":true} when it returns "" and 503 {"ready":false,"reason":...} otherwise.
std::map<std::string, AdminHandler> StandardRoutes(const metrics::Registry& registry,
                                                   std::function<std::string()> not_ready_reason);

}  // namespace cleave::admin
