// CPU backend of ssm.h: Mamba's causal depthwise conv1d and selective scan over a packed varlen
// batch, each sequence with its own state slot.
//
// Channels are independent in both ops, so work items split a batch by (sequence, channel block):
//   scan: (sequence, kScanBlock channels), all of the sequence's tokens (the recurrence runs
//         through them); time is walked in chunks of kTimeChunk tokens: softplus(dt) for the
//         chunk first (vectorised), then one 8-channel group at a time down the chunk with its N
//         state vectors held locally, re-reading the chunk's B / C rows from L1 for each group.
//   conv: (sequence, chunk of kConvChunk tokens, kConvBlock channels); see ConvItem.
// An item owns its rows of `out` and its channels of the slot outright: no two items write the
// same memory and nothing is reduced across items. Inside an item the arithmetic runs on
// 8-channel vectors (F8) whose lanes never mix; a block's partial last vector is zero-padded and
// runs the very same operations. So a channel's result depends only on its own sequence - not on
// the batch, the blocks, the chunks, the thread or the order of items (batch invariance, bitwise)
// - and a decode step runs the same code as a one-token prefill, so prefill in any chunking and
// token-by-token decode give bitwise the same outputs and states.
//
// Items go to the pool dynamically, longest sequences first, in grabs of roughly equal work, so a
// long prefill next to many one-token decodes does not leave threads idle; decode items are dealt
// block-major so that consecutive items reuse their block's transposed weights.
//
// Every index (query_start_loc, slots) is checked, and copied, before any memory is written: a bad
// batch fails with InvalidArgument and leaves `out` and the state pools untouched.
#include "cleave/kernels/ssm.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "check.h"
#include "cleave/common/status.h"
#include "parallel.h"
#include "simd.h"

namespace cleave::kernels {
namespace {

constexpr int64_t kAny = cpu::kAnyDim;

// Channels per scan item: 8 vectors. Small enough that a one-sequence prefill of a 1536-channel
// layer still splits into 24 items, large enough that a decode item amortises its set-up.
constexpr int64_t kScanBlock = 64;
// Tokens per scan chunk: the chunk's softplus(dt) for one block is 16 KiB and its B / C rows
// (N = 16) 8 KiB, both L1-resident while the block's 8 groups walk the chunk.
constexpr int64_t kTimeChunk = 64;
// Largest state dimension N: the scan keeps a group's N state vectors in a local array.
constexpr int64_t kMaxStateDim = 256;

// ---------------------------------------------------------------------------------------------
// 8-lane helpers. GCC/Clang vector types: one AVX2 register with -march=x86-64-v3, two SSE
// registers otherwise. Helpers take and return F8 by reference: passing a 32-byte vector by
// value changes the ABI when AVX is off, which -Wpsabi rejects.

typedef float F8 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 8;

inline void Load8(F8& v, const float* p) { std::memcpy(&v, p, sizeof(F8)); }
inline void Store8(float* p, const F8& v) { std::memcpy(p, &v, sizeof(F8)); }

// The first n (<= 8) lanes from p, the rest zero.
inline void LoadLanes(F8& v, const float* p, int64_t n) {
  if (n == kLanes) {
    Load8(v, p);
    return;
  }
  v = F8{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
}

inline void StoreLanes(float* p, const F8& v, int64_t n) {
  if (n == kLanes) {
    Store8(p, v);
    return;
  }
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}

inline void Broadcast(F8& v, float x) { v = F8{} + x; }

// exp on 8 lanes (cpu::Exp8, within ~2 ulp of std::exp; exactly 0 below ln(FLT_MIN)).
inline void ExpF8(const F8& x, F8& out) {
#if CLEAVE_CPU_AVX2
  const __m256 r = cpu::Exp8(reinterpret_cast<const __m256&>(x));
  std::memcpy(&out, &r, sizeof(F8));
#else
  for (int i = 0; i < kLanes; ++i) out[i] = std::exp(x[i]);
#endif
}

#if CLEAVE_CPU_AVX2
// log(x) on 8 lanes for finite x >= FLT_MIN: Cephes' logf (mantissa in [sqrt(1/2), sqrt(2)),
// degree-8 polynomial, ln 2 split in two constants), within ~2 ulp of std::log.
inline __m256 Log8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 e = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(x), 23), _mm256_set1_epi32(126)));
  x = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(~0x7f800000)));
  x = _mm256_or_ps(x, _mm256_set1_ps(0.5f));  // mantissa in [0.5, 1)
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  const __m256 tmp = _mm256_and_ps(x, small);
  x = _mm256_sub_ps(x, one);
  e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
  x = _mm256_add_ps(x, tmp);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  x = _mm256_add_ps(x, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), x);
}
#endif

// torch's softplus (beta 1, threshold 20): x > 20 ? x : log1p(exp(x)). log1p(e) is taken as
// log(u) - ((u - 1) - e) / u with u = 1 + e, which corrects the rounding of 1 + e (and gives e
// itself when u rounds to 1).
inline void SoftplusF8(const F8& x, F8& out) {
#if CLEAVE_CPU_AVX2
  const __m256 v = reinterpret_cast<const __m256&>(x);
  const __m256 one = _mm256_set1_ps(1.0f);
  // min returns its second operand for NaN: v second, so NaN propagates.
  const __m256 e = cpu::Exp8(_mm256_min_ps(_mm256_set1_ps(20.0f), v));
  const __m256 u = _mm256_add_ps(one, e);
  const __m256 err = _mm256_div_ps(_mm256_sub_ps(_mm256_sub_ps(u, one), e), u);
  const __m256 lp = _mm256_sub_ps(Log8(u), err);
  const __m256 r = _mm256_blendv_ps(lp, v, _mm256_cmp_ps(v, _mm256_set1_ps(20.0f), _CMP_GT_OQ));
  std::memcpy(&out, &r, sizeof(F8));
#else
  for (int i = 0; i < kLanes; ++i) out[i] = x[i] > 20.0f ? x[i] : std::log1p(std::exp(x[i]));
#endif
}

