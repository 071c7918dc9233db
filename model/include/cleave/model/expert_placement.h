// Which FFN worker of an AFD group owns which experts (expert parallelism). Every FFN worker
// runs the dense FFN layers (they are small next to the experts and every token needs them, so
// they are replicated and the attention side splits rows across the workers); the routed experts
// and the shared expert are partitioned, each owned by exactly one worker.
//
// The placement is balanced by expert size (bytes of weights): largest first, each to the worker
// holding the fewest bytes so far, ties to the lower-numbered worker (LPT scheduling). With equal
// experts this deals them round-robin. Every process computes the same placement from the model
// config, so an FFN worker needs only its index and the group's size.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "cleave/model/config.h"

namespace cleave::model {

struct FfnShardPlan {
  std::vector<int> experts;    // routed experts, ascending
  bool shared_expert = false;  // Qwen2-MoE's shared expert
  int64_t expert_bytes = 0;    // weight bytes of what it owns (at the checkpoint's dtype width)
};

// num_shards >= 1. For a dense model every plan is empty (the dense layers are replicated).
absl::StatusOr<std::vector<FfnShardPlan>> PlaceExperts(const ModelConfig& config, int num_shards);

// An explicit list from the config (`ffn_experts`) instead: checks the ids against the model.
absl::StatusOr<FfnShardPlan> ExplicitShard(const ModelConfig& config, const std::vector<int>& experts,
                                           bool shared_expert);

}  // namespace cleave::model
