// CPU backend of attention.h: paged KV-cache writes, flash-style prefill and split-K decode.
//
// Both attention kernels share one inner routine, AttendRange(): a set of query vectors that read
// the same KV head walks a range of KV positions in chunks of kKvChunk, keeping per-query running
// (max, sum, unnormalised output) — the online softmax of softmax.h — so no score matrix is ever
// materialised and each K/V row is pulled from memory once per set of queries, not once per query.
//
//   prefill: one work item = (sequence, KV head, tile of new tokens); its queries are every head
//            of the GQA group for every token of the tile, each with its own causal limit.
//   decode:  one work item = (sequence, KV head, partition of the KV range); partial states of a
//            sequence's partitions are merged exactly afterwards (flash-decoding).
//
// Every index the kernels follow (query_start_loc, seq_lens, block ids, slots) is checked on the
// host before any memory is read or written, so a bad batch fails with InvalidArgument and leaves
// `out` and the caches untouched.
#include "cleave/kernels/attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "parallel.h"

namespace cleave::kernels {
namespace {

// KV positions per step of the inner loop. One chunk of one head is 2 * 32 * Dh floats (32 KiB at
// Dh = 128), small enough to stay in L1/L2 while every query of a work item visits it.
constexpr int64_t kKvChunk = 32;
// Query vectors (tokens x heads of one GQA group) per prefill work item: enough to amortise each
// K/V chunk over many queries, few enough that their accumulators (64 * Dh floats) stay in L2.
constexpr int64_t kTileRows = 64;
// KV positions per decode partition. Fixed rather than derived from the thread count so that a
// result does not depend on the machine it was computed on.
constexpr int64_t kDecodePartition = 256;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Validation.

absl::Status CheckTensor(const Tensor& t, const char* name, DType dtype, int ndim) {
  if (!t.device().is_cpu()) {
    return absl::UnimplementedError(absl::StrCat(name, " is on ", t.device().ToString(),
                                                 "; only the CPU attention backend exists"));
  }
  if (t.dtype() != dtype || t.ndim() != ndim) {
    return absl::InvalidArgumentError(absl::StrCat(name, " must be ", std::string(DTypeName(dtype)),
                                                   " of rank ", ndim, ", got ", t.DebugString()));
  }
  for (int i = 0; i < ndim; ++i) {
    if (t.dim(i) < 0) {
      return absl::InvalidArgumentError(absl::StrCat(name, " has a negative dim: ", t.DebugString()));
    }
  }
  if (t.data() == nullptr && t.numel() > 0) {
    return absl::InvalidArgumentError(absl::StrCat(name, " ", t.DebugString(), " has no data"));
  }
  return absl::OkStatus();
}

// q, out, k and v may be column slices of a fused projection (Tensor::Narrow), so only the head
// dim has to be contiguous.
absl::Status CheckRowsContiguous(const Tensor& t, const char* name) {
  if (t.dim(-1) > 1 && t.stride(-1) != 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(name, " must be contiguous along its last dim, got stride ", t.stride(-1)));
  }
  return absl::OkStatus();
}

absl::Status CheckContiguous(const Tensor& t, const char* name) {
  if (!t.is_contiguous()) {
    return absl::InvalidArgumentError(absl::StrCat(name, " ", t.DebugString(), " must be contiguous"));
  }
  return absl::OkStatus();
}

absl::Status CheckSameShape(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  bool same = a.ndim() == b.ndim();
  for (int i = 0; same && i < a.ndim(); ++i) same = a.dim(i) == b.dim(i);
  if (!same) {
    return absl::InvalidArgumentError(absl::StrCat(b_name, " ", b.DebugString(), " must have the shape of ",
                                                   a_name, " ", a.DebugString()));
  }
  return absl::OkStatus();
}

// k_cache / v_cache: f32 [num_blocks, block_size, Hk, Dh], contiguous, same shape.
absl::Status CheckCaches(const Tensor& k_cache, const Tensor& v_cache) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(k_cache, "k_cache", DType::kF32, 4));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(v_cache, "v_cache", DType::kF32, 4));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(k_cache, "k_cache"));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(v_cache, "v_cache"));
  CLEAVE_RETURN_IF_ERROR(CheckSameShape(k_cache, "k_cache", v_cache, "v_cache"));
  if (k_cache.dim(1) <= 0 || k_cache.dim(2) <= 0 || k_cache.dim(3) <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "k_cache ", k_cache.DebugString(), " needs block_size, num_kv_heads and head_dim > 0"));
  }
  return absl::OkStatus();
}

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

  int64_t q_len(int64_t b) const { return query_start_loc[b + 1] - query_start_loc[b]; }
  // First KV position that the earliest query of `first_pos` can see.
  int64_t first_visible(int64_t first_pos) const {
    return window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0;
  }
};

