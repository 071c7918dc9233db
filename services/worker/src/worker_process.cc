#include "cleave/worker/worker_process.h"

#include <grpcpp/grpcpp.h>

#include <csignal>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <optional>
#include <thread>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cleave/admin/admin_server.h"
#include "cleave/common/logging.h"
#include "cleave/common/metrics.h"
#include "cleave/common/status.h"
#include "cleave/common/tls.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/gemm.h"
#include "cleave/v1/control.grpc.pb.h"
#include "cleave/worker/afd.h"
#include "cleave/worker/engine.h"
#include "cleave/worker/ffn_service.h"
#include "cleave/worker/worker_metrics.h"

namespace cleave::worker {
namespace {

using Stream = grpc::ClientReaderWriter<v1::WorkerMessage, v1::SchedulerMessage>;

// Plaintext, or mutual TLS: the scheduler's certificate must be signed by the CA and name the
// host dialled; this worker presents its own.
std::shared_ptr<grpc::ChannelCredentials> SchedulerCredentials(const std::optional<tls::TlsPem>& pem) {
  if (!pem.has_value()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = pem->ca;
  ssl.pem_private_key = pem->key;
  ssl.pem_cert_chain = pem->cert;
  return grpc::SslCredentials(ssl);
}

// The current scheduler stream; writes from the engine thread and transport threads serialise
// here. Messages written while no stream is up are dropped: the scheduler that would have wanted
// them forgot this worker's requests when the stream broke.
class Link {
 public:
  void Attach(Stream* stream) {
    std::lock_guard lock(mu_);
    stream_ = stream;
  }
  void Detach() { Attach(nullptr); }
  void Write(const v1::WorkerMessage& message) {
    std::lock_guard lock(mu_);
    if (stream_ != nullptr && !stream_->Write(message)) stream_ = nullptr;
  }
  // Half-closes the stream (the scheduler then ends the call) and drops later writes.
  void Close() {
    std::lock_guard lock(mu_);
    if (stream_ != nullptr) stream_->WritesDone();
    stream_ = nullptr;
  }

 private:
  std::mutex mu_;
  Stream* stream_ = nullptr;
};

// Decode role: requests whose KV is expected (ExpectKv) or has landed but whose AddRequest has not
// arrived yet, with their trace ids. They are work the worker has promised: a drain waits for
// them, and a transfer failure is logged under the client's request id.
class InboundTransfers {
 public:
  void Expect(uint64_t request_id, std::string trace_id) {
    std::lock_guard lock(mu_);
    trace_ids_[request_id] = std::move(trace_id);
  }
  // The AddRequest arrived (the engine owns it now), or the request was removed.
  void Done(uint64_t request_id) {
    std::lock_guard lock(mu_);
    trace_ids_.erase(request_id);
  }
  void Failed(uint64_t request_id, const std::string& why) {
    std::string tag = absl::StrCat("#", request_id);
    {
      std::lock_guard lock(mu_);
      if (auto it = trace_ids_.find(request_id); it != trace_ids_.end()) {
        if (!it->second.empty()) tag = it->second;
        trace_ids_.erase(it);
      }
    }
    CLEAVE_LOG(Warning) << "request " << tag << ": incoming KV transfer failed: " << why;
  }
  void Clear() {
    std::lock_guard lock(mu_);
    trace_ids_.clear();
  }
  bool empty() const {
    std::lock_guard lock(mu_);
    return trace_ids_.empty();
  }

 private:
  mutable std::mutex mu_;
  absl::flat_hash_map<uint64_t, std::string> trace_ids_;
};

// The engine loop is considered stuck past this (it wakes every Engine::kIdleWake when idle).
constexpr std::chrono::seconds kEngineStallLimit{2};

std::string NotReadyReason(const ShutdownLatch& shutdown, const std::atomic<bool>& stream_up,
                           const Engine& engine, const FfnGroup* group, const std::string& afd_group) {
  if (shutdown.requested()) return "draining";
  const double age =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - engine.last_iteration()).count();
  if (age > std::chrono::duration<double>(kEngineStallLimit).count()) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "engine loop stalled for %.1f s", age);
    return buf;
  }
  if (!stream_up.load()) return "not registered with the scheduler";
  if (group != nullptr && !group->complete()) {
    return absl::StrCat("AFD group ", afd_group, " is incomplete (", group->describe(), ")");
  }
  return "";
}

