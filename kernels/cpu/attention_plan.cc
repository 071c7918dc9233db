// Validation of paged-attention arguments; see attention_plan.h.
#include "attention_plan.h"

#include <algorithm>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "check.h"
#include "cleave/common/status.h"

namespace cleave::kernels::cpu {

// ---------------------------------------------------------------------------------------------
// Validation. Messages follow check.h: "<op>: <argument> <DebugString()> <problem>".

constexpr int64_t kAny = kAnyDim;

absl::Status OpError(const char* op, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", problem));
}

// A negative extent would turn the O(B) index checks below into out-of-bounds reads.
absl::Status CheckNonNegative(const char* op, const char* name, const Tensor& t) {
  for (int i = 0; i < t.ndim(); ++i) {
    if (t.dim(i) < 0) return ArgError(op, name, t, "has a negative extent");
  }
  return absl::OkStatus();
}

// k_cache / v_cache: f32 [num_blocks, block_size, Hk, Dh], contiguous, same shape, and every
// extent but num_blocks positive (they are divisors below).
absl::Status CheckCaches(const char* op, const Tensor& k_cache, const Tensor& v_cache) {
  CLEAVE_RETURN_IF_ERROR(
      CheckTensor(op, "k_cache", k_cache, DType::kF32, {kAny, kAny, kAny, kAny}));
  CLEAVE_RETURN_IF_ERROR(CheckNonNegative(op, "k_cache", k_cache));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(op, "k_cache", k_cache));
  if (k_cache.dim(1) == 0 || k_cache.dim(2) == 0 || k_cache.dim(3) == 0) {
    return ArgError(op, "k_cache", k_cache, "needs block_size, num_kv_heads and head_dim > 0");
  }
  CLEAVE_RETURN_IF_ERROR(
      CheckTensor(op, "v_cache", v_cache, DType::kF32,
                       {k_cache.dim(0), k_cache.dim(1), k_cache.dim(2), k_cache.dim(3)}));
  return CheckContiguous(op, "v_cache", v_cache);
}

// The small i32 index tensors are read as plain arrays.
absl::Status CheckIndex(const char* op, const char* name, const Tensor& t,
                        std::initializer_list<int64_t> shape) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, name, t, DType::kI32, shape));
  CLEAVE_RETURN_IF_ERROR(CheckNonNegative(op, name, t));
  return CheckContiguous(op, name, t);
}



// Dtypes, shapes, strides and scalars; nothing behind a pointer is read yet. q and out may be
// column slices of wider rows (Tensor::Narrow of a fused projection): only their head dim must be
// packed.
absl::Status CheckShapes(const char* op, const PagedAttentionArgs& a) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, "q", a.q, DType::kF32, {kAny, kAny, kAny}));
  CLEAVE_RETURN_IF_ERROR(CheckNonNegative(op, "q", a.q));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(op, "q", a.q));
  CLEAVE_RETURN_IF_ERROR(CheckCaches(op, a.k_cache, a.v_cache));
  const int64_t t = a.q.dim(0), hq = a.q.dim(1), dh = a.q.dim(2);
  const int64_t hk = a.k_cache.dim(2);
  if (hq == 0 || hq % hk != 0) {
    return OpError(op, absl::StrCat("num_q_heads ", hq, " (q ", a.q.DebugString(),
                                    ") must be a positive multiple of num_kv_heads ", hk,
                                    " (k_cache ", a.k_cache.DebugString(), ")"));
  }
  if (dh != a.k_cache.dim(3)) {
    return OpError(op, absl::StrCat("head_dim of q ", a.q.DebugString(), " differs from k_cache ",
                                    a.k_cache.DebugString()));
  }
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, "out", a.out, DType::kF32, {t, hq, dh}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(op, "out", a.out));
  // B comes from seq_lens; the other two index tensors must agree with it.
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "seq_lens", a.seq_lens, {kAny}));
  const int64_t b = a.seq_lens.dim(0);
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "query_start_loc", a.query_start_loc, {kAny}));
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "block_tables", a.block_tables, {kAny, kAny}));
  if (a.query_start_loc.dim(0) != b + 1 || a.block_tables.dim(0) != b) {
    return OpError(
        op, absl::StrCat("batch sizes disagree: seq_lens ", a.seq_lens.DebugString(),
                         " gives B = ", b, ", so query_start_loc ", a.query_start_loc.DebugString(),
                         " must be [B + 1] and block_tables ", a.block_tables.DebugString(),
                         " must be [B, max_blocks_per_seq]"));
  }
  if (a.sliding_window < 0) {
    return OpError(op, absl::StrCat("sliding_window must be >= 0, got ", a.sliding_window));
  }
  if (!std::isfinite(a.scale)) {
    return OpError(op, absl::StrCat("scale must be finite, got ", a.scale));
  }
  return absl::OkStatus();
}

