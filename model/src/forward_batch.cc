#include "cleave/model/forward_batch.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace cleave::model {

void ForwardBatch::AddSequence(std::span<const int32_t> tokens, int cached_len,
                               std::span<const int32_t> blocks, int block_size, bool want_logits, int state_slot) {
  if (query_start_loc.empty()) query_start_loc.push_back(0);
  const int start = num_tokens();
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int pos = cached_len + static_cast<int>(i);
    token_ids.push_back(tokens[i]);
    positions.push_back(pos);
    const size_t block_index = static_cast<size_t>(pos / block_size);
    slot_mapping.push_back(block_index < blocks.size() ? blocks[block_index] * block_size + pos % block_size
                                                       : -1);
  }
  query_start_loc.push_back(num_tokens());
  seq_lens.push_back(cached_len + static_cast<int>(tokens.size()));
  pending_tables_.emplace_back(blocks.begin(), blocks.end());
  state_slots.push_back(state_slot);
  has_initial_state.push_back(cached_len > 0 ? 1 : 0);
  if (want_logits && !tokens.empty()) logits_indices.push_back(start + static_cast<int>(tokens.size()) - 1);
}

absl::Status ForwardBatch::Finalize() {
  max_blocks_per_seq = 1;
  for (const auto& t : pending_tables_) max_blocks_per_seq = std::max<int>(max_blocks_per_seq, t.size());
  block_tables.assign(static_cast<size_t>(pending_tables_.size()) * max_blocks_per_seq, -1);
  for (size_t b = 0; b < pending_tables_.size(); ++b) {
    std::copy(pending_tables_[b].begin(), pending_tables_[b].end(),
              block_tables.begin() + b * max_blocks_per_seq);
  }
  pending_tables_.clear();
  for (size_t t = 0; t < slot_mapping.size(); ++t) {
    if (slot_mapping[t] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("token ", t, " at position ", positions[t], " has no KV block"));
    }
  }
  if (token_ids.empty()) return absl::InvalidArgumentError("forward batch has no tokens");
  return absl::OkStatus();
}

}  // namespace cleave::model