absl::Status CheckShapes(const PagedAttentionArgs& a) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(a.q, "q", DType::kF32, 3));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(a.out, "out", DType::kF32, 3));
  CLEAVE_RETURN_IF_ERROR(CheckRowsContiguous(a.q, "q"));
  CLEAVE_RETURN_IF_ERROR(CheckRowsContiguous(a.out, "out"));
  CLEAVE_RETURN_IF_ERROR(CheckSameShape(a.q, "q", a.out, "out"));
  CLEAVE_RETURN_IF_ERROR(CheckCaches(a.k_cache, a.v_cache));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(a.query_start_loc, "query_start_loc", DType::kI32, 1));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(a.seq_lens, "seq_lens", DType::kI32, 1));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(a.block_tables, "block_tables", DType::kI32, 2));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(a.query_start_loc, "query_start_loc"));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(a.seq_lens, "seq_lens"));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(a.block_tables, "block_tables"));

  const int64_t hq = a.q.dim(1), dh = a.q.dim(2);
  const int64_t hk = a.k_cache.dim(2);
  if (hq <= 0 || hq % hk != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_q_heads (", hq, ", q ", a.q.DebugString(),
                                                   ") must be a positive multiple of num_kv_heads (",
                                                   hk, ", k_cache ", a.k_cache.DebugString(), ")"));
  }
  if (dh != a.k_cache.dim(3)) {
    return absl::InvalidArgumentError(absl::StrCat("head_dim of q ", a.q.DebugString(),
                                                   " differs from k_cache ", a.k_cache.DebugString()));
  }
  const int64_t b = a.seq_lens.dim(0);
  if (a.query_start_loc.dim(0) != b + 1 || a.block_tables.dim(0) != b) {
    return absl::InvalidArgumentError(absl::StrCat(
        "batch size disagrees: seq_lens ", a.seq_lens.DebugString(), " says B = ", b,
        ", query_start_loc ", a.query_start_loc.DebugString(), " must be [B + 1], block_tables ",
        a.block_tables.DebugString(), " must be [B, max_blocks_per_seq]"));
  }
  if (a.sliding_window < 0) {
    return absl::InvalidArgumentError(absl::StrCat("sliding_window must be >= 0, got ", a.sliding_window));
  }
  if (!std::isfinite(a.scale)) {
    return absl::InvalidArgumentError(absl::StrCat("scale must be finite, got ", a.scale));
  }
  return absl::OkStatus();
}

