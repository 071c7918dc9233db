#include "frontend_main.h"

#include <chrono>
#include <cstdlib>
#include <map>

#include "absl/strings/str_cat.h"
#include "cleave/admin/admin_server.h"
#include "cleave/common/logging.h"
#include "cleave/frontend/api_keys.h"
#include "cleave/frontend/frontend_metrics.h"
#include "cleave/frontend/grpc_api.h"
#include "cleave/frontend/http_server.h"
#include "cleave/frontend/lifecycle.h"
#include "cleave/frontend/scheduler_client.h"

namespace cleave::cli {
namespace {

// SIGTERM: refuse new generations at once (and say so to load balancers: /ready 503, gRPC health
// NOT_SERVING), let the admitted ones finish for at most `grace`, then return so that the
// servers stop (cancelling whatever is left).
void Drain(frontend::FrontendLifecycle& lifecycle, frontend::FrontendMetrics& metrics,
           frontend::GrpcApiServer* grpc_api, std::chrono::seconds grace) {
  const auto started = std::chrono::steady_clock::now();
  lifecycle.BeginDrain();
  metrics.draining().Set(1);
  if (grpc_api != nullptr) grpc_api->SetServing(false);
  CLEAVE_LOG(Info) << "frontend draining: " << lifecycle.in_flight() << " requests in flight, up to "
                   << grace.count() << " s to finish";
  if (lifecycle.WaitIdle(started + grace)) {
    CLEAVE_LOG(Info) << "frontend drained in "
                     << std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count() << " s";
  } else {
    CLEAVE_LOG(Warning) << "frontend drain: grace of " << grace.count() << " s over; cancelling "
                        << lifecycle.in_flight() << " requests still in flight";
  }
}

// The admin listener: the frontend's /metrics, /health, and /ready and /debug/kv answered as the
// API port answers them, with no API key. `ctx` must outlive the server.
absl::StatusOr<std::unique_ptr<admin::AdminServer>> StartAdmin(const std::string& address,
                                                               const frontend::FrontendContext& ctx,
                                                               const frontend::FrontendMetrics& metrics) {
  absl::StatusOr<std::optional<admin::AdminServerOptions>> options =
      admin::ParseAdminAddress(address, "frontend admin_http");
  if (!options.ok()) return options.status();
  if (!options->has_value()) return std::unique_ptr<admin::AdminServer>();
  std::map<std::string, admin::AdminHandler> routes = admin::StandardRoutes(metrics.registry(), [] { return ""; });
  for (const char* path : {"/ready", "/debug/kv"}) {
    routes[path] = [&ctx, path] {
      frontend::GetAnswer a = frontend::AnswerGet(ctx, path);
      return admin::AdminResponse{a.status, a.content_type, std::move(a.body)};
    };
  }
  return admin::AdminServer::Start(**options, std::move(routes));
}

}  // namespace

absl::Status RunFrontend(const FrontendRunOptions& o, ShutdownLatch& shutdown) {
  absl::StatusOr<std::unique_ptr<frontend::FrontendModel>> model = frontend::LoadFrontendModel(o.model_dir);
  if (!model.ok()) return model.status();
  absl::StatusOr<std::pair<std::string, int>> http = SplitHostPort(o.frontend.http);
  if (!http.ok()) return http.status();

  // Credentials first: a missing file or key stops the start before anything listens.
  absl::StatusOr<std::optional<tls::TlsPem>> tls_pem = tls::LoadTlsPem(o.tls);
  if (!tls_pem.ok()) return tls_pem.status();
  const char* env_keys = std::getenv("CLEAVE_API_KEYS");
  absl::StatusOr<frontend::ApiKeys> api_keys =
      frontend::ApiKeys::Load(o.frontend.api_keys_file, env_keys != nullptr ? env_keys : "");
  if (!api_keys.ok()) return api_keys.status();

  std::unique_ptr<frontend::SchedulerClient> engine = frontend::SchedulerClient::Create(o.scheduler, *tls_pem);
  frontend::FrontendContext ctx = (*model)->MakeContext(engine.get());
  ctx.api_keys = &*api_keys;
  // Declared before the servers: they record into it until they stop.
  absl::StatusOr<std::unique_ptr<frontend::FrontendMetrics>> metrics = frontend::FrontendMetrics::Create();
  if (!metrics.ok()) return metrics.status();
  ctx.metrics = metrics->get();
  frontend::FrontendLifecycle lifecycle;  // outlives the servers: admissions release into it
  ctx.lifecycle = &lifecycle;

  frontend::HttpServerOptions hopts;
  hopts.host = http->first;
  hopts.port = http->second;
  hopts.threads = o.frontend.threads;
  hopts.max_body_bytes = o.frontend.max_body_bytes;
  absl::StatusOr<std::unique_ptr<frontend::HttpServer>> server = frontend::HttpServer::Start(hopts, ctx);
  if (!server.ok()) return server.status();
  std::unique_ptr<frontend::GrpcApiServer> grpc_api;
  if (o.frontend.grpc != "off") {
    absl::StatusOr<std::unique_ptr<frontend::GrpcApiServer>> g = frontend::GrpcApiServer::Start(o.frontend.grpc, ctx, *tls_pem);
    if (!g.ok()) return g.status();
    grpc_api = std::move(*g);
  }
  // Null when admin_http is "off".
  absl::StatusOr<std::unique_ptr<admin::AdminServer>> admin_server = StartAdmin(o.frontend.admin_http, ctx, **metrics);
  if (!admin_server.ok()) return admin_server.status();
  CLEAVE_LOG(Info) << "frontend: model " << ctx.model.id << ", HTTP on " << http->first << ":" << (*server)->port()
                   << (grpc_api ? absl::StrCat(", gRPC on port ", grpc_api->port()) : "")
                   << (*admin_server ? absl::StrCat(", admin HTTP on ", (*admin_server)->address()) : "") << ", scheduler "
                   << o.scheduler << (*tls_pem ? " (mutual TLS)" : "")
                   << (api_keys->enabled() ? absl::StrCat(", ", api_keys->size(), " API keys") : ", no API keys");
  shutdown.Wait();
  Drain(lifecycle, **metrics, grpc_api.get(), std::chrono::seconds(o.frontend.drain_grace_s));
  CLEAVE_LOG(Info) << "frontend shutting down";
  (*server)->Stop();
  if (grpc_api) grpc_api->Stop();
  if (*admin_server) (*admin_server)->Stop();
  engine->Shutdown();
  return absl::OkStatus();
}

}  // namespace cleave::cli
