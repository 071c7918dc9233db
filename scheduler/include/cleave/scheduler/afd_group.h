// Attention-FFN disaggregation (AFD): whether the FFN workers of one AFD group, together, can run
// every FFN of the model for the group's attention workers. Pure functions of the shards the FFN
// workers registered (RegisterWorkerRequest.ffn); the scheduler places requests on a group's
// attention workers only while its non-draining FFN members pass AfdGroupComplete.
#pragma once

#include <span>
#include <string>

#include "absl/status/status.h"
#include "cleave/v1/control.pb.h"

namespace cleave::scheduler {

// The most routed experts a model may declare: bounds the scheduler's per-expert bookkeeping.
inline constexpr int kMaxAfdExperts = 1 << 16;

// One FFN worker's shard on its own: num_experts in [0, kMaxAfdExperts], every expert in
// [0, num_experts) and listed once, shared_expert only if the model has one. InvalidArgument
// naming the first problem.
absl::Status ValidateFfnShard(const v1::FfnShard& shard);

// Whether `shards` (the group's non-draining FFN members; the caller leaves draining ones out)
// cover the model exactly:
//  - at least one shard;
//  - they agree on num_experts and model_has_shared_expert;
//  - at least one shard has dense = true: dense FFN layers are replicated, so one serving them is
//    enough (an all-MoE model's FFN workers must still set it; the shard says nothing of
//    whether the model has dense layers, so none serving them is never assumed safe);
//  - with num_experts E > 0, each expert 0..E-1 is owned by exactly one shard;
//  - with model_has_shared_expert, exactly one shard has shared_expert (none otherwise).
// When not, `why` (if not null) gets the first problem found, e.g. "expert 3 has no FFN worker",
// "expert 2 is owned by 2 FFN workers", "no FFN worker".
bool AfdGroupComplete(std::span<const v1::FfnShard* const> shards, std::string* why);

}  // namespace cleave::scheduler