std::string DrainReason(const ShutdownLatch& shutdown) {
  switch (shutdown.signal()) {
    case SIGTERM:
      return "SIGTERM";
    case SIGINT:
      return "SIGINT";
    default:
      return "shutdown requested";
  }
}

// Models with Mamba layers hold one state slot per request the worker may run.
int StateSlots(const WorkerProcessOptions& o, const model::ModelConfig& config) {
  return config.has_ssm_state() ? std::max(1, o.max_running) : 0;
}

// The KV pool gets the memory budget left after the state slots. A model without attention
// layers has no KV bytes: its blocks only count tokens, enough for every slot at full length.
absl::StatusOr<int> ModelBlocks(const WorkerProcessOptions& o, const model::ModelConfig& config) {
  if (o.kv_blocks > 0) return o.kv_blocks;
  const size_t budget = static_cast<size_t>(o.kv_cache_mb) << 20;
  const size_t state = static_cast<size_t>(StateSlots(o, config)) * model::StateBytesPerSlot(config);
  if (state >= budget) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_cache_mb ", o.kv_cache_mb, " cannot hold the Mamba state of max_running ", o.max_running,
        " requests (", state >> 20, " MiB); raise kv_cache_mb or lower max_running"));
  }
  const size_t per_block = model::KvBytesPerBlock(config, o.block_size);
  if (per_block == 0) {
    const int per_seq = (config.max_position_embeddings + o.block_size - 1) / o.block_size;
    return std::max(1, StateSlots(o, config)) * per_seq;
  }
  return std::max<int>(1, static_cast<int>((budget - state) / per_block));
}

// Set when one scheduler stream has ended; the stream's helper threads wait on it.
class StreamEnd {
 public:
  void Set() {
    {
      std::lock_guard lock(mu_);
      ended_ = true;
    }
    cv_.notify_all();
  }
  bool ended() const {
    std::lock_guard lock(mu_);
    return ended_;
  }
  // True when the stream ended within `timeout`.
  bool WaitFor(std::chrono::milliseconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return ended_; });
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool ended_ = false;
};

// What every registration of this process shares; outlives each stream.
struct WorkerContext {
  const WorkerProcessOptions& options;
  ShutdownLatch& shutdown;
  v1::Scheduler::Stub& stub;
  Engine& engine;
  transport::KvReceiver* receiver;  // decode role only
  Link& link;
  InboundTransfers& inbound;
  std::atomic<bool>& stream_up;  // readiness: registered and the stream is open
  FfnGroup* group;               // ATTENTION role only
  FfnService* ffn;               // FFN role only
};

// An FFN worker is done when its attention workers have stopped calling: they finish the
// requests they hold once the scheduler stops placing on the group.
constexpr std::chrono::seconds kFfnQuiet{1};

bool HoldsWork(const WorkerContext& w) {
  if (w.ffn != nullptr) return w.ffn->CalledWithin(kFfnQuiet);
  return !(w.engine.Idle() && w.inbound.empty());
}