// x * sigmoid(x) as torch computes it: x / (1 + exp(-x)).
inline void SiluF8(const F8& x, F8& out) {
  F8 e;
  ExpF8(-x, e);
  out = x / (1.0f + e);
}

// dst[j * 8 + i] = src[i * src_stride + j] for i < lanes, j < n; lanes >= `lanes` are zero.
// Turns `lanes` channel rows of n entries (A, a state slot) into n 8-channel vectors.
void GatherColumns(const float* src, int64_t src_stride, int64_t lanes, int64_t n, float* dst) {
  int64_t j = 0;
#if CLEAVE_CPU_AVX2
  if (lanes == kLanes) {
    for (; j + 8 <= n; j += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride + j);
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
      const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
      const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
      const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
      float* d = dst + j * kLanes;
      _mm256_storeu_ps(d + 0 * kLanes, _mm256_permute2f128_ps(s0, s4, 0x20));
      _mm256_storeu_ps(d + 1 * kLanes, _mm256_permute2f128_ps(s1, s5, 0x20));
      _mm256_storeu_ps(d + 2 * kLanes, _mm256_permute2f128_ps(s2, s6, 0x20));
      _mm256_storeu_ps(d + 3 * kLanes, _mm256_permute2f128_ps(s3, s7, 0x20));
      _mm256_storeu_ps(d + 4 * kLanes, _mm256_permute2f128_ps(s0, s4, 0x31));
      _mm256_storeu_ps(d + 5 * kLanes, _mm256_permute2f128_ps(s1, s5, 0x31));
      _mm256_storeu_ps(d + 6 * kLanes, _mm256_permute2f128_ps(s2, s6, 0x31));
      _mm256_storeu_ps(d + 7 * kLanes, _mm256_permute2f128_ps(s3, s7, 0x31));
    }
  }
#endif
  for (; j < n; ++j) {
    float* d = dst + j * kLanes;
    for (int64_t i = 0; i < kLanes; ++i) d[i] = i < lanes ? src[i * src_stride + j] : 0.0f;
  }
}

// The inverse for the first `lanes` lanes: dst[i * dst_stride + j] = src[j * 8 + i].
void ScatterColumns(const float* src, int64_t lanes, int64_t n, float* dst, int64_t dst_stride) {
  int64_t j = 0;
#if CLEAVE_CPU_AVX2
  if (lanes == kLanes) {
    for (; j + 8 <= n; j += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + (j + i) * kLanes);
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
      const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
      const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
      const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
      _mm256_storeu_ps(dst + 0 * dst_stride + j, _mm256_permute2f128_ps(s0, s4, 0x20));
      _mm256_storeu_ps(dst + 1 * dst_stride + j, _mm256_permute2f128_ps(s1, s5, 0x20));
      _mm256_storeu_ps(dst + 2 * dst_stride + j, _mm256_permute2f128_ps(s2, s6, 0x20));
      _mm256_storeu_ps(dst + 3 * dst_stride + j, _mm256_permute2f128_ps(s3, s7, 0x20));
      _mm256_storeu_ps(dst + 4 * dst_stride + j, _mm256_permute2f128_ps(s0, s4, 0x31));
      _mm256_storeu_ps(dst + 5 * dst_stride + j, _mm256_permute2f128_ps(s1, s5, 0x31));
      _mm256_storeu_ps(dst + 6 * dst_stride + j, _mm256_permute2f128_ps(s2, s6, 0x31));
      _mm256_storeu_ps(dst + 7 * dst_stride + j, _mm256_permute2f128_ps(s3, s7, 0x31));
    }
  }
#endif
  for (; j < n; ++j) {
    for (int64_t i = 0; i < lanes; ++i) dst[i * dst_stride + j] = src[j * kLanes + i];
  }
}

// ---------------------------------------------------------------------------------------------
// Validation. Messages follow check.h: "<op>: <argument> <DebugString()> <problem>".

absl::Status OpError(const char* op, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", problem));
}

// An f32 operand read row by row: [rows, cols] with packed rows (any row stride).
absl::Status CheckRows(const char* op, const char* name, const Tensor& t, int64_t rows,
                       int64_t cols) {
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(op, name, t, DType::kF32, {rows, cols}));
  return cpu::CheckUnitInnerStride(op, name, t);
}

// An optional f32 [c] vector: empty means "none".
absl::Status CheckOptionalVector(const char* op, const char* name, const Tensor& t, int64_t c) {
  if (t.empty()) return absl::OkStatus();
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(op, name, t, DType::kF32, {c}));
  return cpu::CheckUnitInnerStride(op, name, t);
}

absl::Status CheckIndex(const char* op, const char* name, const Tensor& t, int64_t n) {
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(op, name, t, DType::kI32, {n}));
  return cpu::CheckContiguous(op, name, t);
}

// [first, last) bytes spanned by t's elements; empty for a tensor without elements.
struct ByteSpan {
  uintptr_t first = 0, last = 0;
};

