// The Prometheus series of one worker process (names are a contract with deploy/'s Grafana
// dashboard and the docs: do not rename). Every series carries role="prefill|decode|colocated";
// a process has one role.
//
//   cleave_worker_info{role,name,model}                       gauge, always 1
//   cleave_worker_steps_total{role}                           engine iterations that ran a batch
//   cleave_worker_step_seconds{role}                          forward + sample time of one iteration
//   cleave_worker_step_batch_requests{role}                   requests in one iteration
//   cleave_worker_step_tokens{role}                           tokens computed in one iteration
//   cleave_worker_prefill_chunk_tokens{role}                  size of each prefill chunk run
//   cleave_worker_running_requests{role}                      requests the engine holds
//   cleave_worker_kv_blocks{role}                             KV blocks in this worker's pool
//   cleave_worker_state_slots{role}, ..._used{role}           Mamba state slots (0: no Mamba layer)
//   cleave_worker_kv_transfer_bytes_total{role,direction}     payload bytes, direction sent|received
//   cleave_worker_kv_transfer_seconds{role,direction}         per transfer: sender first frame ->
//                                                             flushed; receiver Expect -> ready
//   cleave_worker_kv_transfers_total{role,direction,outcome}  outcome ok|failed
//   cleave_worker_layer_seconds{role,layer,part}              part mixer|ffn; sampled, one step
//                                                             in kLayerSampleEvery
//   cleave_worker_moe_expert_tokens_total{role,layer,expert}  tokens routed to each expert of each
//                                                             MoE layer of the loaded model
//
// Ownership: the Registry owns the series; a WorkerMetrics only holds pointers into it, so the
// Registry must outlive it and everyone recording through it (engine, sender, receiver).
// Threads: the Record*/Set* calls are lock-free and safe from any thread; AddExpertTokens and
// LayerSeconds are for the engine thread (they are const reads of fixed tables plus atomics).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/common/metrics.h"
#include "cleave/model/config.h"
#include "cleave/transport/kv_transport.h"
#include "cleave/v1/control.pb.h"

namespace cleave::worker {

struct WorkerMetricsOptions {
  v1::WorkerRole role = v1::WORKER_ROLE_COLOCATED;
  std::string name;         // cleave_worker_info's name label (the worker's name)
  std::string model;        // cleave_worker_info's model label (the model id)
  int num_kv_blocks = 0;    // cleave_worker_kv_blocks
  int num_state_slots = 0;  // cleave_worker_state_slots
};

struct AfdStats;

class WorkerMetrics {
 public:
  // Per-layer timing costs two clock reads per layer half, so only one step in this many is
  // timed (the first, then every 64th); the others read no clock per layer at all.
  static constexpr uint64_t kLayerSampleEvery = 64;

  enum class LayerPart { kMixer = 0, kFfn = 1 };

  // Registers every family above in `registry` and creates each series a worker records to
  // (per-layer and per-expert series from `config`). Fails if the names are taken.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<WorkerMetrics>> Create(
      metrics::Registry& registry, const WorkerMetricsOptions& options,
      const model::ModelConfig& config);

  // One engine iteration: its forward + sample time, requests and tokens.
  void RecordStep(double seconds, int requests, int tokens) {
    steps_->Inc();
    step_seconds_->Observe(seconds);
    step_requests_->Observe(requests);
    step_tokens_->Observe(tokens);
  }
  void RecordPrefillChunk(int tokens) { prefill_chunk_tokens_->Observe(tokens); }
  void SetRunning(int requests) { running_->Set(requests); }
  void SetStateSlotsUsed(int slots) { state_slots_used_->Set(slots); }

  // Null outside [0, num_layers): the engine times only layers the model has.
  metrics::Histogram* LayerSeconds(int layer, LayerPart part) const {
    const size_t i = static_cast<size_t>(layer) * 2 + static_cast<size_t>(part);
    return layer >= 0 && i < layer_seconds_.size() ? layer_seconds_[i] : nullptr;
  }

  // Adds the router's per-(layer, expert) counts to the counters and zeroes them, so the next
  // pass counts from zero (Workspace::expert_tokens is "since the caller last cleared it").
  // Rows of layers without MoE, and experts beyond the config, are ignored.
  void AddExpertTokens(std::vector<std::vector<int64_t>>& counts) const;
  // ATTENTION role: one step's activation exchange (afd.h) into the cleave_afd_* counters.
  void RecordAfd(const AfdStats& stats) const;

  // For transport::TransportOptions::sent_metrics / ReceiverCallbacks::metrics.
  transport::TransferMetrics sent() const { return sent_; }
  transport::TransferMetrics received() const { return received_; }

  const std::string& role_label() const { return role_; }

 private:
  WorkerMetrics() = default;

  std::string role_;
  metrics::Counter* steps_ = nullptr;
  metrics::Histogram* step_seconds_ = nullptr;
  metrics::Histogram* step_requests_ = nullptr;
  metrics::Histogram* step_tokens_ = nullptr;
  metrics::Histogram* prefill_chunk_tokens_ = nullptr;
  metrics::Gauge* running_ = nullptr;
  metrics::Gauge* state_slots_used_ = nullptr;
  transport::TransferMetrics sent_;
  transport::TransferMetrics received_;
  std::vector<metrics::Histogram*> layer_seconds_;  // [layer * 2 + part]
  // [layer][expert]; empty rows for layers without MoE.
  std::vector<std::vector<metrics::Counter*>> expert_tokens_;
  // ATTENTION role only (null otherwise).
  metrics::Counter* afd_calls_ = nullptr;
  metrics::Counter* afd_round_trip_seconds_ = nullptr;
  metrics::Counter* afd_exchange_seconds_ = nullptr;
  metrics::Counter* afd_wait_seconds_ = nullptr;
  metrics::Counter* afd_compute_seconds_ = nullptr;
  metrics::Counter* afd_bytes_sent_ = nullptr;
  metrics::Counter* afd_bytes_received_ = nullptr;
};

}  // namespace cleave::worker
