// The FFN role's work: the activation listener (transport/activation.h) answering the attention
// workers' calls with this worker's dense FFNs and experts, and its metrics.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/common/metrics.h"
#include "cleave/model/decoder.h"
#include "cleave/model/expert_placement.h"
#include "cleave/transport/activation.h"
#include "cleave/v1/control.pb.h"
#include "cleave/worker/worker_process.h"

namespace cleave::worker {

// What an FFN worker owns: the placement's shard `ffn_shard` of `ffn_shards`, or the explicit
// `ffn_experts` list.
absl::StatusOr<model::FfnShardPlan> FfnPlan(const WorkerProcessOptions& o, const model::ModelConfig& config);

class FfnService {
 public:
  // `model` was loaded with LoadOptions::Part::kFfn and the plan's experts; outlives the service.
  static absl::StatusOr<std::unique_ptr<FfnService>> Start(const model::DecoderModel& model,
                                                           const model::FfnShardPlan& plan,
                                                           const WorkerProcessOptions& o,
                                                           metrics::Registry& registry);
  ~FfnService();

  // For the registration (RegisterWorkerRequest.ffn).
  v1::FfnShard shard() const;
  std::string address() const { return server_->address(); }
  // True while an attention worker called within the last `window` (a drain waits for quiet).
  bool CalledWithin(std::chrono::milliseconds window) const;
  void Stop();

 private:
  FfnService(const model::DecoderModel& model, model::FfnShardPlan plan) : model_(model), plan_(std::move(plan)) {}
  absl::Status Handle(const transport::FfnRequest& request, std::span<float> out);

  const model::DecoderModel& model_;
  model::FfnShardPlan plan_;
  std::unique_ptr<transport::FfnServer> server_;
  std::atomic<int64_t> last_call_ns_{0};
  // Metrics (owned by the registry).
  metrics::Counter* dense_calls_ = nullptr;
  metrics::Counter* expert_calls_ = nullptr;
  metrics::Counter* failed_calls_ = nullptr;
  metrics::Histogram* call_seconds_ = nullptr;
  metrics::Counter* rows_ = nullptr;
  std::vector<std::vector<metrics::Counter*>> expert_tokens_;  // [layer][expert + shared]
};

}  // namespace cleave::worker