// O(B + blocks read): query_start_loc partitions [0, T) in order, each sequence's new tokens fit
// in its KV length, the KV length fits in its block-table row, and every block id the kernels
// will follow names a real block. Padding entries (-1) past a sequence's blocks, and blocks wholly
// before the sliding window, are never read and so never checked.
absl::Status CheckBatchIndex(const AttentionPlan& p, int64_t num_blocks, bool decode) {
  const int32_t* qsl = p.query_start_loc;
  if (qsl[0] != 0 || qsl[p.num_seqs] != p.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("query_start_loc must run from 0 to T = ", p.num_tokens,
                                                   ", got ", qsl[0], " .. ", qsl[p.num_seqs]));
  }
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q_len = p.q_len(b), seq_len = p.seq_lens[b];
    if (q_len < 0) {
      return absl::InvalidArgumentError(absl::StrCat("query_start_loc decreases at sequence ", b, ": ",
                                                     qsl[b], " -> ", qsl[b + 1]));
    }
    if (decode && q_len != 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("decode needs exactly one new token per sequence; sequence ", b, " has ", q_len));
    }
    if (q_len > seq_len) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", b, " has ", q_len,
                                                     " new tokens but seq_len ", seq_len));
    }
    const int64_t blocks_needed = (seq_len + p.block_size - 1) / p.block_size;
    if (blocks_needed > p.max_blocks_per_seq) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", b, " has seq_len ", seq_len, " = ", blocks_needed, " blocks of ", p.block_size,
          " but block_tables rows hold ", p.max_blocks_per_seq));
    }
    if (q_len == 0) continue;
    const int32_t* row = p.block_tables + b * p.max_blocks_per_seq;
    for (int64_t i = p.first_visible(seq_len - q_len) / p.block_size; i < blocks_needed; ++i) {
      if (row[i] < 0 || row[i] >= num_blocks) {
        return absl::InvalidArgumentError(absl::StrCat("block_tables[", b, "][", i, "] = ", row[i],
                                                       " is outside the cache's ", num_blocks, " blocks"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<AttentionPlan> PlanAttention(const PagedAttentionArgs& a, bool decode) {
  CLEAVE_RETURN_IF_ERROR(CheckShapes(a));
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
    return absl::InvalidArgumentError(absl::StrCat("decode needs one query per sequence: q ", a.q.DebugString(),
                                                   " has ", p.num_tokens, " tokens for ", p.num_seqs,
                                                   " sequences"));
  }
  CLEAVE_RETURN_IF_ERROR(CheckBatchIndex(p, a.k_cache.dim(0), decode));
  return p;
}

// ---------------------------------------------------------------------------------------------
// Vector helpers. Written as fixed-width lane loops so GCC/Clang vectorise them at -O3 without
// -ffast-math (a plain `s += a[i] * b[i]` reduction may not be reordered, so it would stay scalar).

constexpr int kLanes = 8;  // one AVX2 register of floats

inline float SumLanes(const float* acc) {
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int i = 0; i < kLanes; ++i) acc[i] += a[d + i] * b[d + i];
  }
  float s = SumLanes(acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// out[j] = q . k[j] for four keys at once: q is loaded once per four FMAs instead of once per one.
inline void Dot4(const float* __restrict q, const float* const* k, int64_t n, float* out) {
  const float* __restrict k0 = k[0];
  const float* __restrict k1 = k[1];
  const float* __restrict k2 = k[2];
  const float* __restrict k3 = k[3];
  float a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    for (int i = 0; i < kLanes; ++i) {
      const float x = q[d + i];
      a0[i] += x * k0[d + i];
      a1[i] += x * k1[d + i];
      a2[i] += x * k2[d + i];
      a3[i] += x * k3[d + i];
    }
  }
  float s0 = SumLanes(a0), s1 = SumLanes(a1), s2 = SumLanes(a2), s3 = SumLanes(a3);
  for (; d < n; ++d) {
    s0 += q[d] * k0[d];
    s1 += q[d] * k1[d];
    s2 += q[d] * k2[d];
    s3 += q[d] * k3[d];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// acc += sum_j p[j] * v[j] over n rows, four rows per pass so acc is loaded and stored n/4 times.
inline void AccumulateRows(const float* p, const float* const* v, int64_t n, int64_t dh,
                           float* __restrict acc) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const float p0 = p[j], p1 = p[j + 1], p2 = p[j + 2], p3 = p[j + 3];
    const float* __restrict v0 = v[j];
    const float* __restrict v1 = v[j + 1];
    const float* __restrict v2 = v[j + 2];
    const float* __restrict v3 = v[j + 3];
    for (int64_t d = 0; d < dh; ++d) acc[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
  }
  for (; j < n; ++j) {
    const float pj = p[j];
    const float* __restrict vj = v[j];
    for (int64_t d = 0; d < dh; ++d) acc[d] += pj * vj[d];
  }
}

inline void ScaleRow(float* __restrict x, float s, int64_t n) {
  for (int64_t d = 0; d < n; ++d) x[d] *= s;
}

// ---------------------------------------------------------------------------------------------
// The shared inner routine.

// One KV head of one sequence, as AttendRange walks it. Position p of the sequence is at
// k + blocks[p / block_size] * block_stride + (p % block_size) * position_stride.
struct KvHeadView {
  const float* k = nullptr;  // k_cache + kv_head * Dh
  const float* v = nullptr;
  const int32_t* blocks = nullptr;  // the sequence's block-table row (validated)
  int64_t block_size = 0;
  int64_t position_stride = 0;  // Hk * Dh
  int64_t block_stride = 0;     // block_size * Hk * Dh
};

KvHeadView MakeKvHeadView(const AttentionPlan& p, int64_t b, int64_t kv_head) {
  KvHeadView kv;
  kv.k = p.k_cache + kv_head * p.head_dim;
  kv.v = p.v_cache + kv_head * p.head_dim;
  kv.blocks = p.block_tables + b * p.max_blocks_per_seq;
  kv.block_size = p.block_size;
  kv.position_stride = p.num_kv_heads * p.head_dim;
  kv.block_stride = p.block_size * kv.position_stride;
  return kv;
}

// The queries of one work item and their online-softmax state. Row r is query vector q[r] of the
// token at position pos[r]; m[r], l[r] are its running max and sum of exp(score - max), and
// acc[r * Dh ...] its output so far, not yet divided by l[r].
struct QueryRows {
  int64_t rows = 0;
  const float** q = nullptr;  // [rows]
  const int64_t* pos = nullptr;  // [rows]
  float* m = nullptr;    // [rows]
  float* l = nullptr;    // [rows]
  float* acc = nullptr;  // [rows, Dh]
};

// Per-worker buffers, allocated once per call and reused for every item the worker takes.
struct Scratch {
  explicit Scratch(int64_t max_rows, int64_t head_dim)
      : k_rows(kKvChunk), v_rows(kKvChunk), scores(kKvChunk), q(max_rows), pos(max_rows),
        m(max_rows), l(max_rows), acc(max_rows * head_dim) {}
  std::vector<const float*> k_rows, v_rows;
  std::vector<float> scores;
  std::vector<const float*> q;
  std::vector<int64_t> pos;
  std::vector<float> m, l, acc;
};

// Folds positions [0, n) of one chunk into one query's state. k, v: the chunk's rows; s: [n] scratch.
void UpdateQuery(const float* q, const float* const* k, const float* const* v, int64_t n, int64_t dh,
                 float scale, float& m, float& l, float* acc, float* s) {
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) Dot4(q, k + j, dh, s + j);
  for (; j < n; ++j) s[j] = Dot(q, k[j], dh);
  float chunk_max = kNegInf;
  for (j = 0; j < n; ++j) {
    s[j] *= scale;
    chunk_max = std::max(chunk_max, s[j]);
  }
  const float m_new = std::max(m, chunk_max);
  float sum = 0.0f;
  for (j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - m_new);
    sum += s[j];
  }
  // The first chunk a query sees has m == -inf, so alpha == 0 and the (zero) state is reset.
  const float alpha = std::exp(m - m_new);
  if (alpha != 1.0f) ScaleRow(acc, alpha, dh);
  l = l * alpha + sum;
  m = m_new;
  AccumulateRows(s, v, n, dh, acc);
}

// Attends every row of `rows` to the positions in [lo, hi) it may see: p <= pos[r] (causal) and,
// with a window, p > pos[r] - window. Rows outside a chunk's reach skip it without reading it.
void AttendRange(const KvHeadView& kv, int64_t lo, int64_t hi, int64_t window, int64_t dh, float scale,
                 const QueryRows& rows, Scratch& s) {
  for (int64_t c0 = lo; c0 < hi; c0 += kKvChunk) {
    const int64_t c1 = std::min(hi, c0 + kKvChunk);
    for (int64_t p = c0; p < c1; ++p) {
      const int64_t offset = kv.blocks[p / kv.block_size] * kv.block_stride +
                             (p % kv.block_size) * kv.position_stride;
      s.k_rows[p - c0] = kv.k + offset;
      s.v_rows[p - c0] = kv.v + offset;
    }
    for (int64_t r = 0; r < rows.rows; ++r) {
      const int64_t j0 = window > 0 ? std::max(c0, rows.pos[r] - window + 1) : c0;
      const int64_t j1 = std::min(c1, rows.pos[r] + 1);
      if (j0 >= j1) continue;
      UpdateQuery(rows.q[r], s.k_rows.data() + (j0 - c0), s.v_rows.data() + (j0 - c0), j1 - j0, dh,
                  scale, rows.m[r], rows.l[r], rows.acc + r * dh, s.scores.data());
    }
  }
}

void ResetState(const QueryRows& rows, int64_t dh) {
  std::fill(rows.m, rows.m + rows.rows, kNegInf);
  std::fill(rows.l, rows.l + rows.rows, 0.0f);
  std::fill(rows.acc, rows.acc + rows.rows * dh, 0.0f);
}

// out = acc / l. Every query sees at least its own position, so l > 0; the guard only keeps a
// NaN out of a result that could only come from non-finite inputs.
void WriteNormalised(const float* acc, float l, int64_t dh, float* out) {
  const float inv = l > 0.0f ? 1.0f / l : 0.0f;
  for (int64_t d = 0; d < dh; ++d) out[d] = acc[d] * inv;
}

// Runs body(item, scratch) for item in [0, n) on the pool, handing items out one at a time so a
// worker that drew cheap items takes more (causal prefill tiles differ a lot in cost).
template <typename Body>
void RunItems(int64_t n, int64_t max_rows, int64_t head_dim, const Body& body) {
  std::atomic<int64_t> next{0};
  cpu::ParallelFor(std::min<int64_t>(n, cpu::PoolThreads()), 1, [&](int64_t, int64_t) {
    Scratch scratch(max_rows, head_dim);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      body(i, scratch);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Prefill.

struct PrefillTile {
  int32_t seq;
  int32_t kv_head;
  int32_t first_token;  // tokens [first_token, last_token) of the sequence's new tokens
  int32_t last_token;
  int64_t cost;  // ~ queries x KV positions, for scheduling the expensive tiles first
};

std::vector<PrefillTile> MakePrefillTiles(const AttentionPlan& p, int64_t tile_tokens) {
  std::vector<PrefillTile> tiles;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t q_len = p.q_len(b), start_pos = p.seq_lens[b] - q_len;
    for (int64_t t0 = 0; t0 < q_len; t0 += tile_tokens) {
      const int64_t t1 = std::min(q_len, t0 + tile_tokens);
      const int64_t kv_positions = start_pos + t1 - p.first_visible(start_pos + t0);
      for (int64_t h = 0; h < p.num_kv_heads; ++h) {
        tiles.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), static_cast<int32_t>(t0),
                         static_cast<int32_t>(t1), (t1 - t0) * kv_positions});
      }
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const PrefillTile& x, const PrefillTile& y) { return x.cost > y.cost; });
  return tiles;
}

