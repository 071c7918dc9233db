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
// Batch invariance: a query's output is bitwise the same from either kernel, in any chunking of
// its sequence's prefill, beside any other sequences, on any thread count. Both kernels cut the
// KV range the same way, by absolute position and never by batch, tile or thread: partitions of
// kDecodePartition positions at multiples of kDecodePartition, each walked in chunks of kKvChunk
// at multiples of kKvChunk with the same per-row online-softmax step (rows are independent; a
// position a row cannot see is skipped for that row). Each partition's state starts afresh and
// the partitions are folded in position order by FoldPartition, in prefill tiles as in decode.
// AttendRange and FoldPartition are single out-of-line copies so both kernels run the very same
// machine code for them.
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
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "attention_plan.h"
#include "check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_attention_ops.h"
#include "parallel.h"
#include "simd.h"

namespace cleave::kernels {
namespace {

using cpu::AttentionPlan;
using cpu::CheckCaches;
using cpu::CheckIndex;
using cpu::CheckNonNegative;
using cpu::OpError;
using cpu::PlanAttention;
constexpr int64_t kAny = cpu::kAnyDim;

// KV positions per step of the inner loop. One chunk of one head is 2 * 32 * Dh floats (32 KiB at
// Dh = 128), small enough to stay in L1/L2 while every query of a work item visits it.
constexpr int64_t kKvChunk = 32;
// Query vectors (tokens x heads of one GQA group) per prefill work item: enough to amortise each
// K/V chunk over many queries, few enough that their accumulators (64 * Dh floats) stay in L2.
constexpr int64_t kTileRows = 64;
// KV positions per partition (a multiple of kKvChunk). Decode splits a long context into
// partitions that run in parallel; prefill folds the same partitions so that its result is the
// same. Fixed, rather than derived from the thread count or the batch, so that a result depends
// on nothing but the sequence.
constexpr int64_t kDecodePartition = 256;
static_assert(kDecodePartition % kKvChunk == 0, "partitions must hold whole chunks");

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// Vector helpers. The dot products use GCC/Clang vector types: a plain `s += a[i] * b[i]` loop is
// a reduction the compiler may not reorder without -ffast-math, and GCC turns the usual 8-lane
// accumulator rewrite into a transposing shuffle mess. F8 is one AVX2 register with
// -march=x86-64-v3 (two SSE registers otherwise). Helpers take F8 by reference: passing a 32-byte
// vector by value changes the ABI when AVX is off, which -Wpsabi rejects.

typedef float F8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline void Load8(F8& v, const float* p) { std::memcpy(&v, p, sizeof(F8)); }

inline float Sum8(const F8& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  F8 acc = {}, x, y;
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    Load8(x, a + d);
    Load8(y, b + d);
    acc += x * y;
  }
  float s = Sum8(acc);
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

// out[j] = q . k[j] for four keys at once: each load of q feeds four FMAs instead of one.
inline void Dot4(const float* __restrict q, const float* __restrict k0, const float* __restrict k1,
                 const float* __restrict k2, const float* __restrict k3, int64_t n, float scale,
                 float* out) {
  F8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, x, y;
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) {
    Load8(x, q + d);
    Load8(y, k0 + d);
    a0 += x * y;
    Load8(y, k1 + d);
    a1 += x * y;
    Load8(y, k2 + d);
    a2 += x * y;
    Load8(y, k3 + d);
    a3 += x * y;
  }
#if CLEAVE_CPU_AVX2
  // One joint reduction of the four accumulators (3 hadds + 1 add) instead of four separate
  // horizontal sums: with small heads (Dh = 8) the reductions were most of the work.
  const __m256 h01 = _mm256_hadd_ps(reinterpret_cast<__m256&>(a0), reinterpret_cast<__m256&>(a1));
  const __m256 h23 = _mm256_hadd_ps(reinterpret_cast<__m256&>(a2), reinterpret_cast<__m256&>(a3));
  const __m256 h = _mm256_hadd_ps(h01, h23);  // lanes: s0 s1 s2 s3 (low half) + (high half)
  alignas(16) float sums[4];
  _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  float s0 = sums[0], s1 = sums[1], s2 = sums[2], s3 = sums[3];
#else
  float s0 = Sum8(a0), s1 = Sum8(a1), s2 = Sum8(a2), s3 = Sum8(a3);
#endif
  for (; d < n; ++d) {
    s0 += q[d] * k0[d];
    s1 += q[d] * k1[d];
    s2 += q[d] * k2[d];
    s3 += q[d] * k3[d];
  }
  out[0] = s0 * scale;
  out[1] = s1 * scale;
  out[2] = s2 * scale;
  out[3] = s3 * scale;
}

// acc += p0 * v0 + p1 * v1 + p2 * v2 + p3 * v3: four rows per pass, so acc is loaded and stored
// once per four rows of V.
inline void Axpy4(const float* p, const float* __restrict v0, const float* __restrict v1,
                  const float* __restrict v2, const float* __restrict v3, int64_t n,
                  float* __restrict acc) {
  const float p0 = p[0], p1 = p[1], p2 = p[2], p3 = p[3];
  for (int64_t d = 0; d < n; ++d) acc[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
}

inline void Axpy(float p, const float* __restrict v, int64_t n, float* __restrict acc) {
  for (int64_t d = 0; d < n; ++d) acc[d] += p * v[d];
}

inline void ScaleRow(float* __restrict x, float s, int64_t n) {
  for (int64_t d = 0; d < n; ++d) x[d] *= s;
}

// ---------------------------------------------------------------------------------------------
// The shared inner routine.

// The KV of one sequence, as AttendRange walks it. Position p starts at
// k + blocks[p / block_size] * block_stride + (p % block_size) * position_stride; its rows for
// the Hk heads follow each other there, Dh floats apart.
struct KvSeqView {
  const float* k = nullptr;
  const float* v = nullptr;
  const int32_t* blocks = nullptr;  // the sequence's block-table row (validated)
  int64_t block_size = 0;
  int64_t position_stride = 0;  // Hk * Dh
  int64_t block_stride = 0;     // block_size * Hk * Dh
};

KvSeqView MakeKvSeqView(const AttentionPlan& p, int64_t b) {
  KvSeqView kv;
  kv.k = p.k_cache;
  kv.v = p.v_cache;
  kv.blocks = p.block_tables + b * p.max_blocks_per_seq;
  kv.block_size = p.block_size;
  kv.position_stride = p.num_kv_heads * p.head_dim;
  kv.block_stride = p.block_size * kv.position_stride;
  return kv;
}

// The queries of one work item and their online-softmax state. Row r is query vector q[r] of the
// token at position pos[r], reading KV head kv_offset[r] / Dh; m[r], l[r] are its running max and
// sum of exp(score - max), and acc[r * Dh ...] its output so far, not yet divided by l[r].
struct QueryRows {
  int64_t rows = 0;
  const float** q = nullptr;           // [rows]
  const int64_t* pos = nullptr;        // [rows]
  const int64_t* kv_offset = nullptr;  // [rows] kv_head * Dh
  float* m = nullptr;                  // [rows]
  float* l = nullptr;                  // [rows]
  float* acc = nullptr;                // [rows, Dh]
};

// Per-thread buffers, kept across calls (a decode step calls attention once per layer) and
// reused for every item the thread takes; they only grow.
struct Scratch {
  void Reserve(int64_t max_rows, int64_t head_dim) {
    const auto grow = [](auto& v, int64_t n) {
      if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    };
    grow(k_rows, kKvChunk);
    grow(v_rows, kKvChunk);
    grow(scores, max_rows * kKvChunk);
    grow(first, max_rows);
    grow(last, max_rows);
    grow(q, max_rows);
    grow(pos, max_rows);
    grow(kv_offset, max_rows);
    grow(m, max_rows);
    grow(l, max_rows);
    grow(acc, max_rows * head_dim);
    grow(merged_m, max_rows);
    grow(merged_l, max_rows);
    grow(merged_acc, max_rows * head_dim);
  }
  std::vector<const float*> k_rows, v_rows;  // [kKvChunk] the chunk's positions
  std::vector<float> scores;                 // [rows, kKvChunk] scores, then probabilities
  std::vector<int64_t> first, last;          // [rows] the chunk's positions row r sees
  std::vector<const float*> q;
  std::vector<int64_t> pos, kv_offset;
  std::vector<float> m, l, acc;
  std::vector<float> merged_m, merged_l, merged_acc;  // prefill: partitions folded so far
};

// The passes over one chunk of n positions below walk it four positions at a time and, for each
// quad, every row: with a work item spanning several KV heads, a quad's K or V rows for all of
// them are one contiguous run of the cache, which the hardware prefetcher can follow (row by row,
// each head would read Dh floats out of every Hk * Dh and stall on memory). Row r sees the
// chunk's positions [first[r], last[r]); masked positions are neither read nor computed.

// scores[r, j] = scale * q[r] . k(j) for every position j row r sees.
void ScoreChunk(const QueryRows& rows, const float* const* k, int64_t n, int64_t dh, float scale,
                Scratch& s) {
  for (int64_t j = 0; j < n; j += 4) {
    const int64_t quad_end = std::min(n, j + 4);
    for (int64_t r = 0; r < rows.rows; ++r) {
      const int64_t a = std::max(j, s.first[r]), b = std::min(quad_end, s.last[r]);
      if (a >= b) continue;
      float* sr = s.scores.data() + r * kKvChunk;
      const float* q = rows.q[r];
      const int64_t off = rows.kv_offset[r];
      if (b - a == 4) {
        Dot4(q, k[a] + off, k[a + 1] + off, k[a + 2] + off, k[a + 3] + off, dh, scale, sr + a);
      } else {
        for (int64_t x = a; x < b; ++x) sr[x] = Dot(q, k[x] + off, dh) * scale;
      }
    }
  }
}

// The online-softmax step of row r: folds its chunk scores into (m, l), rescales acc to the new
// max and turns the scores into the probabilities exp(score - m) that AccumulateChunk applies.
void SoftmaxStep(const QueryRows& rows, int64_t r, int64_t dh, Scratch& s) {
  const int64_t a = s.first[r], b = s.last[r];
  if (a >= b) return;
  float* sr = s.scores.data() + r * kKvChunk;
  float chunk_max = kNegInf;
  for (int64_t j = a; j < b; ++j) chunk_max = std::max(chunk_max, sr[j]);
  float& m = rows.m[r];
  const float m_new = std::max(m, chunk_max);
  float sum = 0.0f;
  int64_t j = a;
#if CLEAVE_CPU_AVX2
  // The exponentials are a third of a small-head-dim decode step; 8 lanes at a time (~2 ulp).
  const __m256 vmax = _mm256_set1_ps(m_new);
  __m256 vsum = _mm256_setzero_ps();
  for (; j + 8 <= b; j += 8) {
    const __m256 e = cpu::Exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), vmax));
    _mm256_storeu_ps(sr + j, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  sum = cpu::HSum(vsum);
#endif
  for (; j < b; ++j) {
    sr[j] = std::exp(sr[j] - m_new);
    sum += sr[j];
  }
  // The first chunk a row sees has m == -inf, so alpha == 0 and the (zero) state is reset.
  const float alpha = std::exp(m - m_new);
  if (alpha != 1.0f) ScaleRow(rows.acc + r * dh, alpha, dh);
  rows.l[r] = rows.l[r] * alpha + sum;
  m = m_new;
}

// acc[r] += sum_j p[r, j] * v(j) over the positions row r sees.
void AccumulateChunk(const QueryRows& rows, const float* const* v, int64_t n, int64_t dh,
                     Scratch& s) {
  for (int64_t j = 0; j < n; j += 4) {
    const int64_t quad_end = std::min(n, j + 4);
    for (int64_t r = 0; r < rows.rows; ++r) {
      const int64_t a = std::max(j, s.first[r]), b = std::min(quad_end, s.last[r]);
      if (a >= b) continue;
      const float* pr = s.scores.data() + r * kKvChunk;
      const int64_t off = rows.kv_offset[r];
      float* acc = rows.acc + r * dh;
      if (b - a == 4) {
        Axpy4(pr + a, v[a] + off, v[a + 1] + off, v[a + 2] + off, v[a + 3] + off, dh, acc);
      } else {
        for (int64_t x = a; x < b; ++x) Axpy(pr[x], v[x] + off, dh, acc);
      }
    }
  }
}

// Attends every row of `rows` to the positions in [lo, hi) it may see: p <= pos[r] (causal) and,
// with a window, p > pos[r] - window. Rows outside a chunk's reach skip it without reading it.
// Chunks are [c, c + kKvChunk) for c a multiple of kKvChunk (clipped to [lo, hi)), so a row meets
// the same chunks, quads and masks whatever range a caller hands in, as long as the range covers
// what the row sees of it. Out of line: one copy of the arithmetic for both kernels.
__attribute__((noinline)) void AttendRange(const KvSeqView& kv, int64_t lo, int64_t hi,
                                           int64_t window, int64_t dh, float scale,
                                           const QueryRows& rows, Scratch& s) {
  for (int64_t c0 = lo / kKvChunk * kKvChunk; c0 < hi; c0 += kKvChunk) {
    const int64_t c1 = std::min(hi, c0 + kKvChunk);
    // Positions before lo are seen by no row (and may sit in unchecked blocks): never touched.
    for (int64_t p = std::max(c0, lo); p < c1; ++p) {
      const int64_t offset =
          kv.blocks[p / kv.block_size] * kv.block_stride + (p % kv.block_size) * kv.position_stride;
      s.k_rows[p - c0] = kv.k + offset;
      s.v_rows[p - c0] = kv.v + offset;
    }
    for (int64_t r = 0; r < rows.rows; ++r) {
      const int64_t first =
          std::max(std::max(c0, lo), window > 0 ? rows.pos[r] - window + 1 : int64_t{0});
      s.first[r] = first - c0;
      s.last[r] = std::max(first, std::min(c1, rows.pos[r] + 1)) - c0;
    }
    ScoreChunk(rows, s.k_rows.data(), c1 - c0, dh, scale, s);
    for (int64_t r = 0; r < rows.rows; ++r) SoftmaxStep(rows, r, dh, s);
    AccumulateChunk(rows, s.v_rows.data(), c1 - c0, dh, s);
  }
}

// Folds one partition's state of a row (m_i, l_i, acc_i: max, sum, unnormalised output, as
// AttendRange leaves them) into the row's running state (m, l, acc) over the partitions before
// it. A partition the row saw nothing of (m_i = -inf) leaves the state as it was, bit for bit; the
// first one it saw is copied. Out of line: decode and prefill fold with the same machine code.
__attribute__((noinline)) void FoldPartition(float m_i, float l_i, const float* acc_i, int64_t dh,
                                             float& m, float& l, float* acc) {
  if (m_i == kNegInf) return;
  if (m == kNegInf) {
    m = m_i;
    l = l_i;
    std::copy(acc_i, acc_i + dh, acc);
    return;
  }
  const float m_new = std::max(m, m_i);
  const float a = std::exp(m - m_new), b = std::exp(m_i - m_new);
  l = l * a + l_i * b;
  for (int64_t d = 0; d < dh; ++d) acc[d] = acc[d] * a + acc_i[d] * b;
  m = m_new;
}

// Partitions [first, last] (indices of kDecodePartition-sized ranges) that [lo, hi) touches.
inline int64_t FirstPartition(int64_t lo) { return lo / kDecodePartition; }
inline int64_t LastPartition(int64_t hi) { return (hi - 1) / kDecodePartition; }

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
// Below kMinParallelMacs multiply-adds the whole op takes about as long as waking a worker, so
// it runs on the caller's thread (a small model's decode step would otherwise pay a pool
// round-trip per layer).
constexpr int64_t kMinParallelMacs = int64_t{1} << 17;

// Upper bound on the score and value multiply-adds of a pass: every query against its whole
// sequence (or window).
int64_t EstimateMacs(const AttentionPlan& p) {
  int64_t macs = 0;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t visible = p.window > 0 ? std::min<int64_t>(p.window + p.q_len(b), p.seq_lens[b])
                                         : int64_t{p.seq_lens[b]};
    macs += p.q_len(b) * visible;
  }
  return macs * p.num_q_heads * p.head_dim * 2;
}

