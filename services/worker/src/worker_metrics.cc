#include "cleave/worker/worker_metrics.h"


#include <algorithm>
#include <string>
#include <utility>

#include "cleave/common/status.h"
#include "cleave/v1/worker_role.h"
#include "cleave/worker/afd.h"

namespace cleave::worker {
namespace {

using metrics::Counter;
using metrics::CounterFamily;
using metrics::Gauge;
using metrics::GaugeFamily;
using metrics::Histogram;
using metrics::HistogramFamily;

// A CPU decode step of a tiny model takes ~100 µs and a long prefill chunk of a big one seconds:
// doubling from 100 µs to ~13 s resolves both ends (the 1 ms-based latency ladder would lump
// every small-model step into its first bucket).
absl::StatusOr<std::vector<double>> StepBuckets() {
  return metrics::ExponentialBuckets(1e-4, 2, 18);
}
// Layer halves are a fraction of a step: from 10 µs.
absl::StatusOr<std::vector<double>> LayerBuckets() {
  return metrics::ExponentialBuckets(1e-5, 2, 18);
}
// Requests or tokens per step: 1 .. 16384 in powers of two.
absl::StatusOr<std::vector<double>> CountBuckets() { return metrics::ExponentialBuckets(1, 2, 15); }

}  // namespace

absl::StatusOr<std::unique_ptr<WorkerMetrics>> WorkerMetrics::Create(
    metrics::Registry& r, const WorkerMetricsOptions& o, const model::ModelConfig& config) {
  std::unique_ptr<WorkerMetrics> m(new WorkerMetrics());
  m->role_ = v1::WorkerRoleName(o.role);
  const std::string& role = m->role_;
  CLEAVE_ASSIGN_OR_RETURN(std::vector<double> step_buckets, StepBuckets());
  CLEAVE_ASSIGN_OR_RETURN(std::vector<double> layer_buckets, LayerBuckets());
  CLEAVE_ASSIGN_OR_RETURN(std::vector<double> count_buckets, CountBuckets());

  CLEAVE_ASSIGN_OR_RETURN(GaugeFamily * info,
                          r.AddGaugeFamily("cleave_worker_info",
                                           "Constant 1, labelled with the worker's role, name and "
                                           "model.",
                                           {"role", "name", "model"}));
  CLEAVE_ASSIGN_OR_RETURN(Gauge * info_series, info->WithLabels({role, o.name, o.model}));
  info_series->Set(1);

  CLEAVE_ASSIGN_OR_RETURN(CounterFamily * steps,
                          r.AddCounterFamily("cleave_worker_steps_total",
                                             "Engine iterations that ran a batch.", {"role"}));
  CLEAVE_ASSIGN_OR_RETURN(m->steps_, steps->WithLabels({role}));
  CLEAVE_ASSIGN_OR_RETURN(
      HistogramFamily * step_seconds,
      r.AddHistogramFamily("cleave_worker_step_seconds",
                           "Forward pass plus sampling time of one engine iteration.", {"role"},
                           step_buckets));
  CLEAVE_ASSIGN_OR_RETURN(m->step_seconds_, step_seconds->WithLabels({role}));
  CLEAVE_ASSIGN_OR_RETURN(HistogramFamily * step_requests,
                          r.AddHistogramFamily("cleave_worker_step_batch_requests",
                                               "Requests in one engine iteration.", {"role"},
                                               count_buckets));
  CLEAVE_ASSIGN_OR_RETURN(m->step_requests_, step_requests->WithLabels({role}));
  CLEAVE_ASSIGN_OR_RETURN(
      HistogramFamily * step_tokens,
      r.AddHistogramFamily("cleave_worker_step_tokens",
                           "Tokens computed in one engine iteration (decode tokens plus prefill "
                           "chunk tokens).",
                           {"role"}, count_buckets));
  CLEAVE_ASSIGN_OR_RETURN(m->step_tokens_, step_tokens->WithLabels({role}));
  CLEAVE_ASSIGN_OR_RETURN(HistogramFamily * chunks,
                          r.AddHistogramFamily("cleave_worker_prefill_chunk_tokens",
                                               "Tokens of each prefill chunk run.", {"role"},
                                               count_buckets));
  CLEAVE_ASSIGN_OR_RETURN(m->prefill_chunk_tokens_, chunks->WithLabels({role}));

  CLEAVE_ASSIGN_OR_RETURN(GaugeFamily * running,
                          r.AddGaugeFamily("cleave_worker_running_requests",
                                           "Requests the engine holds.", {"role"}));
  CLEAVE_ASSIGN_OR_RETURN(m->running_, running->WithLabels({role}));
  CLEAVE_ASSIGN_OR_RETURN(GaugeFamily * blocks,
                          r.AddGaugeFamily("cleave_worker_kv_blocks",
                                           "KV cache blocks in this worker's pool.", {"role"}));
  CLEAVE_ASSIGN_OR_RETURN(Gauge * blocks_series, blocks->WithLabels({role}));
  blocks_series->Set(o.num_kv_blocks);
  CLEAVE_ASSIGN_OR_RETURN(GaugeFamily * slots,
                          r.AddGaugeFamily("cleave_worker_state_slots",
                                           "Mamba state slots in this worker's pool (0: the "
                                           "model has no Mamba layer).",
                                           {"role"}));
  CLEAVE_ASSIGN_OR_RETURN(Gauge * slots_series, slots->WithLabels({role}));
  slots_series->Set(o.num_state_slots);
  CLEAVE_ASSIGN_OR_RETURN(GaugeFamily * slots_used,
                          r.AddGaugeFamily("cleave_worker_state_slots_used",
                                           "Mamba state slots held by the engine's requests.",
                                           {"role"}));
  CLEAVE_ASSIGN_OR_RETURN(m->state_slots_used_, slots_used->WithLabels({role}));

  CLEAVE_ASSIGN_OR_RETURN(
      CounterFamily * bytes,
      r.AddCounterFamily("cleave_worker_kv_transfer_bytes_total",
                         "KV cache and Mamba state payload bytes moved between workers.",
                         {"role", "direction"}));
  CLEAVE_ASSIGN_OR_RETURN(
      HistogramFamily * seconds,
      r.AddHistogramFamily("cleave_worker_kv_transfer_seconds",
                           "Duration of one request's KV transfer: sender, first frame queued to "
                           "flushed; receiver, expected to complete.",
                           {"role", "direction"}, step_buckets));
  CLEAVE_ASSIGN_OR_RETURN(CounterFamily * transfers,
                          r.AddCounterFamily("cleave_worker_kv_transfers_total",
                                             "KV transfers ended, by outcome.",
                                             {"role", "direction", "outcome"}));
  for (const char* direction : {"sent", "received"}) {
    transport::TransferMetrics& t = direction[0] == 's' ? m->sent_ : m->received_;
    CLEAVE_ASSIGN_OR_RETURN(t.bytes, bytes->WithLabels({role, direction}));
    CLEAVE_ASSIGN_OR_RETURN(t.seconds, seconds->WithLabels({role, direction}));
    CLEAVE_ASSIGN_OR_RETURN(t.ok, transfers->WithLabels({role, direction, "ok"}));
    CLEAVE_ASSIGN_OR_RETURN(t.failed, transfers->WithLabels({role, direction, "failed"}));
  }

  CLEAVE_ASSIGN_OR_RETURN(
      HistogramFamily * layer_seconds,
      r.AddHistogramFamily("cleave_worker_layer_seconds",
                           "Time of one layer's sequence mixer or FFN in one engine iteration "
                           "(sampled: one iteration in 64).",
                           {"role", "layer", "part"}, layer_buckets));
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    for (const char* part : {"mixer", "ffn"}) {
      CLEAVE_ASSIGN_OR_RETURN(Histogram * h,
                              layer_seconds->WithLabels({role, std::to_string(l), part}));
      m->layer_seconds_.push_back(h);
    }
  }

