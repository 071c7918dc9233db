#include "cleave/scheduler/service.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "cleave/common/tls.h"
#include "cleave/v1/control.grpc.pb.h"
#include "scheduler_http.h"

namespace cleave::scheduler {
namespace {

// A worker listening on a wildcard address ("0.0.0.0:PORT", ":PORT") is reachable at the address
// it connected from: that is what service discovery must hand to Prometheus. `peer` is gRPC's
// "ipv4:10.0.0.5:41234" / "ipv6:[fd00::5]:41234".
std::string ReachableAddress(const std::string& address, const std::string& peer) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return address;
  const std::string host = address.substr(0, colon);
  if (!host.empty() && host != "0.0.0.0" && host != "[::]" && host != "::") return address;
  const size_t kind = peer.find(':');
  const size_t port = peer.rfind(':');
  if (kind == std::string::npos || port == kind) return address;
  return peer.substr(kind + 1, port - kind - 1) + address.substr(colon);
}

// Plaintext, or TLS that requires and verifies a client certificate signed by the CA: only
// workers and frontends of this cluster reach the control plane.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials(const SchedulerServerOptions& o) {
  absl::StatusOr<std::optional<tls::TlsPem>> pem =
      tls::LoadTlsPem({o.tls_ca_file, o.tls_cert_file, o.tls_key_file});
  if (!pem.ok()) return pem.status();
  if (!pem->has_value()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions ssl(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ssl.pem_root_certs = (*pem)->ca;
  ssl.pem_key_cert_pairs.push_back({(*pem)->key, (*pem)->cert});
  return grpc::SslServerCredentials(ssl);
}

Clock NowMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// An outgoing queue and its writer thread, for one peer stream. `Write` batches what is queued.
template <typename Item>
class Outgoing {
 public:
  void Push(Item item) {
    {
      std::lock_guard lock(mu_);
      if (closed_) return;
      queue_.push_back(std::move(item));
    }
    cv_.notify_one();
  }
  void Close() {
    {
      std::lock_guard lock(mu_);
      closed_ = true;
    }
    cv_.notify_all();
  }
  // Runs on the writer thread until Close(); `write` returns false when the stream is broken.
  template <typename WriteFn>
  void Drain(WriteFn write) {
    std::deque<Item> batch;
    while (true) {
      {
        std::unique_lock lock(mu_);
        cv_.wait(lock, [&] { return closed_ || !queue_.empty(); });
        if (closed_) return;
        batch.swap(queue_);
      }
      if (!write(batch)) return;
      batch.clear();
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool closed_ = false;
};

using WorkerQueue = Outgoing<v1::SchedulerMessage>;
using FrontendQueue = Outgoing<v1::RequestEvent>;

}  // namespace

class SchedulerServiceImpl final : public v1::Scheduler::Service {
 public:
  explicit SchedulerServiceImpl(SchedulerConfig config) : core_(std::move(config)) {
    ticker_ = std::thread([this] { Tick(); });
  }
  ~SchedulerServiceImpl() override { StopTicker(); }

  void SetMetrics(SchedulerMetrics* metrics) {
    std::lock_guard lock(mu_);
    core_.SetMetrics(metrics);
  }
  v1::StatsResponse CurrentStats() {
    std::lock_guard lock(mu_);
    return core_.Stats();
  }
  std::string NotReadyReason() {
    std::lock_guard lock(mu_);
    return core_.NotReadyReason();
  }

  void StopTicker() {
    {
      std::lock_guard lock(mu_);
      if (stop_) return;
      stop_ = true;
    }
    tick_cv_.notify_all();
    ticker_.join();
  }

  grpc::Status RegisterWorker(grpc::ServerContext* context, const v1::RegisterWorkerRequest* request,
                              v1::RegisterWorkerResponse* reply) override {
    v1::RegisterWorkerRequest reg = *request;
    if (!reg.http_address().empty()) reg.set_http_address(ReachableAddress(reg.http_address(), context->peer()));
    std::lock_guard lock(mu_);
    absl::StatusOr<WorkerId> id = core_.AddWorker(reg, NowMs());
    if (!id.ok()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(id.status().message()));
    // Messages for it (AfdPeers right away) wait in its queue until its stream opens.
    workers_[*id] = std::make_shared<WorkerQueue>();
    reply->set_worker_id(*id);
    reply->set_lease_ms(core_.config().lease_ms);
    reply->set_heartbeat_ms(core_.config().heartbeat_ms);
    CLEAVE_LOG(Info) << "worker " << *id << " registered: " << request->name() << " ("
                     << v1::WorkerRole_Name(request->role()) << ", " << request->num_kv_blocks() << " blocks)";
    RunScheduleLocked();
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse* reply) override {
    std::lock_guard lock(mu_);
    reply->set_known(core_.Heartbeat(request->worker_id(), NowMs()));
    return grpc::Status::OK;
  }

  grpc::Status WorkerStream(grpc::ServerContext* context,
                            grpc::ServerReaderWriter<v1::SchedulerMessage, v1::WorkerMessage>* stream) override {
    v1::WorkerMessage msg;
    if (!stream->Read(&msg) || !msg.has_hello_worker_id()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "the first message must be hello_worker_id");
    }
    const WorkerId id = msg.hello_worker_id();
    std::shared_ptr<WorkerQueue> queue;
    {
      std::lock_guard lock(mu_);
      auto it = workers_.find(id);
      if (it == workers_.end()) return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown worker; register first");
      queue = it->second;
    }
    std::thread writer([&] {
      queue->Drain([&](std::deque<v1::SchedulerMessage>& batch) {
        for (size_t i = 0; i < batch.size(); ++i) {
          grpc::WriteOptions options;
          if (i + 1 < batch.size()) options.set_buffer_hint();
          if (!stream->Write(batch[i], options)) return false;
        }
        return true;
      });
      context->TryCancel();  // a broken write ends the reads too
    });
    while (stream->Read(&msg)) {
      std::lock_guard lock(mu_);
      core_.OnWorkerMessage(id, msg, NowMs());
      RunScheduleLocked();
    }
    queue->Close();
    writer.join();
    std::lock_guard lock(mu_);
    if (workers_.erase(id) > 0) {
      CLEAVE_LOG(Warning) << "worker " << id << " stream closed; removing it";
      core_.RemoveWorker(id, absl::StrCat("worker ", id, " disconnected"));
      RunScheduleLocked();
    }
    return grpc::Status::OK;
  }

  grpc::Status FrontendStream(grpc::ServerContext* context,
                              grpc::ServerReaderWriter<v1::FrontendEvents, v1::FrontendMessage>* stream) override {
    auto queue = std::make_shared<FrontendQueue>();
    FrontendId id;
    {
      std::lock_guard lock(mu_);
      id = next_frontend_++;
      frontends_[id] = queue;
    }
    std::thread writer([&] {
      queue->Drain([&](std::deque<v1::RequestEvent>& batch) {
        v1::FrontendEvents events;
        for (auto& e : batch) *events.add_events() = std::move(e);
        return stream->Write(events);
      });
      context->TryCancel();
    });
    v1::FrontendMessage msg;
    while (stream->Read(&msg)) {
      std::lock_guard lock(mu_);
      if (msg.has_submit()) core_.Submit(id, msg.submit(), NowMs());
      if (msg.has_cancel()) core_.Cancel(id, msg.cancel());
      RunScheduleLocked();
    }
    queue->Close();
    writer.join();
    std::lock_guard lock(mu_);
    frontends_.erase(id);
    core_.RemoveFrontend(id);
    RunScheduleLocked();
    return grpc::Status::OK;
  }

  grpc::Status Stats(grpc::ServerContext*, const v1::StatsRequest*, v1::StatsResponse* reply) override {
    std::lock_guard lock(mu_);
    *reply = core_.Stats();
    return grpc::Status::OK;
  }

 private:
  // Places what can be placed and hands every resulting message to its peer's queue.
  void RunScheduleLocked() {
    core_.Schedule(NowMs());
    Outbox out = core_.TakeOutbox();
    for (auto& [worker, message] : out.to_workers) {
      auto it = workers_.find(worker);
      if (it != workers_.end()) it->second->Push(std::move(message));
    }
    for (auto& [frontend, event] : out.to_frontends) {
      auto it = frontends_.find(frontend);
      if (it != frontends_.end()) it->second->Push(std::move(event));
    }
  }

  void Tick() {
    std::unique_lock lock(mu_);
    while (!stop_) {
      tick_cv_.wait_for(lock, std::chrono::milliseconds(100));
      if (stop_) return;
      for (WorkerId w : core_.ExpireLeases(NowMs())) {  // counted in lease_expiries
        CLEAVE_LOG(Warning) << "worker " << w << " lease lapsed; removed";
        auto it = workers_.find(w);
        if (it != workers_.end()) {
          it->second->Close();
          workers_.erase(it);
        }
      }
      RunScheduleLocked();
    }
  }

  std::mutex mu_;
  SchedulerCore core_;
  absl::flat_hash_map<WorkerId, std::shared_ptr<WorkerQueue>> workers_;
  absl::flat_hash_map<FrontendId, std::shared_ptr<FrontendQueue>> frontends_;
  FrontendId next_frontend_ = 1;
  bool stop_ = false;
  std::condition_variable tick_cv_;
  std::thread ticker_;
};

struct SchedulerServer::Impl {
  std::unique_ptr<SchedulerServiceImpl> service;
  std::unique_ptr<SchedulerHttp> http;
  std::unique_ptr<grpc::Server> server;
  std::unique_ptr<admin::AdminServer> http_server;  // stopped before `service` goes
  int port = 0;
};

SchedulerServer::SchedulerServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SchedulerServer::~SchedulerServer() { Shutdown(); }
int SchedulerServer::port() const { return impl_->port; }
int SchedulerServer::http_port() const { return impl_->http_server ? impl_->http_server->port() : 0; }

void SchedulerServer::Drain() {
  if (!impl_ || !impl_->server) return;
  impl_->http->SetDraining();
  impl_->server->GetHealthCheckService()->SetServingStatus(false);
}

absl::StatusOr<std::unique_ptr<SchedulerServer>> SchedulerServer::Start(const SchedulerServerOptions& options) {
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds = ServerCredentials(options);
  if (!creds.ok()) return creds.status();
  auto impl = std::make_unique<Impl>();
  impl->service = std::make_unique<SchedulerServiceImpl>(options.config);
  SchedulerServiceImpl* service = impl->service.get();
  absl::StatusOr<std::unique_ptr<SchedulerHttp>> http =
      SchedulerHttp::Create([service] { return service->CurrentStats(); },
                            [service] { return service->NotReadyReason(); });
  if (!http.ok()) return http.status();
  impl->http = std::move(*http);
  service->SetMetrics(impl->http->metrics());
  absl::StatusOr<std::optional<admin::AdminServerOptions>> http_options =
      admin::ParseAdminAddress(options.http, "scheduler http");
  if (!http_options.ok()) return http_options.status();
  if (http_options->has_value()) {
    absl::StatusOr<std::unique_ptr<admin::AdminServer>> s = impl->http->Serve(**http_options);
    if (!s.ok()) return s.status();
    impl->http_server = std::move(*s);
  }
  // grpc.health.v1.Health: SERVING from the start, NOT_SERVING once Drain() is called.
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, *creds, &impl->port);
  builder.RegisterService(impl->service.get());
  impl->server = builder.BuildAndStart();
  if (!impl->server || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("scheduler cannot listen on ", options.listen,
                                               options.tls_cert_file.empty() ? "" : " (or its TLS key / certificate is invalid)"));
  }
  return std::unique_ptr<SchedulerServer>(new SchedulerServer(std::move(impl)));
}

void SchedulerServer::Shutdown() {
  if (!impl_ || !impl_->server) return;
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->server->Wait();
  impl_->server.reset();
  if (impl_->http_server) impl_->http_server->Stop();
  impl_->service->StopTicker();
}

absl::Status RunScheduler(const SchedulerServerOptions& options, ShutdownLatch& shutdown) {
  auto server = SchedulerServer::Start(options);
  if (!server.ok()) return server.status();
  CLEAVE_LOG(Info) << "scheduler listening on port " << (*server)->port()
                   << (options.tls_cert_file.empty() ? " (plaintext)" : " (mutual TLS)")
                   << ((*server)->http_port() > 0 ? absl::StrCat(", HTTP (metrics, health) on port ",
                                                                 (*server)->http_port())
                                                  : "");
  shutdown.Wait();
  CLEAVE_LOG(Info) << "scheduler shutting down";
  (*server)->Drain();
  (*server)->Shutdown();
  return absl::OkStatus();
}

}  // namespace cleave::scheduler