// Heartbeats keep the lease; a lapsed lease ends the stream so that the worker re-registers.
// They go on through a drain: the scheduler must not expire a worker that is finishing its work.
void HeartbeatLoop(const WorkerContext& w, uint64_t worker_id, std::chrono::milliseconds period,
                   grpc::ClientContext& ctx, StreamEnd& end) {
  while (!end.WaitFor(period)) {
    v1::HeartbeatRequest hb;
    hb.set_worker_id(worker_id);
    v1::HeartbeatResponse hb_reply;
    grpc::ClientContext hb_ctx;
    hb_ctx.set_deadline(std::chrono::system_clock::now() + period * 2);
    grpc::Status hs = w.stub.Heartbeat(&hb_ctx, hb, &hb_reply);
    if (hs.ok() && !hb_reply.known()) {
      CLEAVE_LOG(Warning) << "scheduler no longer knows worker " << worker_id << "; re-registering";
      ctx.TryCancel();
      return;
    }
  }
}

// On shutdown (SIGTERM): tell the scheduler (Drain), which then places nothing new here; keep
// serving until the worker holds nothing (no request in the engine, no unflushed outgoing
// transfer, no incoming one awaiting its AddRequest) or the grace period passes; then half-close
// the stream. /ready reports "draining" throughout. If the stream ends first, there is nobody
// left to finish the work for, and the drain ends with it.
void DrainWhenAsked(const WorkerContext& w, grpc::ClientContext& ctx, StreamEnd& end) {
  while (!w.shutdown.WaitFor(std::chrono::milliseconds(100))) {
    if (end.ended()) return;
  }
  if (end.ended()) return;
  const std::string reason = DrainReason(w.shutdown);
  v1::WorkerMessage drain;
  drain.mutable_drain()->set_reason(reason);
  w.link.Write(drain);
  CLEAVE_LOG(Info) << "draining (" << reason << "): " << w.engine.num_requests()
                   << " requests held; waiting at most " << w.options.drain_grace_s << " s";
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(w.options.drain_grace_s);
  bool drained = true;
  while (HoldsWork(w)) {
    if (end.WaitFor(std::chrono::milliseconds(50))) return;
    if (std::chrono::steady_clock::now() >= deadline) {
      drained = false;
      break;
    }
  }
  if (drained) {
    CLEAVE_LOG(Info) << "drained; closing the scheduler stream";
  } else {
    CLEAVE_LOG(Warning) << "drain grace of " << w.options.drain_grace_s << " s passed with "
                        << w.engine.num_requests() << " requests still held; leaving anyway";
  }
  w.link.Close();
  // The scheduler ends the call when it reads the half-close; cancel if it does not.
  if (!end.WaitFor(std::chrono::seconds(2))) ctx.TryCancel();
}

void Dispatch(const WorkerContext& w, v1::SchedulerMessage msg) {
  if (msg.has_afd_peers()) {
    if (w.group != nullptr) {
      w.group->SetPeers(msg.afd_peers());
      CLEAVE_LOG(Info) << "AFD group " << w.options.afd_group << ": " << w.group->describe()
                       << (msg.afd_peers().complete() ? "" : " (incomplete)");
    }
    return;
  }
  if (msg.has_expect_kv() && w.receiver) {
    // The blocks and slot may have belonged to a request removed just before: let the engine
    // drop it (finish its current step) before anything may write them for the new one.
    w.engine.WaitForDeltas();
    const auto& e = msg.expect_kv();
    w.inbound.Expect(e.request_id(), e.trace_id());
    w.receiver->Expect(e.request_id(), e.attempt(), {e.blocks().begin(), e.blocks().end()},
                       e.state_slot());
    return;
  }
  const uint64_t id = msg.has_add()      ? msg.add().request_id()
                      : msg.has_remove() ? msg.remove().request_id()
                                         : 0;
  const bool settles_inbound = msg.has_add() || msg.has_remove();
  if (msg.has_remove() && w.receiver) w.receiver->Forget(id, msg.remove().attempt());
  w.engine.Post(std::move(msg));
  // After the Post, so that a drain never sees the request in neither place.
  if (settles_inbound) w.inbound.Done(id);
}