template <typename Body>
void RunItems(int64_t n, int64_t max_rows, int64_t head_dim, int64_t macs, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = macs < kMinParallelMacs ? 1 : std::min<int64_t>(n, cpu::PoolThreads());
  cpu::ParallelFor(workers, 1, [&](int64_t, int64_t) {
    thread_local Scratch scratch;
    scratch.Reserve(max_rows, head_dim);
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
  QueryRows rows{(tile.last_token - tile.first_token) * g,
                 s.q.data(),
                 s.pos.data(),
                 s.kv_offset.data(),
                 s.m.data(),
                 s.l.data(),
                 s.acc.data()};
  for (int64_t t = tile.first_token; t < tile.last_token; ++t) {
    for (int64_t i = 0; i < g; ++i) {
      const int64_t r = (t - tile.first_token) * g + i;
      s.q[r] = p.q + (row0 + t) * p.q_token_stride + (tile.kv_head * g + i) * p.q_head_stride;
      s.pos[r] = start_pos + t;
      s.kv_offset[r] = tile.kv_head * dh;
    }
  }
  // Partition by partition, as decode splits the same positions; a tile within one partition
  // (every tile of a context up to kDecodePartition) needs no folding.
  const KvSeqView kv = MakeKvSeqView(p, tile.seq);
  const int64_t lo = p.first_visible(start_pos + tile.first_token);
  const int64_t hi = start_pos + tile.last_token;
  const int64_t first_part = FirstPartition(lo), last_part = LastPartition(hi);
  const float* l = rows.l;
  const float* acc = rows.acc;
  if (first_part < last_part) {
    std::fill(s.merged_m.begin(), s.merged_m.begin() + rows.rows, kNegInf);
    std::fill(s.merged_l.begin(), s.merged_l.begin() + rows.rows, 0.0f);
    std::fill(s.merged_acc.begin(), s.merged_acc.begin() + rows.rows * dh, 0.0f);
    l = s.merged_l.data();
    acc = s.merged_acc.data();
  }
  for (int64_t part = first_part; part <= last_part; ++part) {
    ResetState(rows, dh);
    AttendRange(kv, std::max(lo, part * kDecodePartition),
                std::min(hi, (part + 1) * kDecodePartition), p.window, dh, p.scale, rows, s);
    if (first_part == last_part) break;
    for (int64_t r = 0; r < rows.rows; ++r) {
      FoldPartition(rows.m[r], rows.l[r], rows.acc + r * dh, dh, s.merged_m[r], s.merged_l[r],
                    s.merged_acc.data() + r * dh);
    }
  }
  for (int64_t r = 0; r < rows.rows; ++r) {
    const int64_t t = tile.first_token + r / g, head = tile.kv_head * g + r % g;
    WriteNormalised(acc + r * dh, l[r], dh,
                    p.out + (row0 + t) * p.out_token_stride + head * p.out_head_stride);
  }
}

// ---------------------------------------------------------------------------------------------
// Decode.

struct DecodeSplit {
  std::vector<int64_t> first_part;  // [B] first partition of sequence b's visible KV range
  std::vector<int64_t> parts;       // [B] partitions of sequence b's visible KV range
  std::vector<int64_t> state_base;  // [B] first partial-state slot of b (used when parts > 1)
  int64_t num_states = 0;           // partial-state slots in all, each holding Hq heads
};

// The visible range of a decode query at position seq_len - 1, cut at multiples of
// kDecodePartition (the same cuts prefill folds). Sequences with one partition write `out`
// directly and need no partial state.
DecodeSplit SplitDecode(const AttentionPlan& p) {
  DecodeSplit split;
  split.first_part.resize(p.num_seqs);
  split.parts.resize(p.num_seqs);
  split.state_base.resize(p.num_seqs);
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    const int64_t hi = p.seq_lens[b], lo = p.first_visible(hi - 1);
    split.first_part[b] = FirstPartition(lo);
    split.parts[b] = LastPartition(hi) - split.first_part[b] + 1;
    split.state_base[b] = split.num_states;
    if (split.parts[b] > 1) split.num_states += split.parts[b];
  }
  return split;
}

// Partial states of every split sequence: slot (state_base[b] + part) holds Hq heads.
struct PartialStates {
  std::vector<float> m, l, acc;  // [num_states * Hq], same, [num_states * Hq * Dh]
};

// Folds the partitions of one head of a split sequence in position order (as a prefill tile does)
// and writes the normalised output.
void MergePartitions(const AttentionPlan& p, const PartialStates& st, int64_t first_slot,
                     int64_t parts, int64_t head, float* merged_acc, float* out) {
  const int64_t dh = p.head_dim;
  float m = kNegInf, l = 0.0f;
  std::fill(merged_acc, merged_acc + dh, 0.0f);
  for (int64_t i = 0; i < parts; ++i) {
    const int64_t idx = (first_slot + i) * p.num_q_heads + head;
    FoldPartition(st.m[idx], st.l[idx], st.acc.data() + idx * dh, dh, m, l, merged_acc);
  }
  WriteNormalised(merged_acc, l, dh, out);
}

// One decode work item: KV heads [first_head, last_head) of one partition of one sequence.
struct DecodeItem {
  int32_t seq, part, first_head, last_head;
};

// Walking every KV head of a position together reads its Hk * Dh floats in one run (the cache
// interleaves heads per position); one head alone would touch Dh floats out of each and a new
// page every few positions. So an item takes as many heads as still leaves enough items to
// keep every worker busy. Each head's arithmetic is the same whichever item runs it, so this
// choice, unlike the partition size, cannot change a result.
std::vector<DecodeItem> MakeDecodeItems(const AttentionPlan& p, const DecodeSplit& split) {
  int64_t partitions = 0;
  for (int64_t parts : split.parts) partitions += parts;
  const int64_t wanted_items = 4 * static_cast<int64_t>(cpu::PoolThreads());
  const int64_t head_groups = std::clamp<int64_t>(
      (wanted_items + partitions - 1) / std::max<int64_t>(partitions, 1), 1, p.num_kv_heads);
  const int64_t heads_per_item = (p.num_kv_heads + head_groups - 1) / head_groups;
  std::vector<DecodeItem> items;
  for (int64_t b = 0; b < p.num_seqs; ++b) {
    for (int64_t part = 0; part < split.parts[b]; ++part) {
      for (int64_t h = 0; h < p.num_kv_heads; h += heads_per_item) {
        const int64_t h1 = std::min(p.num_kv_heads, h + heads_per_item);
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(part),
                         static_cast<int32_t>(h), static_cast<int32_t>(h1)});
      }
    }
  }
  return items;
}