ByteSpan SpanOf(const Tensor& t) {
  if (t.empty() || t.numel() == 0) return {};
  int64_t extent = 1;
  for (int i = 0; i < t.ndim(); ++i) extent += (t.dim(i) - 1) * t.stride(i);
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.data());
  return {first, first + static_cast<uintptr_t>(extent) * DTypeSize(t.dtype())};
}

// A tensor the kernel writes (`out`, a state pool) must not share memory with anything else it
// touches: items would read values other items have already overwritten.
using NamedTensors = std::vector<std::pair<const char*, const Tensor*>>;

absl::Status CheckNoOverlap(const char* op, const char* name, const Tensor& written,
                            const NamedTensors& others) {
  const ByteSpan w = SpanOf(written);
  if (w.first == w.last) return absl::OkStatus();
  for (const auto& [other_name, other] : others) {
    const ByteSpan o = SpanOf(*other);
    if (o.first < w.last && w.first < o.last) {
      return cpu::ArgError(op, name, written,
                           absl::StrCat("overlaps ", other_name, " ", other->DebugString()));
    }
  }
  return absl::OkStatus();
}

// One sequence of the batch, as the kernels walk it (copied out of the index tensors, so writes
// to `out` or the pools cannot change the plan halfway).
struct SeqWork {
  int64_t start = 0;  // first row in [T, ...]
  int64_t len = 0;    // rows
  int64_t slot = 0;   // validated: in [0, num_slots), distinct within the batch
  bool has_initial_state = false;
};

// query_start_loc partitions [0, T) in order; slots are in range and distinct (two sequences on
// one slot would race on its state); has_initial_state is 0 or 1. Returns the sequences longest
// first, which is the order their work is dealt out in.
absl::StatusOr<std::vector<SeqWork>> ReadSequences(const char* op, const SsmSequences& s,
                                                   int64_t num_tokens, int64_t num_slots) {
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "query_start_loc", s.query_start_loc, kAny));
  if (s.query_start_loc.dim(0) < 1) {
    return cpu::ArgError(op, "query_start_loc", s.query_start_loc, "must have shape [B + 1]");
  }
  const int64_t b = s.query_start_loc.dim(0) - 1;
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "state_slots", s.state_slots, b));
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "has_initial_state", s.has_initial_state, b));
  const int32_t* qsl = s.query_start_loc.data_as<const int32_t>();
  const int32_t* slots = s.state_slots.data_as<const int32_t>();
  const int32_t* init = s.has_initial_state.data_as<const int32_t>();
  if (qsl[0] != 0 || qsl[b] != num_tokens) {
    return OpError(op, absl::StrCat("query_start_loc must run from 0 to T = ", num_tokens, ", got ",
                                    qsl[0], " .. ", qsl[b]));
  }
  std::vector<SeqWork> seqs(static_cast<size_t>(b));
  for (int64_t i = 0; i < b; ++i) {
    if (qsl[i + 1] < qsl[i]) {
      return OpError(op, absl::StrCat("query_start_loc decreases at sequence ", i, ": ", qsl[i],
                                      " -> ", qsl[i + 1]));
    }
    if (slots[i] < 0 || slots[i] >= num_slots) {
      return OpError(op, absl::StrCat("state_slots[", i, "] = ", slots[i],
                                      " is outside the pool's ", num_slots, " slots"));
    }
    if (init[i] != 0 && init[i] != 1) {
      return OpError(op, absl::StrCat("has_initial_state[", i, "] = ", init[i], " must be 0 or 1"));
    }
    seqs[i] = {qsl[i], int64_t{qsl[i + 1]} - qsl[i], slots[i], init[i] == 1};
  }
  std::vector<int32_t> sorted(slots, slots + b);
  std::sort(sorted.begin(), sorted.end());
  if (const auto dup = std::adjacent_find(sorted.begin(), sorted.end()); dup != sorted.end()) {
    return OpError(op, absl::StrCat("state slot ", *dup, " is used by two sequences"));
  }
  std::stable_sort(seqs.begin(), seqs.end(),
                   [](const SeqWork& a, const SeqWork& c) { return a.len > c.len; });
  return seqs;
}

// ---------------------------------------------------------------------------------------------
// Scheduling.

// Sequences of at most this many tokens are "short" (decode): their items are dealt block-major,
// so that a thread's consecutive items share a channel block and reuse its set-up (the block's
// weights or A, transposed), which costs about as much as one token of the block.
constexpr int64_t kShortSeq = 4;

// Each call gets its own id, so that per-thread caches of per-block set-up never outlive a call
// (the next call may bring other weights at the same address).
std::atomic<uint64_t> g_next_call_id{1};

// How an op cuts its work into items.
struct ItemShape {
  int64_t block_channels = 0;  // channels per item
  int64_t chunk_tokens = 0;    // tokens per item of a long sequence (> kShortSeq); 0: all of them
  int64_t min_part_work = 0;   // token-channels that make waking another thread worth it
};

// The items of one call, in the order they are dealt: the long sequences' items first, longest
// sequence first (so no long item is left for last), unit by unit; then the short sequences'
// items block-major. Grabs are runs of items of about a quarter of a thread's share (a long item
// stays single), taken by the threads from a shared counter.
struct ItemList {
  struct Unit {  // tokens [t0, t1) of seqs[seq], for every block
    int64_t seq, t0, t1;
  };
  int64_t blocks = 0, block_channels = 0, channels = 0;
  int64_t num_long = 0, num_short = 0;  // seqs[0, num_long) are long
  int64_t long_items = 0, num_items = 0;
  std::vector<Unit> units;
  std::vector<int64_t> cuts;  // grab g is items [cuts[g], cuts[g + 1])
  int64_t threads = 1;
};