// One registration's stream, until it ends (scheduler gone, lease lapsed, or drained).
void ServeStream(const WorkerContext& w, const v1::RegisterWorkerResponse& reg) {
  const uint64_t worker_id = reg.worker_id();
  grpc::ClientContext ctx;
  std::unique_ptr<Stream> stream = w.stub.WorkerStream(&ctx);
  v1::WorkerMessage hello;
  hello.set_hello_worker_id(worker_id);
  stream->Write(hello);
  w.link.Attach(stream.get());
  w.stream_up = true;

  StreamEnd end;
  const auto period = std::chrono::milliseconds(std::max(50, reg.heartbeat_ms()));
  std::thread heartbeat([&] { HeartbeatLoop(w, worker_id, period, ctx, end); });
  std::thread drain([&] { DrainWhenAsked(w, ctx, end); });

  v1::SchedulerMessage msg;
  while (stream->Read(&msg)) {
    Dispatch(w, std::move(msg));
    msg.Clear();
  }
  w.stream_up = false;
  w.link.Detach();
  w.engine.Reset();
  // The next registration starts with the whole pool free: a transfer agreed under this one (its
  // frames may still be in flight, e.g. behind a healed partition) must not write into blocks the
  // scheduler hands out again.
  if (w.receiver != nullptr) w.receiver->ForgetAll();
  if (w.group != nullptr) w.group->Clear();
  w.inbound.Clear();
  end.Set();
  heartbeat.join();
  drain.join();
  grpc::Status fs = stream->Finish();
  if (!w.shutdown.requested()) {
    CLEAVE_LOG(Warning) << "scheduler stream ended (" << fs.error_message() << "); reconnecting";
    w.shutdown.WaitFor(std::chrono::milliseconds(300));
  }
}

// What a failed registration most likely means when gRPC says only that the socket closed: the
// scheduler ended the TLS handshake (it refused this worker's certificate), or it speaks TLS and
// this worker does not.
std::string RegisterFailureHint(const grpc::Status& st, bool tls) {
  const std::string& m = st.error_message();
  if (m.find("Socket closed") == std::string::npos && m.find("reset by peer") == std::string::npos) return "";
  return tls ? "; the scheduler cut the TLS handshake short: it refuses this worker's certificate "
               "(is it signed by the scheduler's CA?)"
             : "; the scheduler closed the connection: does it require mutual TLS (--tls-ca, --tls-cert, "
               "--tls-key)?";
}

}  // namespace

absl::StatusOr<v1::WorkerRole> ParseWorkerRole(const std::string& role) {
  if (role == "prefill") return v1::WORKER_ROLE_PREFILL;
  if (role == "decode") return v1::WORKER_ROLE_DECODE;
  if (role == "colocated") return v1::WORKER_ROLE_COLOCATED;
  if (role == "attention") return v1::WORKER_ROLE_ATTENTION;
  if (role == "ffn") return v1::WORKER_ROLE_FFN;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown worker role '", role, "' (prefill, decode, colocated, attention or ffn)"));
}

// The model's device and weight type, checked against the role and the KV transport.
absl::StatusOr<kernels::Device> WorkerDevice(const WorkerProcessOptions& o, model::LoadOptions& load) {
  CLEAVE_ASSIGN_OR_RETURN(const kernels::Device device, kernels::ParseDevice(o.device));
  CLEAVE_CHECK_ARG(o.weight_dtype == "bf16" || o.weight_dtype == "as_stored",
                   absl::StrCat("weight_dtype must be bf16 or as_stored, not '", o.weight_dtype, "'"));
  CLEAVE_CHECK_ARG(o.kv_transport == "tcp" || o.kv_transport == "nccl" || o.kv_transport == "cuda-ipc",
                   absl::StrCat("kv_transport must be tcp, nccl or cuda-ipc, not '", o.kv_transport, "'"));
  if (!device.is_cpu()) {
    CLEAVE_CHECK_ARG(o.role != v1::WORKER_ROLE_ATTENTION && o.role != v1::WORKER_ROLE_FFN,
                     "the attention and ffn roles run on the CPU for now (device: cpu)");
    // TCP moves KV through host memory; a decode worker's cache on a GPU is written by a GPU
    // transport.
    CLEAVE_CHECK_ARG(o.role != v1::WORKER_ROLE_DECODE || o.kv_transport != "tcp",
                     "a decode worker on a GPU receives KV with kv_transport nccl or cuda-ipc, not tcp");
  }
  load.device = device;
  load.device_weights = o.weight_dtype == "bf16" ? model::LoadOptions::DeviceWeights::kBF16
                                                 : model::LoadOptions::DeviceWeights::kAsStored;
  return device;
}