void RunDecodeItem(const AttentionPlan& p, const DecodeSplit& split, PartialStates& st,
                   const DecodeItem& item, Scratch& s) {
  const int64_t dh = p.head_dim, g = p.group, seq = item.seq;
  const int64_t pos = p.seq_lens[seq] - 1;
  const int64_t part = split.first_part[seq] + item.part;
  const int64_t lo = std::max(p.first_visible(pos), part * kDecodePartition);
  const int64_t hi = std::min<int64_t>(p.seq_lens[seq], (part + 1) * kDecodePartition);
  const int64_t first_q_head = item.first_head * g;
  const int64_t num_rows = (item.last_head - item.first_head) * g;
  const bool split_seq = split.parts[seq] > 1;
  QueryRows rows{num_rows,   s.q.data(), s.pos.data(), s.kv_offset.data(),
                 s.m.data(), s.l.data(), s.acc.data()};
  if (split_seq) {  // accumulate straight into this partition's slots of the partial state
    const int64_t idx = (split.state_base[seq] + item.part) * p.num_q_heads + first_q_head;
    rows.m = st.m.data() + idx;
    rows.l = st.l.data() + idx;
    rows.acc = st.acc.data() + idx * dh;
  }
  for (int64_t r = 0; r < num_rows; ++r) {
    s.q[r] = p.q + seq * p.q_token_stride + (first_q_head + r) * p.q_head_stride;
    s.pos[r] = pos;
    s.kv_offset[r] = (first_q_head + r) / g * dh;
  }
  ResetState(rows, dh);
  AttendRange(MakeKvSeqView(p, seq), lo, hi, p.window, dh, p.scale, rows, s);
  if (split_seq) return;
  for (int64_t r = 0; r < num_rows; ++r) {
    WriteNormalised(rows.acc + r * dh, rows.l[r], dh,
                    p.out + seq * p.out_token_stride + (first_q_head + r) * p.out_head_stride);
  }
}

}  // namespace

