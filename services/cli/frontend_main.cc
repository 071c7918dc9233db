#include "frontend_main.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
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

}  // namespace

absl::Status RunFrontend(const FrontendRunOptions& o, ShutdownLatch& shutdown) {
  absl::StatusOr<std::unique_ptr<frontend::FrontendModel>> model = frontend::LoadFrontendModel(o.model_dir);
  if (!model.ok()) return model.status();
  absl::StatusOr<std::pair<std::string, int>> http = SplitHostPort(o.frontend.http);
  if (!http.ok()) return http.status();

  std::unique_ptr<frontend::SchedulerClient> engine = frontend::SchedulerClient::Create(o.scheduler);
  frontend::FrontendContext ctx = (*model)->MakeContext(engine.get());
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
    absl::StatusOr<std::unique_ptr<frontend::GrpcApiServer>> g = frontend::GrpcApiServer::Start(o.frontend.grpc, ctx);
    if (!g.ok()) return g.status();
    grpc_api = std::move(*g);
  }
  CLEAVE_LOG(Info) << "frontend: model " << ctx.model.id << ", HTTP on " << http->first << ":" << (*server)->port()
                   << (grpc_api ? absl::StrCat(", gRPC on port ", grpc_api->port()) : "") << ", scheduler "
                   << o.scheduler;
  shutdown.Wait();
  Drain(lifecycle, **metrics, grpc_api.get(), std::chrono::seconds(o.frontend.drain_grace_s));
  CLEAVE_LOG(Info) << "frontend shutting down";
  (*server)->Stop();
  if (grpc_api) grpc_api->Stop();
  engine->Shutdown();
  return absl::OkStatus();
}

}  // namespace cleave::cli
