#include "cleave/scheduler/afd_group.h"

#include <algorithm>
#include <cstddef>
#include <vector>

#include "absl/strings/str_cat.h"

namespace cleave::scheduler {

absl::Status ValidateFfnShard(const v1::FfnShard& shard) {
  const int32_t num_experts = shard.num_experts();
  if (num_experts < 0 || num_experts > kMaxAfdExperts) {
    return absl::InvalidArgumentError(
        absl::StrCat("ffn.num_experts must be in [0, ", kMaxAfdExperts, "], got ", num_experts));
  }
  std::vector<bool> seen(static_cast<size_t>(num_experts), false);
  for (int32_t e : shard.experts()) {
    if (e < 0 || e >= num_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat("ffn expert ", e, " is outside [0, ", num_experts, ")"));
    }
    if (seen[static_cast<size_t>(e)]) {
      return absl::InvalidArgumentError(absl::StrCat("ffn expert ", e, " is listed twice"));
    }
    seen[static_cast<size_t>(e)] = true;
  }
  if (shard.shared_expert() && !shard.model_has_shared_expert()) {
    return absl::InvalidArgumentError(
        "ffn.shared_expert is set but ffn.model_has_shared_expert is not");
  }
  return absl::OkStatus();
}

bool AfdGroupComplete(std::span<const v1::FfnShard* const> shards, std::string* why) {
  auto incomplete = [why](std::string reason) {
    if (why != nullptr) *why = std::move(reason);
    return false;
  };
  if (shards.empty()) return incomplete("no FFN worker");
  const int32_t num_experts = shards[0]->num_experts();
  const bool model_shared = shards[0]->model_has_shared_expert();
  for (const v1::FfnShard* s : shards) {
    if (s->num_experts() != num_experts) {
      return incomplete(absl::StrCat("FFN workers disagree on num_experts (", num_experts,
                                     " and ", s->num_experts(), ")"));
    }
    if (s->model_has_shared_expert() != model_shared) {
      return incomplete("FFN workers disagree on whether the model has a shared expert");
    }
  }
  if (num_experts < 0 || num_experts > kMaxAfdExperts) {
    return incomplete(absl::StrCat("num_experts ", num_experts, " is out of range"));
  }
  if (std::none_of(shards.begin(), shards.end(), [](const auto* s) { return s->dense(); })) {
    return incomplete("no FFN worker serves the dense layers");
  }
  // Owners per expert, each shard counted once per expert even if it lists it twice.
  std::vector<int> owners(static_cast<size_t>(num_experts), 0);
  std::vector<size_t> last(static_cast<size_t>(num_experts), shards.size());
  for (size_t i = 0; i < shards.size(); ++i) {
    for (int32_t e : shards[i]->experts()) {
      if (e < 0 || e >= num_experts) {
        return incomplete(absl::StrCat("expert ", e, " is outside [0, ", num_experts, ")"));
      }
      if (last[static_cast<size_t>(e)] == i) continue;
      last[static_cast<size_t>(e)] = i;
      ++owners[static_cast<size_t>(e)];
    }
  }
  for (int32_t e = 0; e < num_experts; ++e) {
    const int n = owners[static_cast<size_t>(e)];
    if (n == 0) return incomplete(absl::StrCat("expert ", e, " has no FFN worker"));
    if (n > 1) return incomplete(absl::StrCat("expert ", e, " is owned by ", n, " FFN workers"));
  }
  const auto shared = std::count_if(shards.begin(), shards.end(),
                                    [](const auto* s) { return s->shared_expert(); });
  if (model_shared && shared == 0) return incomplete("the shared expert has no FFN worker");
  if (model_shared && shared > 1) {
    return incomplete(absl::StrCat("the shared expert is owned by ", shared, " FFN workers"));
  }
  if (!model_shared && shared > 0) {
    return incomplete("an FFN worker owns a shared expert the model does not have");
  }
  return true;
}

}  // namespace cleave::scheduler