void RunPrefillTile(const AttentionPlan& p, const PrefillTile& tile, Scratch& s) {
  const int64_t dh = p.head_dim, g = p.group;
  const int64_t q_len = p.q_len(tile.seq), start_pos = p.seq_lens[tile.seq] - q_len;
  const int64_t row0 = p.query_start_loc[tile.seq];
  QueryRows rows{(tile.last_token - tile.first_token) * g, s.q.data(), s.pos.data(),
                 s.m.data(),                              s.l.data(), s.acc.data()};
  for (int64_t t = tile.first_token; t < tile.last_token; ++t) {
    for (int64_t i = 0; i < g; ++i) {
      const int64_t r = (t - tile.first_token) * g + i;
      s.q[r] = p.q + (row0 + t) * p.q_token_stride + (tile.kv_head * g + i) * p.q_head_stride;
      s.pos[r] = start_pos + t;
    }
  }
  ResetState(rows, dh);
  AttendRange(MakeKvHeadView(p, tile.seq, tile.kv_head), p.first_visible(start_pos + tile.first_token),
              start_pos + tile.last_token, p.window, dh, p.scale, rows, s);
  for (int64_t r = 0; r < rows.rows; ++r) {
    const int64_t t = tile.first_token + r / g, head = tile.kv_head * g + r % g;
    WriteNormalised(rows.acc + r * dh, rows.l[r], dh,
                    p.out + (row0 + t) * p.out_token_stride + head * p.out_head_stride);
  }
}

