#include "cleave/worker/ffn_service.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "cleave/common/status.h"

namespace cleave::worker {
namespace {

using Clock = std::chrono::steady_clock;

int64_t NowNs() { return Clock::now().time_since_epoch().count(); }

}  // namespace

absl::StatusOr<model::FfnShardPlan> FfnPlan(const WorkerProcessOptions& o, const model::ModelConfig& config) {
  if (!o.ffn_experts.empty() || o.ffn_shared_expert) {
    return model::ExplicitShard(config, o.ffn_experts, o.ffn_shared_expert);
  }
  CLEAVE_CHECK_ARG(o.ffn_shards >= 1 && o.ffn_shard >= 0 && o.ffn_shard < o.ffn_shards,
                   absl::StrCat("ffn_shard ", o.ffn_shard, " is not in [0, ffn_shards ", o.ffn_shards, ")"));
  CLEAVE_ASSIGN_OR_RETURN(std::vector<model::FfnShardPlan> plans, model::PlaceExperts(config, o.ffn_shards));
  return plans[o.ffn_shard];
}

absl::StatusOr<std::unique_ptr<FfnService>> FfnService::Start(const model::DecoderModel& model,
                                                              const model::FfnShardPlan& plan,
                                                              const WorkerProcessOptions& o,
                                                              metrics::Registry& r) {
  std::unique_ptr<FfnService> s(new FfnService(model, plan));
  const model::ModelConfig& c = model.config();
  CLEAVE_ASSIGN_OR_RETURN(metrics::CounterFamily * calls,
                          r.AddCounterFamily("cleave_ffn_calls_total",
                                             "Activation calls answered by this FFN worker, by op "
                                             "(dense, experts) and outcome.",
                                             {"op", "outcome"}));
  CLEAVE_ASSIGN_OR_RETURN(s->dense_calls_, calls->WithLabels({"dense", "ok"}));
  CLEAVE_ASSIGN_OR_RETURN(s->expert_calls_, calls->WithLabels({"experts", "ok"}));
  CLEAVE_ASSIGN_OR_RETURN(s->failed_calls_, calls->WithLabels({"any", "error"}));
  CLEAVE_ASSIGN_OR_RETURN(std::vector<double> buckets, metrics::ExponentialBuckets(1e-5, 2, 18));
  CLEAVE_ASSIGN_OR_RETURN(s->call_seconds_,
                          r.AddHistogram("cleave_ffn_call_seconds",
                                         "Compute time of one activation call on this FFN worker.", buckets));
  CLEAVE_ASSIGN_OR_RETURN(s->rows_, r.AddCounter("cleave_ffn_rows_total",
                                                 "Token rows received in activation calls."));
  CLEAVE_ASSIGN_OR_RETURN(
      metrics::CounterFamily * tokens,
      r.AddCounterFamily("cleave_ffn_expert_tokens_total",
                         "Tokens run through each expert on this FFN worker (expert = the id, or "
                         "\"shared\"); only the expert's owner ever counts it.",
                         {"layer", "expert"}));
  s->expert_tokens_.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    if (c.layer_ffn[l] != model::FfnKind::kMoe) continue;
    s->expert_tokens_[l].assign(c.moe.num_experts + 1, nullptr);
    for (int e : plan.experts) {
      CLEAVE_ASSIGN_OR_RETURN(s->expert_tokens_[l][e], tokens->WithLabels({absl::StrCat(l), absl::StrCat(e)}));
    }
    if (plan.shared_expert) {
      CLEAVE_ASSIGN_OR_RETURN(s->expert_tokens_[l][c.moe.num_experts], tokens->WithLabels({absl::StrCat(l), "shared"}));
    }
  }

  transport::ActivationOptions a;
  a.hidden_size = c.hidden_size;
  a.num_layers = c.num_hidden_layers;
  a.secret = o.kv_secret;
  a.listen_host = o.ffn_listen_host;
  a.listen_port = o.ffn_port;
  a.advertise_host = o.kv_advertise_host;
  FfnService* self = s.get();
  CLEAVE_ASSIGN_OR_RETURN(s->server_, transport::FfnServer::Start(a, [self](const transport::FfnRequest& req,
                                                                             std::span<float> out) {
                            return self->Handle(req, out);
                          }));
  return s;
}

FfnService::~FfnService() { Stop(); }

void FfnService::Stop() {
  if (server_) server_->Stop();
}

v1::FfnShard FfnService::shard() const {
  v1::FfnShard shard;
  shard.set_address(server_->address());
  shard.set_dense(true);
  shard.mutable_experts()->Add(plan_.experts.begin(), plan_.experts.end());
  shard.set_shared_expert(plan_.shared_expert);
  shard.set_num_experts(model_.config().moe.num_experts);
  shard.set_model_has_shared_expert(model_.config().moe.shared_expert_intermediate_size > 0);
  return shard;
}

bool FfnService::CalledWithin(std::chrono::milliseconds window) const {
  const int64_t last = last_call_ns_.load(std::memory_order_relaxed);
  return last != 0 && NowNs() - last < std::chrono::nanoseconds(window).count();
}

// One thread per attention worker's connection calls this; each keeps its own scratch.
absl::Status FfnService::Handle(const transport::FfnRequest& req, std::span<float> out) {
  thread_local model::Workspace ws;
  const auto start = Clock::now();
  last_call_ns_.store(NowNs(), std::memory_order_relaxed);
  const int64_t d = model_.config().hidden_size;
  kernels::Tensor x(const_cast<float*>(req.rows.data()), kernels::DType::kF32, {req.num_rows, d});
  absl::Status st;
  if (req.op == transport::FfnOp::kDense) {
    kernels::Tensor y(out.data(), kernels::DType::kF32, {req.num_rows, d});
    st = model_.FfnDense(req.layer, x, y, ws);
    if (st.ok()) dense_calls_->Inc();
  } else {
    const int64_t n = static_cast<int64_t>(req.assign_rows.size());
    kernels::Tensor y(out.data(), kernels::DType::kF32, {n, d});
    st = model_.FfnExperts(req.layer, x, req.assign_rows, req.assign_experts, y, ws);
    if (st.ok()) {
      expert_calls_->Inc();
      const std::vector<metrics::Counter*>& counters = expert_tokens_[req.layer];
      for (int32_t e : req.assign_experts) {
        if (e >= 0 && static_cast<size_t>(e) < counters.size() && counters[e] != nullptr) counters[e]->Inc();
      }
    }
  }
  if (!st.ok()) {
    failed_calls_->Inc();
    CLEAVE_LOG(Warning) << "FFN call for layer " << req.layer << " failed: " << st;
    return st;
  }
  rows_->Inc(req.num_rows);
  call_seconds_->Observe(std::chrono::duration<double>(Clock::now() - start).count());
  return absl::OkStatus();
}

}  // namespace cleave::worker
