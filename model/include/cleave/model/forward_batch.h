// ForwardBatch: the plain-data plan of one forward pass over B sequences — what the scheduler
// (or the offline generator) decides and the model executes. One shape covers prefill, chunked
// prefill and decode: sequence b contributes q_len_b new tokens on top of seq_lens[b] - q_len_b
// cached ones ("num_computed_tokens catches up to num_tokens").
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace cleave::model {

struct ForwardBatch {
  std::vector<int32_t> token_ids;        // [T] new tokens of all sequences, packed in order
  std::vector<int32_t> positions;        // [T] position of each new token in its sequence
  std::vector<int32_t> query_start_loc;  // [B + 1] sequence b's tokens are [qsl[b], qsl[b+1])
  std::vector<int32_t> seq_lens;         // [B] KV length after this pass (cached + new)
  std::vector<int32_t> block_tables;     // [B * max_blocks_per_seq], row-major, -1 padded
  int max_blocks_per_seq = 0;
  std::vector<int32_t> slot_mapping;     // [T] cache slot of each new token
  std::vector<int32_t> logits_indices;   // rows of T whose logits are wanted (e.g. last of each seq)
  // Models with Mamba layers: [B] the state slot of each sequence, and whether the pass continues
  // from the slot's state (cached_len > 0) or starts the sequence from zero state.
  std::vector<int32_t> state_slots;
  std::vector<int32_t> has_initial_state;

  int num_tokens() const { return static_cast<int>(token_ids.size()); }
  int num_seqs() const { return static_cast<int>(seq_lens.size()); }
  bool is_decode() const { return num_tokens() == num_seqs(); }

  // Appends sequence `tokens` (new tokens) whose KV will be `cached_len + tokens.size()` long,
  // stored in `blocks` (at least enough for that length). `want_logits` asks for the last
  // token's logits. `state_slot` is the sequence's Mamba state slot (-1 for models without Mamba
  // layers). Call Finalize() after the last sequence.
  void AddSequence(std::span<const int32_t> tokens, int cached_len, std::span<const int32_t> blocks,
                   int block_size, bool want_logits, int state_slot = -1);
  // Pads block tables to the longest row; InvalidArgument if the plan is inconsistent.
  [[nodiscard]] absl::Status Finalize();

 private:
  std::vector<std::vector<int32_t>> pending_tables_;
};

}  // namespace cleave::model