ItemList ListItems(const std::vector<SeqWork>& seqs, int64_t channels, const ItemShape& shape) {
  ItemList l;
  l.block_channels = shape.block_channels;
  l.channels = channels;
  l.blocks = (channels + shape.block_channels - 1) / shape.block_channels;
  const int64_t num_seqs = static_cast<int64_t>(seqs.size());
  l.num_long =  // seqs are sorted longest first
      std::find_if(seqs.begin(), seqs.end(), [](const SeqWork& s) { return s.len <= kShortSeq; }) -
      seqs.begin();
  l.num_short = num_seqs - l.num_long;
  for (int64_t i = 0; i < l.num_long; ++i) {
    const int64_t len = seqs[i].len, step = shape.chunk_tokens > 0 ? shape.chunk_tokens : len;
    for (int64_t t0 = 0; t0 < len; t0 += step) l.units.push_back({i, t0, std::min(len, t0 + step)});
  }
  l.long_items = static_cast<int64_t>(l.units.size()) * l.blocks;
  l.num_items = l.long_items + l.num_short * l.blocks;

  // Work in token-channels; an empty sequence still resets or keeps its state: one token.
  const int64_t bc = shape.block_channels;
  int64_t long_work = 0, short_work = 0;
  for (const ItemList::Unit& u : l.units) long_work += (u.t1 - u.t0) * bc * l.blocks;
  for (int64_t i = l.num_long; i < num_seqs; ++i) {
    short_work += std::max<int64_t>(seqs[i].len, 1) * bc * l.blocks;
  }
  const int64_t total = long_work + short_work;
  l.threads = std::min<int64_t>(
      cpu::PoolThreads(), std::max<int64_t>(1, total / std::max<int64_t>(1, shape.min_part_work)));
  const int64_t target = std::max<int64_t>(1, total / (l.threads * 4));

  l.cuts = {0};
  int64_t acc = 0, next_item = 0;
  for (const ItemList::Unit& u : l.units) {
    const int64_t c = (u.t1 - u.t0) * bc;
    for (int64_t left = l.blocks; left > 0;) {
      const int64_t take = std::min(left, std::max<int64_t>(1, (target - acc + c - 1) / c));
      acc += take * c;
      next_item += take;
      left -= take;
      if (acc >= target) {
        l.cuts.push_back(next_item);
        acc = 0;
      }
    }
  }
  if (l.cuts.back() != l.long_items) l.cuts.push_back(l.long_items);
  if (l.num_short > 0) {  // short items cost about the same: cut by count
    const int64_t per_grab =
        std::max<int64_t>(1, target * (l.num_items - l.long_items) / short_work);
    for (int64_t i = l.long_items; i < l.num_items; i += per_grab) {
      l.cuts.push_back(std::min(l.num_items, i + per_grab));
    }
  }
  return l;
}

// Runs item(seq, t0, t1, c0, c1) over every sequence's tokens [t0, t1) (relative to its start)
// and channels [c0, c1), on the pool; returns when all are done.
template <typename ItemFn>
void ForEachItem(const std::vector<SeqWork>& seqs, int64_t channels, const ItemShape& shape,
                 const ItemFn& item) {
  if (seqs.empty() || channels == 0) return;
  const ItemList l = ListItems(seqs, channels, shape);
  const auto run_item = [&](int64_t i) {
    if (i < l.long_items) {
      const ItemList::Unit& u = l.units[i / l.blocks];
      const int64_t c0 = (i % l.blocks) * l.block_channels;
      item(seqs[u.seq], u.t0, u.t1, c0, std::min(channels, c0 + l.block_channels));
    } else {
      const SeqWork& s = seqs[l.num_long + (i - l.long_items) % l.num_short];
      const int64_t c0 = (i - l.long_items) / l.num_short * l.block_channels;
      item(s, int64_t{0}, s.len, c0, std::min(channels, c0 + l.block_channels));
    }
  };
  const int64_t grabs = static_cast<int64_t>(l.cuts.size()) - 1;
  const auto run_grab = [&](int64_t g) {
    for (int64_t i = l.cuts[g]; i < l.cuts[g + 1]; ++i) run_item(i);
  };
  const int64_t parts = std::min(l.threads, grabs);
  if (parts <= 1) {
    for (int64_t g = 0; g < grabs; ++g) run_grab(g);
    return;
  }
  std::atomic<int64_t> next{0};
  cpu::ParallelFor(parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t g; (g = next.fetch_add(1, std::memory_order_relaxed)) < grabs;) run_grab(g);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Causal conv1d.

struct ConvPlan {
  int64_t channels = 0;  // C
  int64_t width = 0;     // K
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* weight = nullptr;  // [C, K], rows ldw apart
  int64_t ldw = 0;
  const float* bias = nullptr;  // [C] or null
  float* state = nullptr;       // [num_slots, C, K - 1], contiguous
  float* out = nullptr;         // [T, C], rows ldo apart
  int64_t ldo = 0;
  bool silu = true;
  uint64_t call_id = 0;
};

// The conv state of 8 channels is [8][K - 1] in the slot but [K - 1][8 lanes] in the kernel.
// K = 4 (every Mamba / Jamba checkpoint) has a shuffle path for full vectors; other widths and a
// block's partial last vector go element by element.
#if CLEAVE_CPU_AVX2
// Lane k of output i is element 3k + i of the 24 floats v0 | v1 | v2: it lies in v[(p - i) % 3]
// at position p = (3k + i) % 8, so two blends gather each output's elements in place and one
// permute puts them in order.
inline void Deinterleave3(const float* src, __m256* out) {
  const __m256 v0 = _mm256_loadu_ps(src), v1 = _mm256_loadu_ps(src + 8);
  const __m256 v2 = _mm256_loadu_ps(src + 16);
  out[0] = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x92), v2, 0x24),
                                    _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  out[1] = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x24), v2, 0x49),
                                    _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6));
  out[2] = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x49), v2, 0x92),
                                    _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
}

