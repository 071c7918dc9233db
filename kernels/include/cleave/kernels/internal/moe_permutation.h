// Internal to the kernel library (both backends): the host half of MoE routing that the CPU and
// CUDA paths share, so that they agree exactly. MoeRoute builds the permutation with
// BuildMoePermutation whichever device computed the top-k; MoeExperts checks the routing it is
// given with CheckMoeRoutingAndInvert before touching memory. Header-only (the CUDA backend is a
// separate library compiled as C++17 by nvcc).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/kernels/moe.h"

namespace cleave::kernels::moe_internal {

// Expert ids, slots and permuted rows are int32 in MoeRouting.
inline constexpr int64_t kInt32Max = 0x7fffffff;

// Counting sort of the slots by expert: fills routing.expert_offsets [E + 1] and
// routing.permuted_slots [T * k] from routing.topk_ids (every id in [0, num_experts), as MoeRoute
// produces). Slots are visited in increasing order (token-major), so each expert's rows come out
// in increasing token order.
inline void BuildMoePermutation(MoeRouting& routing) {
  const int num_experts = routing.num_experts;
  const size_t slots = routing.topk_ids.size();
  std::vector<int32_t>& offsets = routing.expert_offsets;
  offsets.assign(static_cast<size_t>(num_experts) + 1, 0);
  for (int32_t id : routing.topk_ids) ++offsets[static_cast<size_t>(id) + 1];
  for (int e = 0; e < num_experts; ++e) offsets[e + 1] += offsets[e];
  std::vector<int32_t> cursor(offsets.begin(), offsets.end() - 1);
  routing.permuted_slots.resize(slots);
  for (size_t s = 0; s < slots; ++s) {
    routing.permuted_slots[cursor[routing.topk_ids[s]]++] = static_cast<int32_t>(s);
  }
}

// Checks that `routing` describes t tokens over num_experts experts consistently (every expert id
// in range, offsets a partition of the T*k rows, permuted_slots a permutation of the slots with
// each row in its expert's range) and fills slot_rows with the inverse permutation: slot s is
// permuted row slot_rows[s]. A routing that MoeRoute did not fill is therefore caught here, not by
// a read out of bounds. InvalidArgument naming `op` otherwise.
inline absl::Status CheckMoeRoutingAndInvert(const char* op, const MoeRouting& routing, int64_t t,
                                             int num_experts, std::vector<int32_t>& slot_rows) {
  const auto error = [op](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": routing ", parts...));
  };
  if (routing.num_tokens != t) return error("is for ", routing.num_tokens, " tokens, x has ", t);
  if (routing.num_experts != num_experts) {
    return error("is over ", routing.num_experts, " experts, weights hold ", num_experts);
  }
  const int k = routing.top_k;
  if (k < 1 || k > num_experts) return error("top_k ", k, " is not in [1, ", num_experts, "]");
  if (t * k > kInt32Max) return error("has ", t * k, " slots, more than int32 indexes");
  const size_t slots = static_cast<size_t>(t * k);
  if (routing.topk_ids.size() != slots || routing.topk_weights.size() != slots ||
      routing.permuted_slots.size() != slots ||
      routing.expert_offsets.size() != static_cast<size_t>(num_experts) + 1) {
    return error("buffers have the wrong sizes (topk_ids ", routing.topk_ids.size(),
                 ", topk_weights ", routing.topk_weights.size(), ", permuted_slots ",
                 routing.permuted_slots.size(), ", expert_offsets ", routing.expert_offsets.size(),
                 "; expected ", slots, ", ", slots, ", ", slots, ", ", num_experts + 1, ")");
  }
  const std::vector<int32_t>& offsets = routing.expert_offsets;
  if (offsets[0] != 0 || static_cast<size_t>(offsets[num_experts]) != slots) {
    return error("expert_offsets must run from 0 to ", slots);
  }
  slot_rows.assign(slots, -1);
  for (int e = 0; e < num_experts; ++e) {
    // Checked before the rows are read: a later decrease would come too late to stop an offset
    // past the end.
    if (offsets[e + 1] < offsets[e] || static_cast<size_t>(offsets[e + 1]) > slots) {
      return error("expert_offsets decrease or pass ", slots, " at expert ", e);
    }
    for (int32_t r = offsets[e]; r < offsets[e + 1]; ++r) {
      const int32_t s = routing.permuted_slots[r];
      if (s < 0 || static_cast<size_t>(s) >= slots) {
        return error("permuted_slots[", r, "] = ", s, " is not a slot");
      }
      if (routing.topk_ids[s] != e) {
        return error("row ", r, " is in expert ", e, "'s range but slot ", s, " chose expert ",
                     routing.topk_ids[s]);
      }
      if (slot_rows[s] != -1) return error("slot ", s, " appears twice in permuted_slots");
      slot_rows[s] = r;
    }
  }
  return absl::OkStatus();
}

}  // namespace cleave::kernels::moe_internal
