// Internal to the CPU backend: validation of paged-attention arguments and the plain-data plan
// (sizes, strides, raw pointers) the attention kernels run from. Every index a kernel follows is
// checked here, on the host, before any memory is read or written.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/kernels/attention.h"

namespace cleave::kernels::cpu {

// Everything the attention kernels need, as raw pointers and strides (in floats), once validated.
struct AttentionPlan {
  int64_t num_tokens = 0;    // T
  int64_t num_seqs = 0;      // B
  int64_t num_q_heads = 0;   // Hq
  int64_t num_kv_heads = 0;  // Hk
  int64_t group = 0;         // Hq / Hk
  int64_t head_dim = 0;      // Dh
  int64_t block_size = 0;
  int64_t max_blocks_per_seq = 0;
  int64_t window = 0;  // 0: unbounded
  float scale = 1.0f;
  const float* q = nullptr;
  int64_t q_token_stride = 0, q_head_stride = 0;
  float* out = nullptr;
  int64_t out_token_stride = 0, out_head_stride = 0;
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  const int32_t* query_start_loc = nullptr;  // [B + 1]
  const int32_t* seq_lens = nullptr;         // [B]
  const int32_t* block_tables = nullptr;     // [B, max_blocks_per_seq]

  // In 64 bits: before validation the difference of two i32 entries may not fit in 32.
  int64_t q_len(int64_t b) const {
    return int64_t{query_start_loc[b + 1]} - int64_t{query_start_loc[b]};
  }
  // First KV position that the earliest query of `first_pos` can see.
  int64_t first_visible(int64_t first_pos) const {
    return window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0;
  }
};

// Checks dtypes, shapes, query_start_loc, seq_lens and every block id the pass will read;
// InvalidArgument "<op>: ..." on the first problem.
[[nodiscard]] absl::StatusOr<AttentionPlan> PlanAttention(const char* op,
                                                          const PagedAttentionArgs& a,
                                                          Stream* stream, bool decode);

// Shared with WriteKvCache.
absl::Status OpError(const char* op, const std::string& problem);
absl::Status CheckNonNegative(const char* op, const char* name, const Tensor& t);
absl::Status CheckCaches(const char* op, const Tensor& k_cache, const Tensor& v_cache);
absl::Status CheckIndex(const char* op, const char* name, const Tensor& t,
                        std::initializer_list<int64_t> shape);

}  // namespace cleave::kernels::cpu