// The inverse: element 3k + i of dst is lane k of in[i].
inline void Interleave3(const __m256* in, float* dst) {
  const __m256 q0 = _mm256_permutevar8x32_ps(in[0], _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  const __m256 q1 = _mm256_permutevar8x32_ps(in[1], _mm256_setr_epi32(5, 0, 3, 6, 1, 4, 7, 2));
  const __m256 q2 = _mm256_permutevar8x32_ps(in[2], _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  _mm256_storeu_ps(dst, _mm256_blend_ps(_mm256_blend_ps(q0, q1, 0x92), q2, 0x24));
  _mm256_storeu_ps(dst + 8, _mm256_blend_ps(_mm256_blend_ps(q0, q1, 0x24), q2, 0x49));
  _mm256_storeu_ps(dst + 16, _mm256_blend_ps(_mm256_blend_ps(q0, q1, 0x49), q2, 0x92));
}
#endif

// dst[i * dst_stride + c] = src[c * hist + i] for c < lanes, i < hist.
inline void LoadHistory(const float* src, int64_t hist, int64_t lanes, float* dst,
                        int64_t dst_stride) {
#if CLEAVE_CPU_AVX2
  if (hist == 3 && lanes == kLanes) {
    __m256 v[3];
    Deinterleave3(src, v);
    for (int i = 0; i < 3; ++i) _mm256_storeu_ps(dst + i * dst_stride, v[i]);
    return;
  }
#endif
  for (int64_t i = 0; i < hist; ++i) {
    for (int64_t c = 0; c < lanes; ++c) dst[i * dst_stride + c] = src[c * hist + i];
  }
}

// dst[i * dst_stride + c] = w[c * ldw + i] for c < lanes, i < k: the weights of `lanes` channels
// as K vectors. K = 4 with packed rows and full vectors is two rounds of unpacks / shuffles
// (which leave channel order 0 2 4 6 1 3 5 7) and one permute.
inline void LoadWeights(const float* w, int64_t ldw, int64_t k, int64_t lanes, float* dst,
                        int64_t dst_stride) {
#if CLEAVE_CPU_AVX2
  if (k == 4 && ldw == 4 && lanes == kLanes) {
    const __m256 r0 = _mm256_loadu_ps(w), r1 = _mm256_loadu_ps(w + 8);
    const __m256 r2 = _mm256_loadu_ps(w + 16), r3 = _mm256_loadu_ps(w + 24);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256 taps[4] = {_mm256_shuffle_ps(t0, t2, 0x44), _mm256_shuffle_ps(t0, t2, 0xee),
                            _mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xee)};
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(dst + i * dst_stride, _mm256_permutevar8x32_ps(taps[i], order));
    }
    return;
  }
#endif
  for (int64_t c = 0; c < lanes; ++c) {
    for (int64_t i = 0; i < k; ++i) dst[i * dst_stride + c] = w[c * ldw + i];
  }
}

// dst[c * 3 + i] = rows[i][c] for 8 channels.
inline void StoreHistory3(const float* const* rows, float* dst) {
#if CLEAVE_CPU_AVX2
  const __m256 v[3] = {_mm256_loadu_ps(rows[0]), _mm256_loadu_ps(rows[1]),
                       _mm256_loadu_ps(rows[2])};
  Interleave3(v, dst);
#else
  for (int64_t i = 0; i < 3; ++i) {
    for (int64_t c = 0; c < kLanes; ++c) dst[c * 3 + i] = rows[i][c];
  }
#endif
}

// The conv walks rows: an item is (sequence, chunk of kConvChunk tokens, kConvBlock channels), so
// that each token's K input rows are read as 1 KiB runs. Chunks are independent (a chunk finds
// its K - 1 earlier inputs in x) except that only the first reads the slot, so it is also the one
// that writes the new state once it has read the old (chunks hold at least K - 1 tokens, so no
// other chunk needs the slot).
constexpr int64_t kConvBlock = 256;
constexpr int64_t kConvChunk = 64;

// Per-thread buffers, reused across items and calls; they only grow.
struct ConvScratch {
  std::vector<float> weight;       // [K, kConvBlock]: weight[i * kConvBlock + c], zero-padded
  std::vector<float> state;        // [K - 1, kConvBlock]: the old state, oldest first, or zeros
  std::vector<const float*> taps;  // [K]: the input rows of one output row
  uint64_t call_id = 0;            // `weight` holds block c0 of this call's weights
  int64_t c0 = -1;
};