// ---------------------------------------------------------------------------------------------
// Decode.

struct DecodeSplit {
  std::vector<int64_t> parts;       // [B] partitions of sequence b's visible KV range
  std::vector<int64_t> state_base;  // [B] first partial-state slot of b (used when parts > 1)
  int64_t num_states = 0;           // partial-state slots in all, each holding Hq heads
};

// The visible range of a decode query at position seq_len - 1, cut into kDecodePartition pieces.
// Sequences with one partition write `out` directly and need no partial state.
DecodeSplit SplitDecode(const AttentionPlan& p) {
  DecodeSplit split;
  split.parts.resize(p.num_seqs);
  split.state_base.resize(p.num_seqs);
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t hi = p.seq_lens[b], lo = p.first_visible(hi - 1);
    split.parts[b] = (hi - lo + kDecodePartition - 1) / kDecodePartition;
    split.state_base[b] = split.num_states;
    if (split.parts[b] > 1) split.num_states += split.parts[b];
  }
  return split;
}

// Partial states of every split sequence: slot (state_base[b] + part) holds Hq heads.
struct PartialStates {
  std::vector<float> m, l, acc;  // [num_states * Hq], same, [num_states * Hq * Dh]
};

// out = sum_i acc_i e^(m_i - M) / sum_i l_i e^(m_i - M), M = max_i m_i: the exact softmax over
// the union of the partitions, as OnlineSoftmaxState::Merge computes it pairwise.
void MergePartitions(const AttentionPlan& p, const PartialStates& st, int64_t first_slot, int64_t parts,
                     int64_t head, float* out) {
  const int64_t dh = p.head_dim;
  float m_max = kNegInf;
  for (int64_t i = 0; i < parts; ++i) m_max = std::max(m_max, st.m[(first_slot + i) * p.num_q_heads + head]);
  float l_total = 0.0f;
  std::fill(out, out + dh, 0.0f);
  for (int64_t i = 0; i < parts; ++i) {
    const int64_t idx = (first_slot + i) * p.num_q_heads + head;
    const float w = st.m[idx] == kNegInf ? 0.0f : std::exp(st.m[idx] - m_max);
    l_total += st.l[idx] * w;
    const float* __restrict acc = st.acc.data() + idx * dh;
    for (int64_t d = 0; d < dh; ++d) out[d] += w * acc[d];
  }
  ScaleRow(out, l_total > 0.0f ? 1.0f / l_total : 0.0f, dh);
}

