#include "cleave/model/expert_placement.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"

namespace cleave::model {
namespace {

// SwiGLU weights: gate and up [F, D], down [D, F]. The dtype width is the same for every expert
// of a checkpoint, so f32 bytes rank them exactly as the real bytes would.
int64_t SwiGluBytes(int64_t d, int64_t f) { return 3 * d * f * static_cast<int64_t>(sizeof(float)); }

}  // namespace

absl::StatusOr<std::vector<FfnShardPlan>> PlaceExperts(const ModelConfig& c, int num_shards) {
  CLEAVE_CHECK_ARG(num_shards >= 1, "an AFD group needs at least one FFN worker");
  std::vector<FfnShardPlan> plans(num_shards);
  const MoeConfig& moe = c.moe;
  if (moe.num_experts == 0) return plans;
  struct Item {
    int expert;  // num_experts = the shared expert
    int64_t bytes;
  };
  std::vector<Item> items;
  for (int e = 0; e < moe.num_experts; ++e) {
    items.push_back({e, SwiGluBytes(c.hidden_size, moe.expert_intermediate_size)});
  }
  if (moe.shared_expert_intermediate_size > 0) {
    items.push_back({moe.num_experts, SwiGluBytes(c.hidden_size, moe.shared_expert_intermediate_size)});
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.bytes > b.bytes; });
  for (const Item& item : items) {
    auto lightest = std::min_element(plans.begin(), plans.end(), [](const FfnShardPlan& a, const FfnShardPlan& b) {
      return a.expert_bytes < b.expert_bytes;
    });
    lightest->expert_bytes += item.bytes;
    if (item.expert == moe.num_experts) {
      lightest->shared_expert = true;
    } else {
      lightest->experts.push_back(item.expert);
    }
  }
  for (FfnShardPlan& p : plans) std::sort(p.experts.begin(), p.experts.end());
  return plans;
}

absl::StatusOr<FfnShardPlan> ExplicitShard(const ModelConfig& c, const std::vector<int>& experts,
                                           bool shared_expert) {
  const MoeConfig& moe = c.moe;
  FfnShardPlan plan;
  std::vector<bool> seen(moe.num_experts, false);
  for (int e : experts) {
    CLEAVE_CHECK_ARG(e >= 0 && e < moe.num_experts,
                     absl::StrCat("ffn_experts: expert ", e, " is not one of the model's ", moe.num_experts));
    CLEAVE_CHECK_ARG(!seen[e], absl::StrCat("ffn_experts: expert ", e, " is listed twice"));
    seen[e] = true;
    plan.experts.push_back(e);
    plan.expert_bytes += SwiGluBytes(c.hidden_size, moe.expert_intermediate_size);
  }
  CLEAVE_CHECK_ARG(!shared_expert || moe.shared_expert_intermediate_size > 0,
                   "ffn_shared_expert: the model has no shared expert");
  plan.shared_expert = shared_expert;
  if (shared_expert) plan.expert_bytes += SwiGluBytes(c.hidden_size, moe.shared_expert_intermediate_size);
  std::sort(plan.experts.begin(), plan.experts.end());
  return plan;
}

}  // namespace cleave::model