// One output row of `width` channels: out = act(bias + sum_i w[i] * taps[i]), i ascending.
void ConvRow(const float* const* taps, const float* w, int64_t k, const float* bias, int64_t width,
             bool silu, float* out) {
  int64_t g = 0;
  for (; g + kLanes <= width; g += kLanes) {
    F8 acc{}, wv, xv;
    if (bias != nullptr) Load8(acc, bias + g);
    for (int64_t i = 0; i < k; ++i) {
      Load8(wv, w + i * kConvBlock + g);
      Load8(xv, taps[i] + g);
      acc += wv * xv;
    }
    if (silu) SiluF8(acc, acc);
    Store8(out + g, acc);
  }
  if (g == width) return;
  // The partial last vector: zero-padded, the same arithmetic.
  const int64_t lanes = width - g;
  F8 acc{}, wv, xv;
  if (bias != nullptr) LoadLanes(acc, bias + g, lanes);
  for (int64_t i = 0; i < k; ++i) {
    Load8(wv, w + i * kConvBlock + g);
    LoadLanes(xv, taps[i] + g, lanes);
    acc += wv * xv;
  }
  if (silu) SiluF8(acc, acc);
  StoreLanes(out + g, acc, lanes);
}

// Tokens [t0, t1) of one sequence, channels [c0, c1).
void ConvItem(const ConvPlan& p, const SeqWork& s, int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
  if (s.len == 0 && s.has_initial_state) return;  // the slot stays as it is
  thread_local ConvScratch scratch;
  const int64_t k = p.width, hist = k - 1, width = c1 - c0, cb = kConvBlock;
  if (scratch.call_id != p.call_id || scratch.c0 != c0) {
    scratch.weight.assign(static_cast<size_t>(k * cb), 0.0f);
    for (int64_t g = 0; g < width; g += kLanes) {
      LoadWeights(p.weight + (c0 + g) * p.ldw, p.ldw, k, std::min(kLanes, width - g),
                  scratch.weight.data() + g, cb);
    }
    scratch.call_id = p.call_id;
    scratch.c0 = c0;
  }
  scratch.taps.resize(static_cast<size_t>(k));
  const float* w = scratch.weight.data();
  const float** taps = scratch.taps.data();
  float* slot_state = p.state + (s.slot * p.channels + c0) * hist;
  float* old = nullptr;
  if (t0 == 0) {
    scratch.state.resize(static_cast<size_t>(std::max<int64_t>(hist, 1) * cb));
    old = scratch.state.data();  // only its first `width` columns are ever read
    if (s.has_initial_state) {
      for (int64_t g = 0; g < width; g += kLanes) {
        LoadHistory(slot_state + g * hist, hist, std::min(kLanes, width - g), old + g, cb);
      }
    } else {
      std::fill(old, old + hist * cb, 0.0f);
    }
  }
  // xpad(j) for j in [-(K - 1), len): the state below 0, the sequence's inputs from 0.
  const auto row = [&](int64_t j) {
    return j >= 0 ? p.x + (s.start + j) * p.ldx + c0 : old + (hist + j) * cb;
  };
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t i = 0; i < k; ++i) taps[i] = row(t - hist + i);
    ConvRow(taps, w, k, p.bias == nullptr ? nullptr : p.bias + c0, width, p.silu,
            p.out + (s.start + t) * p.ldo + c0);
  }
  if (t0 != 0) return;
  // The new state is xpad(len - (K - 1) .. len - 1); `old` holds what the slot had.
  for (int64_t g = 0; g < width; g += kLanes) {
    const int64_t lanes = std::min(kLanes, width - g);
    if (hist == 3 && lanes == kLanes) {
      for (int64_t i = 0; i < 3; ++i) taps[i] = row(s.len - hist + i) + g;
      StoreHistory3(taps, slot_state + g * hist);
      continue;
    }
    for (int64_t i = 0; i < hist; ++i) {
      const float* src = row(s.len - hist + i) + g;
      for (int64_t c = 0; c < lanes; ++c) slot_state[(g + c) * hist + i] = src[c];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Selective scan.

struct ScanPlan {
  int64_t channels = 0;  // C
  int64_t d_state = 0;   // N
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* dt = nullptr;
  int64_t lddt = 0;
  const float* dt_bias = nullptr;  // [C] or null
  bool dt_softplus = true;
  const float* a = nullptr;  // [C, N], rows lda apart
  int64_t lda = 0;
  const float* b = nullptr;  // [T, N], rows ldb apart
  int64_t ldb = 0;
  const float* c = nullptr;  // [T, N], rows ldc apart
  int64_t ldc = 0;
  const float* d = nullptr;  // [C] or null
  const float* z = nullptr;  // [T, C], rows ldz apart, or null
  int64_t ldz = 0;
  float* state = nullptr;  // [num_slots, C, N], contiguous
  float* out = nullptr;
  int64_t ldo = 0;
  uint64_t call_id = 0;
};

constexpr int64_t kGroups = kScanBlock / kLanes;

struct ScanScratch {
  std::vector<float> a;      // [kGroups, N, 8]: A transposed, one 8-channel vector per n
  std::vector<float> h;      // [kGroups, N, 8]: the state, same layout
  std::vector<float> delta;  // [kTimeChunk, kGroups, 8]: the chunk's delta
  uint64_t call_id = 0;      // `a` holds block c0 of this call's A
  int64_t c0 = -1;
};

// delta for rows [row0, row0 + len) and channels [c0, c0 + width), into delta[t, g, lane].
void ChunkDelta(const ScanPlan& p, int64_t row0, int64_t len, int64_t c0, int64_t width,
                float* delta) {
  for (int64_t t = 0; t < len; ++t) {
    const float* dt = p.dt + (row0 + t) * p.lddt + c0;
    for (int64_t g = 0; g * kLanes < width; ++g) {
      const int64_t lanes = std::min(kLanes, width - g * kLanes);
      F8 v, bias;
      LoadLanes(v, dt + g * kLanes, lanes);
      if (p.dt_bias != nullptr) {
        LoadLanes(bias, p.dt_bias + c0 + g * kLanes, lanes);
        v += bias;
      }
      if (p.dt_softplus) SoftplusF8(v, v);
      Store8(delta + (t * kGroups + g) * kLanes, v);
    }
  }
}

// One 8-channel group (lanes of them real) down one chunk: the recurrence of ssm.h, in HF's
// order of operations: dA = exp(delta * A), dBx = (delta * B) * x, h = dA * h + dBx,
// y = sum_n h[n] * C[n] (n ascending) + D * x, y *= silu(z). kN > 0 fixes N at compile time.
template <int kN>
void ScanGroup(const ScanPlan& p, int64_t row0, int64_t len, int64_t ch, int64_t lanes,
               const float* a, const float* delta, float* h_io) {
  const int64_t n_state = kN > 0 ? kN : p.d_state;
  F8 h[kN > 0 ? kN : kMaxStateDim], av[kN > 0 ? kN : kMaxStateDim];
  for (int64_t n = 0; n < n_state; ++n) {
    Load8(h[n], h_io + n * kLanes);
    Load8(av[n], a + n * kLanes);
  }
  F8 dv{};
  if (p.d != nullptr) LoadLanes(dv, p.d + ch, lanes);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t r = row0 + t;
    const float* bt = p.b + r * p.ldb;
    const float* ct = p.c + r * p.ldc;
    F8 dl, u, y{};
    Load8(dl, delta + t * kGroups * kLanes);
    LoadLanes(u, p.x + r * p.ldx + ch, lanes);
    for (int64_t n = 0; n < n_state; ++n) {
      F8 da;
      ExpF8(dl * av[n], da);
      const F8 dbx = (dl * bt[n]) * u;
      h[n] = da * h[n] + dbx;
      y += h[n] * ct[n];
    }
    if (p.d != nullptr) y += dv * u;
    if (p.z != nullptr) {
      F8 zv, gate;
      LoadLanes(zv, p.z + r * p.ldz + ch, lanes);
      SiluF8(zv, gate);
      y *= gate;
    }
    StoreLanes(p.out + r * p.ldo + ch, y, lanes);
  }
  for (int64_t n = 0; n < n_state; ++n) Store8(h_io + n * kLanes, h[n]);
}

// One sequence (all of it: the recurrence runs through), channels [c0, c1).
void ScanItem(const ScanPlan& p, const SeqWork& s, int64_t c0, int64_t c1) {
  if (s.len == 0 && s.has_initial_state) return;  // the slot stays as it is
  thread_local ScanScratch scratch;
  const int64_t n_state = p.d_state, width = c1 - c0;
  const int64_t groups = (width + kLanes - 1) / kLanes;
  const size_t group_floats = static_cast<size_t>(n_state * kLanes);
  scratch.a.resize(kGroups * group_floats);
  scratch.h.resize(kGroups * group_floats);
  scratch.delta.resize(static_cast<size_t>(kTimeChunk * kGroups * kLanes));
  float* slot_state = p.state + (s.slot * p.channels + c0) * n_state;
  const bool have_a = scratch.call_id == p.call_id && scratch.c0 == c0;
  scratch.call_id = p.call_id;
  scratch.c0 = c0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t lanes = std::min(kLanes, width - g * kLanes);
    float* hg = scratch.h.data() + g * group_floats;
    if (!have_a) {
      GatherColumns(p.a + (c0 + g * kLanes) * p.lda, p.lda, lanes, n_state,
                    scratch.a.data() + g * group_floats);
    }
    if (s.has_initial_state) {
      GatherColumns(slot_state + g * kLanes * n_state, n_state, lanes, n_state, hg);
    } else {
      std::fill(hg, hg + group_floats, 0.0f);
    }
  }
  for (int64_t t0 = 0; t0 < s.len; t0 += kTimeChunk) {
    const int64_t len = std::min(kTimeChunk, s.len - t0);
    ChunkDelta(p, s.start + t0, len, c0, width, scratch.delta.data());
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t lanes = std::min(kLanes, width - g * kLanes);
      const float* ag = scratch.a.data() + g * group_floats;
      const float* dg = scratch.delta.data() + g * kLanes;
      float* hg = scratch.h.data() + g * group_floats;
      const int64_t ch = c0 + g * kLanes;
      if (n_state == 16) {
        ScanGroup<16>(p, s.start + t0, len, ch, lanes, ag, dg, hg);
      } else {
        ScanGroup<0>(p, s.start + t0, len, ch, lanes, ag, dg, hg);
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t lanes = std::min(kLanes, width - g * kLanes);
    ScatterColumns(scratch.h.data() + g * group_floats, lanes, n_state,
                   slot_state + g * kLanes * n_state, n_state);
  }
}

// Work below which waking another thread does not pay, in token-channels: ~10 us on one core
// (a scan token-channel is N = 16 exps, ~25 ns; a conv one K = 4 FMAs and a SiLU, ~2.5 ns).
constexpr ItemShape kConvItems = {kConvBlock, kConvChunk, 4 * 1024};
constexpr ItemShape kScanItems = {kScanBlock, 0, 512};

}  // namespace