void RunDecodeItem(const AttentionPlan& p, const DecodeSplit& split, PartialStates& st, int64_t seq,
                   int64_t kv_head, int64_t part, Scratch& s) {
  const int64_t dh = p.head_dim, g = p.group;
  const int64_t pos = p.seq_lens[seq] - 1;
  const int64_t lo = p.first_visible(pos) + part * kDecodePartition;
  const int64_t hi = std::min<int64_t>(p.seq_lens[seq], lo + kDecodePartition);
  const bool split_seq = split.parts[seq] > 1;
  QueryRows rows{g, s.q.data(), s.pos.data(), s.m.data(), s.l.data(), s.acc.data()};
  if (split_seq) {  // accumulate straight into this partition's slots of the partial state
    const int64_t idx = (split.state_base[seq] + part) * p.num_q_heads + kv_head * g;
    rows.m = st.m.data() + idx;
    rows.l = st.l.data() + idx;
    rows.acc = st.acc.data() + idx * dh;
  }
  for (int64_t i = 0; i < g; ++i) {
    s.q[i] = p.q + seq * p.q_token_stride + (kv_head * g + i) * p.q_head_stride;
    s.pos[i] = pos;
  }
  ResetState(rows, dh);
  AttendRange(MakeKvHeadView(p, seq, kv_head), lo, hi, p.window, dh, p.scale, rows, s);
  if (split_seq) return;
  for (int64_t i = 0; i < g; ++i) {
    WriteNormalised(rows.acc + i * dh, rows.l[i], dh,
                    p.out + seq * p.out_token_stride + (kv_head * g + i) * p.out_head_stride);
  }
}

}  // namespace