absl::Status RunWorker(const WorkerProcessOptions& o, ShutdownLatch& shutdown) {
  CLEAVE_ASSIGN_OR_RETURN(const std::optional<admin::AdminServerOptions> http, admin::ParseAdminAddress(o.http, "worker http"));
  CLEAVE_CHECK_ARG(o.drain_grace_s >= 0, "drain_grace_s must be >= 0");
  // Read before the model loads: a bad path fails the start at once.
  CLEAVE_ASSIGN_OR_RETURN(const std::optional<tls::TlsPem> tls_pem,
                          tls::LoadTlsPem({o.tls_ca_file, o.tls_cert_file, o.tls_key_file}));
  if (o.threads > 0) kernels::SetCpuThreads(o.threads);
  const bool attention = o.role == v1::WORKER_ROLE_ATTENTION, ffn = o.role == v1::WORKER_ROLE_FFN;
  CLEAVE_CHECK_ARG(!(attention || ffn) || !o.afd_group.empty(), "the attention and ffn roles need an afd_group");
  CLEAVE_CHECK_ARG(o.micro_batches >= 1 && o.micro_batches <= 8, "micro_batches must be in [1, 8]");
  CLEAVE_CHECK_ARG(o.ffn_call_timeout_ms > 0, "ffn_call_timeout_ms must be positive");
  // An attention worker binds no FFN projection, an FFN worker nothing but its FFNs.
  model::LoadOptions load;
  model::FfnShardPlan plan;
  if (attention) load.part = model::LoadOptions::Part::kAttention;
  if (ffn) {
    CLEAVE_ASSIGN_OR_RETURN(const model::ModelConfig model_config, model::LoadModelConfig(o.model_dir));
    CLEAVE_ASSIGN_OR_RETURN(plan, FfnPlan(o, model_config));
    load.part = model::LoadOptions::Part::kFfn;
    load.experts = plan.experts;
    load.shared_expert = plan.shared_expert;
  }
  CLEAVE_ASSIGN_OR_RETURN(const kernels::Device device, WorkerDevice(o, load));
  CLEAVE_ASSIGN_OR_RETURN(kernels::Backend* const backend, kernels::GetBackend(device));
  CLEAVE_ASSIGN_OR_RETURN(std::unique_ptr<model::DecoderModel> model, model::DecoderModel::Load(o.model_dir, load));
  model::ModelConfig config = model->config();
  CLEAVE_CHECK_ARG(o.block_size > 0, "block_size must be positive");
  // An FFN worker holds no requests: a one-block pool keeps the engine's invariants cheaply.
  int num_blocks = 1;
  if (!ffn) {
    CLEAVE_ASSIGN_OR_RETURN(num_blocks, ModelBlocks(o, config));
  }
  // (A Mamba model's cache insists on a state slot; the FFN worker's single one is never used.)
  const int num_slots = ffn ? (config.has_ssm_state() ? 1 : 0) : StateSlots(o, config);
  CLEAVE_ASSIGN_OR_RETURN(std::unique_ptr<model::KvCache> cache,
                          model::KvCache::Create(config, num_blocks, o.block_size, *backend,
                                                 num_slots));
  const std::string name = o.name.empty() ? absl::StrCat(v1::WorkerRole_Name(o.role), "@", o.scheduler) : o.name;
  const std::string model_id = o.model_dir.filename().string();

  // Declared before everything that records to it: the registry must outlive them.
  metrics::Registry registry;
  CLEAVE_ASSIGN_OR_RETURN(std::unique_ptr<WorkerMetrics> worker_metrics,
                          WorkerMetrics::Create(registry, {o.role, name, model_id, num_blocks, num_slots},
                                                config));
  KvCacheStore store(*cache, config);
  Link link;
  InboundTransfers inbound;

  transport::TransportOptions topts;
  topts.listen_host = o.kv_listen_host;
  topts.listen_port = o.kv_port;
  topts.geometry = store.geometry();
  // Block ids and state slots are the decode worker's: its receiver checks them.
  topts.geometry.num_blocks = 0;
  topts.geometry.num_state_slots = 0;
  topts.sent_metrics = worker_metrics->sent();
  topts.secret = o.kv_secret;
  topts.advertise_host = o.kv_advertise_host;
  topts.cuda_device = device.is_cpu() ? -1 : device.index;
  std::unique_ptr<transport::KvSender> sender;
  if (o.role == v1::WORKER_ROLE_PREFILL) sender = transport::CreateKvSender(topts);
  std::unique_ptr<transport::KvReceiver> receiver;
  if (o.role == v1::WORKER_ROLE_DECODE || attention) {
    transport::ReceiverCallbacks callbacks;
    callbacks.on_ready = [&link](uint64_t id, uint32_t attempt) {
      v1::WorkerMessage m;
      m.mutable_kv_ready()->set_request_id(id);
      m.mutable_kv_ready()->set_attempt(attempt);
      link.Write(m);
    };
    callbacks.on_failed = [&link, &inbound](uint64_t id, uint32_t attempt, const std::string& why) {
      inbound.Failed(id, why);
      v1::WorkerMessage m;
      m.mutable_kv_failed()->set_request_id(id);
      m.mutable_kv_failed()->set_attempt(attempt);
      m.mutable_kv_failed()->set_message(why);
      link.Write(m);
    };
    callbacks.metrics = worker_metrics->received();
    CLEAVE_ASSIGN_OR_RETURN(receiver, transport::CreateKvReceiver(o.kv_transport, topts, store, callbacks));
  }

  std::unique_ptr<FfnService> ffn_service;
  if (ffn) {
    CLEAVE_ASSIGN_OR_RETURN(ffn_service, FfnService::Start(*model, plan, o, registry));
  }
  std::unique_ptr<FfnGroup> group;
  std::unique_ptr<AfdForward> afd;
  if (attention) {
    transport::ActivationOptions a;
    a.hidden_size = config.hidden_size;
    a.num_layers = config.num_hidden_layers;
    a.secret = o.kv_secret;
    a.io_timeout_ms = o.ffn_call_timeout_ms;
    group = std::make_unique<FfnGroup>(a);
    afd = std::make_unique<AfdForward>(*model, *cache, *group, AfdOptions{o.micro_batches, o.ffn_call_timeout_ms});
  }

  EngineOptions eopts;
  eopts.afd = afd.get();
  eopts.role = o.role;
  eopts.max_batch_tokens = o.max_batch_tokens;
  eopts.max_running = o.max_running;
  eopts.metrics = worker_metrics.get();
  Engine engine(*model, *cache, eopts, sender.get(), [&link](v1::WorkerMessage m) { link.Write(m); });

  std::atomic<bool> stream_up{false};
  std::unique_ptr<admin::AdminServer> admin_server;  // stopped before the engine it reads goes
  if (http.has_value()) {
    auto routes = admin::StandardRoutes(
        registry, [&] { return NotReadyReason(shutdown, stream_up, engine, group.get(), o.afd_group); });
    CLEAVE_ASSIGN_OR_RETURN(admin_server, admin::AdminServer::Start(*http, std::move(routes)));
  }
  std::thread engine_thread([&] { engine.Run(); });

  auto channel = grpc::CreateChannel(o.scheduler, SchedulerCredentials(tls_pem));
  auto stub = v1::Scheduler::NewStub(channel);
  CLEAVE_LOG(Info) << "worker " << name << " on " << device.ToString()
                   << (device.is_cpu() ? "" : absl::StrCat(" (", model->device_weight_bytes() >> 20, " MiB of weights)"))
                   << ": " << num_blocks << " KV blocks of " << o.block_size << " tokens"
                   << (num_slots > 0 ? absl::StrCat(", ", num_slots, " Mamba state slots") : "")
                   << (receiver ? absl::StrCat(", KV receiver on ", receiver->address()) : "")
                   << (ffn_service ? absl::StrCat(", FFN of AFD group ", o.afd_group, " on ", ffn_service->address(),
                                                  " (", plan.experts.size(), " experts",
                                                  plan.shared_expert ? " + shared" : "", ")")
                                   : "")
                   << (afd ? absl::StrCat(", attention of AFD group ", o.afd_group, " (", o.micro_batches,
                                          " micro-batches)")
                           : "")
                   << (admin_server ? absl::StrCat(", HTTP on ", admin_server->address()) : "")
                   << (tls_pem ? ", mutual TLS to the scheduler" : "")
                   << (o.kv_secret.empty() ? "" : ", KV transport authenticated");
  const WorkerContext w{o,         shutdown,   *stub,       engine,           receiver.get(),
                        link,      inbound,    stream_up,   group.get(),      ffn_service.get()};

  std::string last_failure;
  int failures_since_logged = 0;
  while (!shutdown.requested()) {
    v1::RegisterWorkerRequest reg;
    reg.set_role(o.role);
    reg.set_model_id(model_id);
    reg.set_num_kv_blocks(ffn ? 0 : num_blocks);
    reg.set_block_size(o.block_size);
    reg.set_max_batch_tokens(ffn ? 0 : o.max_batch_tokens);
    reg.set_max_running(ffn ? 0 : o.max_running);
    reg.set_afd_group(o.afd_group);
    if (ffn_service) *reg.mutable_ffn() = ffn_service->shard();
    if (receiver) reg.set_kv_address(receiver->address());
    reg.set_num_layers(config.num_hidden_layers);
    reg.set_vocab_size(config.vocab_size);
    reg.set_max_model_len(config.max_position_embeddings);
    reg.set_name(name);
    reg.set_num_state_slots(ffn ? 0 : num_slots);
    if (admin_server) reg.set_http_address(admin_server->address());
    v1::RegisterWorkerResponse reg_reply;
    grpc::ClientContext reg_ctx;
    reg_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    grpc::Status st = stub->RegisterWorker(&reg_ctx, reg, &reg_reply);
    if (!st.ok()) {
      if (st.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
        engine.Stop();
        engine_thread.join();
        return absl::InvalidArgumentError(absl::StrCat("scheduler refused this worker: ", st.error_message()));
      }
      // Said once per distinct reason (then every ~30 s): a TLS handshake the scheduler refuses
      // must be visible before the first registration too, without a line every 500 ms.
      if (st.error_message() != last_failure || ++failures_since_logged >= 60) {
        CLEAVE_LOG(Warning) << "cannot register with scheduler " << o.scheduler << " (" << st.error_message()
                            << RegisterFailureHint(st, tls_pem.has_value()) << "), retrying";
        last_failure = st.error_message();
        failures_since_logged = 0;
      }
      shutdown.WaitFor(std::chrono::milliseconds(500));
      continue;
    }
    last_failure.clear();
    CLEAVE_LOG(Info) << "registered with " << o.scheduler << " as worker " << reg_reply.worker_id();
    ServeStream(w, reg_reply);
  }
  if (admin_server) admin_server->Stop();
  if (ffn_service) ffn_service->Stop();
  engine.Stop();
  engine_thread.join();
  CLEAVE_LOG(Info) << "worker " << name << " stopped";
  return absl::OkStatus();
}

}  // namespace cleave::worker