absl::Status CausalConv1d(CausalConv1dArgs& a, Stream* stream) {
  constexpr const char* kOp = "CausalConv1d";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "x", a.x, kAny, kAny));
  const int64_t t = a.x.dim(0), c = a.x.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "weight", a.weight, c, kAny));
  const int64_t k = a.weight.dim(1);
  if (k < 1) return cpu::ArgError(kOp, "weight", a.weight, "needs a kernel width K >= 1");
  CLEAVE_RETURN_IF_ERROR(CheckOptionalVector(kOp, "bias", a.bias, c));
  CLEAVE_RETURN_IF_ERROR(
      cpu::CheckTensor(kOp, "conv_state", a.conv_state, DType::kF32, {kAny, c, k - 1}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous(kOp, "conv_state", a.conv_state));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "out", a.out, DType::kF32, {t, c}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous(kOp, "out", a.out));
  NamedTensors inputs = {{"x", &a.x}, {"weight", &a.weight}, {"bias", &a.bias}};
  CLEAVE_RETURN_IF_ERROR(CheckNoOverlap(kOp, "conv_state", a.conv_state, inputs));
  inputs.push_back({"conv_state", &a.conv_state});
  CLEAVE_RETURN_IF_ERROR(CheckNoOverlap(kOp, "out", a.out, inputs));
  CLEAVE_ASSIGN_OR_RETURN(const std::vector<SeqWork> seqs,
                          ReadSequences(kOp, a.seqs, t, a.conv_state.dim(0)));
  if (c == 0) return absl::OkStatus();

  ConvPlan p;
  p.channels = c;
  p.width = k;
  p.x = a.x.data_as<const float>();
  p.ldx = a.x.stride(0);
  p.weight = a.weight.data_as<const float>();
  p.ldw = a.weight.stride(0);
  p.bias = a.bias.empty() ? nullptr : a.bias.data_as<const float>();
  p.state = a.conv_state.data_as<float>();
  p.out = a.out.data_as<float>();
  p.ldo = a.out.stride(0);
  p.silu = a.silu;
  p.call_id = g_next_call_id.fetch_add(1, std::memory_order_relaxed);
  ItemShape shape = kConvItems;
  shape.chunk_tokens = std::max(kConvChunk, k - 1);  // only a sequence's first chunk reads its slot
  ForEachItem(seqs, c, shape,
              [&p](const SeqWork& s, int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
                ConvItem(p, s, t0, t1, c0, c1);
              });
  return absl::OkStatus();
}