absl::Status WriteKvCache(const Tensor& k, const Tensor& v, const Tensor& slot_mapping, Tensor& k_cache,
                          Tensor& v_cache, Stream* stream) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(k, "k", DType::kF32, 3));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(v, "v", DType::kF32, 3));
  CLEAVE_RETURN_IF_ERROR(CheckRowsContiguous(k, "k"));
  CLEAVE_RETURN_IF_ERROR(CheckRowsContiguous(v, "v"));
  CLEAVE_RETURN_IF_ERROR(CheckSameShape(k, "k", v, "v"));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(slot_mapping, "slot_mapping", DType::kI32, 1));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(slot_mapping, "slot_mapping"));
  CLEAVE_RETURN_IF_ERROR(CheckCaches(k_cache, v_cache));
  const int64_t num_tokens = k.dim(0), hk = k.dim(1), dh = k.dim(2);
  if (slot_mapping.dim(0) != num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("slot_mapping ", slot_mapping.DebugString(),
                                                   " must have one slot per row of k ", k.DebugString()));
  }
  if (hk != k_cache.dim(2) || dh != k_cache.dim(3)) {
    return absl::InvalidArgumentError(absl::StrCat("k ", k.DebugString(), " must be [T, Hk, Dh] of k_cache ",
                                                   k_cache.DebugString()));
  }
  const int32_t* slots = slot_mapping.data_as<const int32_t>();
  const int64_t num_slots = k_cache.dim(0) * k_cache.dim(1);
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slots[t] >= num_slots) {
      return absl::InvalidArgumentError(absl::StrCat("slot_mapping[", t, "] = ", slots[t],
                                                     " is past the cache's ", num_slots, " slots"));
    }
  }

  const float* k_src = k.data_as<const float>();
  const float* v_src = v.data_as<const float>();
  float* k_dst = k_cache.data_as<float>();
  float* v_dst = v_cache.data_as<float>();
  const size_t row_bytes = static_cast<size_t>(dh) * sizeof(float);
  // Distinct tokens normally map to distinct slots; if a batch repeats a slot, which row lands
  // there is unspecified (as on every backend that scatters in parallel).
  cpu::ParallelFor(num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      if (slots[t] < 0) continue;  // padding row
      const int64_t dst = static_cast<int64_t>(slots[t]) * hk * dh;
      for (int64_t h = 0; h < hk; ++h) {
        std::memcpy(k_dst + dst + h * dh, k_src + t * k.stride(0) + h * k.stride(1), row_bytes);
        std::memcpy(v_dst + dst + h * dh, v_src + t * v.stride(0) + h * v.stride(1), row_bytes);
      }
    }
  });
  return absl::OkStatus();
}

absl::Status PagedAttentionPrefill(const PagedAttentionArgs& args, Stream* stream) {
  CLEAVE_ASSIGN_OR_RETURN(const AttentionPlan p, PlanAttention(args, /*decode=*/false));
  const int64_t tile_tokens = std::max<int64_t>(1, kTileRows / p.group);
  const std::vector<PrefillTile> tiles = MakePrefillTiles(p, tile_tokens);
  RunItems(static_cast<int64_t>(tiles.size()), tile_tokens * p.group, p.head_dim,
           [&](int64_t i, Scratch& s) { RunPrefillTile(p, tiles[i], s); });
  return absl::OkStatus();
}

absl::Status PagedAttentionDecode(const PagedAttentionArgs& args, Stream* stream) {
  CLEAVE_ASSIGN_OR_RETURN(const AttentionPlan p, PlanAttention(args, /*decode=*/true));
  const DecodeSplit split = SplitDecode(p);
  PartialStates st;
  st.m.resize(split.num_states * p.num_q_heads);
  st.l.resize(split.num_states * p.num_q_heads);
  st.acc.resize(split.num_states * p.num_q_heads * p.head_dim);

  // Items are (sequence, partition, KV head), flattened; partitions of one sequence run in
  // parallel, which is what keeps a small batch with a long context busy on every core.
  struct Item {
    int32_t seq, part, kv_head;
  };
  std::vector<Item> items;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    for (int64_t part = 0; part < split.parts[b]; ++part) {
      for (int64_t h = 0; h < p.num_kv_heads; ++h) {
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(part), static_cast<int32_t>(h)});
      }
    }
  }
  RunItems(static_cast<int64_t>(items.size()), p.group, p.head_dim, [&](int64_t i, Scratch& s) {
    RunDecodeItem(p, split, st, items[i].seq, items[i].kv_head, items[i].part, s);
  });
  if (split.num_states == 0) return absl::OkStatus();

  cpu::ParallelFor(p.num_seqs * p.num_q_heads, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.num_q_heads, head = i % p.num_q_heads;
      if (split.parts[b] <= 1) continue;
      MergePartitions(p, st, split.state_base[b], split.parts[b], head,
                      p.out + b * p.out_token_stride + head * p.out_head_stride);
    }
  });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