// O(B + blocks read): query_start_loc partitions [0, T) in order, each sequence's new tokens fit
// in its KV length, the KV length fits in its block-table row, and every block id the kernels
// will follow names a real block. Padding entries (-1) past a sequence's blocks, and blocks wholly
// before the sliding window, are never read and so never checked.
absl::Status CheckBatchIndex(const char* op, const AttentionPlan& p, int64_t num_blocks,
                             bool decode) {
  const int32_t* qsl = p.query_start_loc;
  if (qsl[0] != 0 || qsl[p.num_seqs] != p.num_tokens) {
    return OpError(op, absl::StrCat("query_start_loc must run from 0 to T = ", p.num_tokens,
                                    ", got ", qsl[0], " .. ", qsl[p.num_seqs]));
  }
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q_len = p.q_len(b), seq_len = p.seq_lens[b];
    if (q_len < 0) {
      return OpError(op, absl::StrCat("query_start_loc decreases at sequence ", b, ": ", qsl[b],
                                      " -> ", qsl[b + 1]));
    }
    if (decode && q_len != 1) {
      return OpError(op, absl::StrCat("decode needs exactly one new token per sequence; sequence ",
                                      b, " has ", q_len));
    }
    if (q_len > seq_len) {
      return OpError(
          op, absl::StrCat("sequence ", b, " has ", q_len, " new tokens but seq_len ", seq_len));
    }
    const int64_t blocks_needed = (seq_len + p.block_size - 1) / p.block_size;
    if (blocks_needed > p.max_blocks_per_seq) {
      return OpError(op, absl::StrCat("sequence ", b, " has seq_len ", seq_len, " = ",
                                      blocks_needed, " blocks of ", p.block_size,
                                      " but block_tables rows hold ", p.max_blocks_per_seq));
    }
    if (q_len == 0) continue;
    const int32_t* row = p.block_tables + b * p.max_blocks_per_seq;
    for (int64_t i = p.first_visible(seq_len - q_len) / p.block_size; i < blocks_needed; ++i) {
      if (row[i] < 0 || row[i] >= num_blocks) {
        return OpError(op, absl::StrCat("block_tables[", b, "][", i, "] = ", row[i],
                                        " is outside the cache's ", num_blocks, " blocks"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<AttentionPlan> PlanAttention(const char* op, const PagedAttentionArgs& a,
                                            Stream* stream, bool decode) {
  CLEAVE_RETURN_IF_ERROR(CheckStream(op, stream));
  CLEAVE_RETURN_IF_ERROR(CheckShapes(op, a));
  AttentionPlan p;
  p.num_tokens = a.q.dim(0);
  p.num_seqs = a.seq_lens.dim(0);
  p.num_q_heads = a.q.dim(1);
  p.num_kv_heads = a.k_cache.dim(2);
  p.group = p.num_q_heads / p.num_kv_heads;
  p.head_dim = a.q.dim(2);
  p.block_size = a.k_cache.dim(1);
  p.max_blocks_per_seq = a.block_tables.dim(1);
  p.window = a.sliding_window;
  p.scale = a.scale;
  p.q = a.q.data_as<const float>();
  p.q_token_stride = a.q.stride(0);
  p.q_head_stride = a.q.stride(1);
  p.out = a.out.data_as<float>();
  p.out_token_stride = a.out.stride(0);
  p.out_head_stride = a.out.stride(1);
  p.k_cache = a.k_cache.data_as<const float>();
  p.v_cache = a.v_cache.data_as<const float>();
  p.query_start_loc = a.query_start_loc.data_as<const int32_t>();
  p.seq_lens = a.seq_lens.data_as<const int32_t>();
  p.block_tables = a.block_tables.data_as<const int32_t>();
  if (decode && p.num_tokens != p.num_seqs) {
    return OpError(
        op, absl::StrCat("decode needs one query per sequence: q ", a.q.DebugString(), " has ",
                         p.num_tokens, " tokens for ", p.num_seqs, " sequences"));
  }
  CLEAVE_RETURN_IF_ERROR(CheckBatchIndex(op, p, a.k_cache.dim(0), decode));
  return p;
}

}  // namespace cleave::kernels::cpu