absl::Status WriteKvCache(const Tensor& k, const Tensor& v, const Tensor& slot_mapping,
                          Tensor& k_cache, Tensor& v_cache, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!k_cache.device().is_cpu()) return cuda::WriteKvCache(k, v, slot_mapping, k_cache, v_cache, stream);
#endif
  constexpr const char* kOp = "WriteKvCache";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "k", k, DType::kF32, {kAny, kAny, kAny}));
  CLEAVE_RETURN_IF_ERROR(CheckNonNegative(kOp, "k", k));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "k", k));
  const int64_t num_tokens = k.dim(0), hk = k.dim(1), dh = k.dim(2);
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "v", v, DType::kF32, {num_tokens, hk, dh}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "v", v));
  CLEAVE_RETURN_IF_ERROR(CheckIndex(kOp, "slot_mapping", slot_mapping, {num_tokens}));
  CLEAVE_RETURN_IF_ERROR(CheckCaches(kOp, k_cache, v_cache));
  if (hk != k_cache.dim(2) || dh != k_cache.dim(3)) {
    return cpu::ArgError(kOp, "k", k,
                         absl::StrCat("must be [T, Hk, Dh] of k_cache ", k_cache.DebugString()));
  }
  // The cache is written only once every slot is known to be inside it.
  const int32_t* slots = slot_mapping.data_as<const int32_t>();
  const int64_t num_slots = k_cache.dim(0) * k_cache.dim(1);
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (slots[t] >= num_slots) {
      return OpError(kOp, absl::StrCat("slot_mapping[", t, "] = ", slots[t],
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
#if CLEAVE_WITH_CUDA
  if (!args.out.device().is_cpu()) return cuda::PagedAttentionPrefill(args, stream);
#endif
  CLEAVE_ASSIGN_OR_RETURN(const AttentionPlan p,
                          PlanAttention("PagedAttentionPrefill", args, stream, /*decode=*/false));
  const int64_t tile_tokens = std::max<int64_t>(1, kTileRows / p.group);
  const std::vector<PrefillTile> tiles = MakePrefillTiles(p, tile_tokens);
  RunItems(static_cast<int64_t>(tiles.size()), tile_tokens * p.group, p.head_dim, EstimateMacs(p),
           [&](int64_t i, Scratch& s) { RunPrefillTile(p, tiles[i], s); });
  return absl::OkStatus();
}

absl::Status PagedAttentionDecode(const PagedAttentionArgs& args, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!args.out.device().is_cpu()) return cuda::PagedAttentionDecode(args, stream);
#endif
  CLEAVE_ASSIGN_OR_RETURN(const AttentionPlan p,
                          PlanAttention("PagedAttentionDecode", args, stream, /*decode=*/true));
  const DecodeSplit split = SplitDecode(p);
  PartialStates st;
  st.m.resize(split.num_states * p.num_q_heads);
  st.l.resize(split.num_states * p.num_q_heads);
  st.acc.resize(split.num_states * p.num_q_heads * p.head_dim);

  // Partitions of one sequence run in parallel, which is what keeps a small batch with a long
  // context busy on every core.
  const std::vector<DecodeItem> items = MakeDecodeItems(p, split);
  RunItems(static_cast<int64_t>(items.size()), p.num_q_heads, p.head_dim, EstimateMacs(p),
           [&](int64_t i, Scratch& s) { RunDecodeItem(p, split, st, items[i], s); });
  if (split.num_states == 0) return absl::OkStatus();

  cpu::ParallelFor(p.num_seqs * p.num_q_heads, 8, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> merged;
    if (static_cast<int64_t>(merged.size()) < p.head_dim) merged.resize(p.head_dim);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.num_q_heads, head = i % p.num_q_heads;
      if (split.parts[b] <= 1) continue;
      MergePartitions(p, st, split.state_base[b], split.parts[b], head, merged.data(),
                      p.out + b * p.out_token_stride + head * p.out_head_stride);
    }
  });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