absl::Status SelectiveScan(SelectiveScanArgs& a, Stream* stream) {
  constexpr const char* kOp = "SelectiveScan";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "x", a.x, kAny, kAny));
  const int64_t t = a.x.dim(0), c = a.x.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "A", a.A, c, kAny));
  const int64_t n = a.A.dim(1);
  if (n > kMaxStateDim) {
    return cpu::ArgError(kOp, "A", a.A,
                         absl::StrCat("has d_state N > ", kMaxStateDim, ", unsupported on cpu"));
  }
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "dt", a.dt, t, c));
  CLEAVE_RETURN_IF_ERROR(CheckOptionalVector(kOp, "dt_bias", a.dt_bias, c));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "B", a.B, t, n));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "C", a.C, t, n));
  CLEAVE_RETURN_IF_ERROR(CheckOptionalVector(kOp, "D", a.D, c));
  if (!a.z.empty()) CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "z", a.z, t, c));
  CLEAVE_RETURN_IF_ERROR(
      cpu::CheckTensor(kOp, "ssm_state", a.ssm_state, DType::kF32, {kAny, c, n}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous(kOp, "ssm_state", a.ssm_state));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "out", a.out, DType::kF32, {t, c}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous(kOp, "out", a.out));
  NamedTensors inputs = {{"x", &a.x}, {"dt", &a.dt}, {"dt_bias", &a.dt_bias},
                         {"A", &a.A}, {"B", &a.B},   {"C", &a.C},
                         {"D", &a.D}, {"z", &a.z}};
  CLEAVE_RETURN_IF_ERROR(CheckNoOverlap(kOp, "ssm_state", a.ssm_state, inputs));
  inputs.push_back({"ssm_state", &a.ssm_state});
  CLEAVE_RETURN_IF_ERROR(CheckNoOverlap(kOp, "out", a.out, inputs));
  CLEAVE_ASSIGN_OR_RETURN(const std::vector<SeqWork> seqs,
                          ReadSequences(kOp, a.seqs, t, a.ssm_state.dim(0)));
  if (c == 0) return absl::OkStatus();

  ScanPlan p;
  p.channels = c;
  p.d_state = n;
  p.x = a.x.data_as<const float>();
  p.ldx = a.x.stride(0);
  p.dt = a.dt.data_as<const float>();
  p.lddt = a.dt.stride(0);
  p.dt_bias = a.dt_bias.empty() ? nullptr : a.dt_bias.data_as<const float>();
  p.dt_softplus = a.dt_softplus;
  p.a = a.A.data_as<const float>();
  p.lda = a.A.stride(0);
  p.b = a.B.data_as<const float>();
  p.ldb = a.B.stride(0);
  p.c = a.C.data_as<const float>();
  p.ldc = a.C.stride(0);
  p.d = a.D.empty() ? nullptr : a.D.data_as<const float>();
  p.z = a.z.empty() ? nullptr : a.z.data_as<const float>();
  p.ldz = a.z.empty() ? 0 : a.z.stride(0);
  p.state = a.ssm_state.data_as<float>();
  p.out = a.out.data_as<float>();
  p.ldo = a.out.stride(0);
  p.call_id = g_next_call_id.fetch_add(1, std::memory_order_relaxed);
  ForEachItem(
      seqs, c, kScanItems,
      [&p](const SeqWork& s, int64_t, int64_t, int64_t c0, int64_t c1) { ScanItem(p, s, c0, c1); });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
