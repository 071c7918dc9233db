// Paged attention over a block-structured KV cache (vLLM-style).
//
// Cache layout of one layer: k_cache, v_cache: f32 [num_blocks, block_size, num_kv_heads, head_dim].
// A sequence's tokens live in the blocks its block table lists, in order: token position p is at
// block_table[p / block_size], offset p % block_size. A "slot" is block_id * block_size + offset.
//
// Grouped-query attention: num_q_heads = group * num_kv_heads; query head h reads KV head
// h / group. All kernels use an online softmax, so no [q, k] score matrix is materialised.
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// Scatters new tokens' keys and values into their cache slots.
// k, v: f32 [T, Hk, Dh]; slot_mapping: i32 [T] (a slot < 0 means "skip this row", used for
// padding); k_cache / v_cache as above. A slot past the cache is InvalidArgument.
[[nodiscard]] absl::Status WriteKvCache(const Tensor& k, const Tensor& v, const Tensor& slot_mapping,
                                        Tensor& k_cache, Tensor& v_cache, Stream* stream = nullptr);

struct PagedAttentionArgs {
  Tensor q;                // f32 [T, Hq, Dh]: the new tokens of all B sequences, packed
  Tensor k_cache;          // f32 [num_blocks, block_size, Hk, Dh], already holding the new tokens
  Tensor v_cache;          // same shape as k_cache
  Tensor query_start_loc;  // i32 [B + 1]: sequence b's queries are rows [qsl[b], qsl[b+1])
  Tensor seq_lens;         // i32 [B]: total KV length of sequence b, including its new tokens
  Tensor block_tables;     // i32 [B, max_blocks_per_seq]
  float scale = 1.0f;      // usually 1/sqrt(Dh)
  int sliding_window = 0;  // > 0: a query at position p sees keys (p - sliding_window, p]
  Tensor out;              // f32 [T, Hq, Dh]
};

// Prefill / chunked prefill: sequence b has q_len_b = qsl[b+1] - qsl[b] new tokens; its i-th new
// token sits at position seq_lens[b] - q_len_b + i and attends causally to keys [0, position]
// (the cached prefix plus the chunk itself). Every index is checked against the cache bounds.
[[nodiscard]] absl::Status PagedAttentionPrefill(const PagedAttentionArgs& args,
                                                 Stream* stream = nullptr);

// Decode: each sequence has exactly one new token (T == B, qsl[b] == b). Reads each KV head once
// for its whole query group. Same result as PagedAttentionPrefill on such a batch.
[[nodiscard]] absl::Status PagedAttentionDecode(const PagedAttentionArgs& args,
                                                Stream* stream = nullptr);

}  // namespace cleave::kernels