  CLEAVE_ASSIGN_OR_RETURN(CounterFamily * experts,
                          r.AddCounterFamily("cleave_worker_moe_expert_tokens_total",
                                             "Tokens the router sent to each expert of each MoE "
                                             "layer.",
                                             {"role", "layer", "expert"}));
  m->expert_tokens_.resize(config.num_hidden_layers);
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    const bool moe = static_cast<size_t>(l) < config.layer_ffn.size() &&
                     config.layer_ffn[l] == model::FfnKind::kMoe;
    if (!moe) continue;
    for (int x = 0; x < config.moe.num_experts; ++x) {
      CLEAVE_ASSIGN_OR_RETURN(Counter * c, experts->WithLabels({role, std::to_string(l),
                                                                std::to_string(x)}));
      m->expert_tokens_[l].push_back(c);
    }
  }
  if (o.role == v1::WORKER_ROLE_ATTENTION) {
    // Seconds as counters: rate(wait) / rate(exchange) is the exposed share of the FFN exchange,
    // 1 minus it what ping-pong hides behind the other micro-batches' mixers.
    const std::pair<metrics::Counter**, std::pair<const char*, const char*>> afd[] = {
        {&m->afd_calls_, {"cleave_afd_calls_total", "Activation calls to FFN workers answered."}},
        {&m->afd_round_trip_seconds_,
         {"cleave_afd_round_trip_seconds_total", "Sum of the calls' round trips (send to answer in)."}},
        {&m->afd_exchange_seconds_,
         {"cleave_afd_exchange_seconds_total",
          "Sum over (micro-batch, layer) FFN exchanges of first call sent to last answer in."}},
        {&m->afd_wait_seconds_,
         {"cleave_afd_wait_seconds_total", "Time the attention side spent blocked on FFN answers."}},
        {&m->afd_compute_seconds_,
         {"cleave_afd_ffn_compute_seconds_total", "FFN workers' compute time inside the calls."}},
        {&m->afd_bytes_sent_, {"cleave_afd_sent_bytes_total", "Activation payload bytes sent to FFN workers."}},
        {&m->afd_bytes_received_,
         {"cleave_afd_received_bytes_total", "Activation payload bytes received from FFN workers."}},
    };
    for (const auto& [slot, text] : afd) {
      CLEAVE_ASSIGN_OR_RETURN(*slot, r.AddCounter(text.first, text.second));
    }
  }
  return m;
}

void WorkerMetrics::RecordAfd(const AfdStats& s) const {
  if (afd_calls_ == nullptr) return;
  afd_calls_->Inc(s.calls);
  afd_round_trip_seconds_->Inc(static_cast<double>(s.round_trip_us) * 1e-6);
  afd_exchange_seconds_->Inc(static_cast<double>(s.exchange_us) * 1e-6);
  afd_wait_seconds_->Inc(static_cast<double>(s.wait_us) * 1e-6);
  afd_compute_seconds_->Inc(static_cast<double>(s.compute_us) * 1e-6);
  afd_bytes_sent_->Inc(s.bytes_sent);
  afd_bytes_received_->Inc(s.bytes_received);
}

void WorkerMetrics::AddExpertTokens(std::vector<std::vector<int64_t>>& counts) const {
  const size_t layers = std::min(counts.size(), expert_tokens_.size());
  for (size_t l = 0; l < layers; ++l) {
    std::vector<int64_t>& row = counts[l];
    const size_t n = std::min(row.size(), expert_tokens_[l].size());
    for (size_t x = 0; x < n; ++x) {
      if (row[x] != 0) expert_tokens_[l][x]->Inc(row[x]);
      row[x] = 0;
    }
  }
}

}  // namespace cleave::worker
