// Internal to the CUDA Mamba ops (kernels/cuda/ssm/): the device side. Parameter structs (sizes,
// strides, raw pointers), the batch's work items, the per-sequence index checks, and the body of
// one thread of each kernel. The bodies are plain C++ on one (item, channel) - no shared memory,
// no warp cooperation - so the kernels are thin wrappers that map blockIdx / threadIdx onto them.
//
// Work items: every sequence is cut into chunks of L tokens along time (at least one chunk, also
// for an empty sequence, whose state still has to be kept or zeroed); chunk_off[b] is the first
// item of sequence b (an exclusive prefix sum of max(1, ceil(len / L)), built on the device by
// the check kernel). A thread block is one item times 128 consecutive channels: rows of x, dt, z
// and out are read and written as coalesced runs, and B / C rows are broadcast within the block.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define CLEAVE_SSM_HD __host__ __device__ __forceinline__
#else
#define CLEAVE_SSM_HD inline
#endif

namespace cleave::kernels::cuda::ssm {

CLEAVE_SSM_HD int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }
CLEAVE_SSM_HD int64_t Max64(int64_t a, int64_t b) { return a > b ? a : b; }

// ---- The batch --------------------------------------------------------------------------------

// The index tensors (device memory) and the chunking of one call.
struct SeqIndex {
  const int32_t* qsl = nullptr;        // [B + 1]
  const int32_t* slots = nullptr;      // [B]
  const int32_t* init = nullptr;       // [B]
  const int32_t* chunk_off = nullptr;  // [B + 1], written by the check kernel
  int64_t num_seqs = 0;                // B
  int64_t chunk_tokens = 1;            // L
};

// One work item: tokens [t0, t1) (relative to the sequence's start) of one sequence.
struct Item {
  int64_t item = 0, seq = 0, start = 0, len = 0, t0 = 0, t1 = 0, chunk = 0, num_chunks = 0;
  int64_t slot = 0;
  bool init = false;
};

// Item `item` of a checked batch; false past the last item. Binary search of chunk_off, which is
// strictly increasing (every sequence has at least one item).
CLEAVE_SSM_HD bool FindItem(const SeqIndex& s, int64_t item, Item* it) {
  const int32_t* off = s.chunk_off;
  if (s.num_seqs == 0 || item >= off[s.num_seqs]) return false;
  int64_t lo = 0, hi = s.num_seqs - 1;  // the last b with off[b] <= item
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (off[mid] <= item) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  it->item = item;
  it->seq = lo;
  it->start = s.qsl[lo];
  it->len = int64_t{s.qsl[lo + 1]} - s.qsl[lo];
  it->chunk = item - off[lo];
  it->num_chunks = int64_t{off[lo + 1]} - off[lo];
  it->t0 = it->chunk * s.chunk_tokens;
  it->t1 = Min64(it->len, it->t0 + s.chunk_tokens);
  it->slot = s.slots[lo];
  it->init = s.init[lo] == 1;
  return true;
}

// Items of sequence i: max(1, ceil(len / L)); a negative length (a bad batch) counts as 0.
CLEAVE_SSM_HD int64_t ChunkCount(const int32_t* qsl, int64_t i, int64_t chunk_tokens) {
  const int64_t len = Max64(0, int64_t{qsl[i + 1]} - qsl[i]);
  return Max64(1, (len + chunk_tokens - 1) / chunk_tokens);
}

// ---- Index checks -----------------------------------------------------------------------------
// A bad batch is recorded as one code, the smallest found wins (atomicMin), in the CPU check's
// order: the bounds of query_start_loc, then sequence by sequence (a decrease, a slot out of
// range, a has_initial_state other than 0/1), then duplicate slots. kNoError: none.

inline constexpr uint64_t kNoError = ~0ull;
enum SeqErrorBand : uint64_t { kBandBounds = 0, kBandSequence = 1, kBandDuplicate = 2 };
enum SeqErrorKind : int { kDecreases = 0, kSlotRange = 1, kInitValue = 2, kDuplicateSlot = 3 };

CLEAVE_SSM_HD uint64_t ErrorCode(uint64_t band, int64_t index, int kind) {
  return band << 60 | static_cast<uint64_t>(index) << 2 | static_cast<uint64_t>(kind);
}
CLEAVE_SSM_HD uint64_t ErrorBand(uint64_t code) { return code >> 60; }
CLEAVE_SSM_HD int64_t ErrorIndex(uint64_t code) {
  return static_cast<int64_t>((code >> 2) & ((uint64_t{1} << 58) - 1));
}
CLEAVE_SSM_HD int ErrorKind(uint64_t code) { return static_cast<int>(code & 3); }

// Sequence i's own problems (not duplicates), or kNoError.
CLEAVE_SSM_HD uint64_t SequenceError(const int32_t* qsl, const int32_t* slots, const int32_t* init,
                                     int64_t i, int64_t num_slots) {
  if (qsl[i + 1] < qsl[i]) return ErrorCode(kBandSequence, i, kDecreases);
  if (slots[i] < 0 || slots[i] >= num_slots) return ErrorCode(kBandSequence, i, kSlotRange);
  if (init[i] != 0 && init[i] != 1) return ErrorCode(kBandSequence, i, kInitValue);
  return kNoError;
}

// ---- Math (torch's definitions, f32, no fast-math intrinsics) --------------------------------

CLEAVE_SSM_HD float Silu(float v) { return v / (1.0f + expf(-v)); }
// torch.nn.functional.softplus, beta 1, threshold 20.
CLEAVE_SSM_HD float Softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

// ---- CausalConv1d -----------------------------------------------------------------------------

struct ConvParams {
  SeqIndex seqs;
  int64_t channels = 0, width = 0;  // C, K
  const float* x = nullptr;         // [T, C], rows ldx apart
  int64_t ldx = 0;
  const float* weight = nullptr;    // [C, K], rows ldw apart
  int64_t ldw = 0;
  const float* bias = nullptr;      // [C] or null
  float* state = nullptr;           // [num_slots, C, K - 1], contiguous
  float* out = nullptr;             // [T, C], rows ldo apart
  int64_t ldo = 0;
  bool silu = true;
};

// Channel c of one item. kK > 0 fixes K at compile time. Chunks hold at least K - 1 tokens, so
// only a sequence's first chunk reaches back into the slot's state; that chunk's thread is also
// the one that writes the new state, after it has read the old.
template <int kK>
CLEAVE_SSM_HD void ConvThread(const ConvParams& p, const Item& it, int64_t c) {
  if (it.len == 0 && it.init) return;  // the slot stays as it is
  const int64_t k = kK > 0 ? kK : p.width, hist = k - 1;
  float* slot = p.state + (it.slot * p.channels + c) * hist;
  const float* xc = p.x + it.start * p.ldx + c;
  // xpad(j), j in [-(K - 1), len): the old state below 0 (zeros without one), the inputs from 0.
  const auto xpad = [&](int64_t j) -> float {
    if (j >= 0) return xc[j * p.ldx];
    return it.init ? slot[hist + j] : 0.0f;
  };
  const float* w = p.weight + c * p.ldw;
  const float b = p.bias != nullptr ? p.bias[c] : 0.0f;
  for (int64_t t = it.t0; t < it.t1; ++t) {
    float acc = b;
    for (int64_t i = 0; i < k; ++i) acc = fmaf(w[i], xpad(t - hist + i), acc);
    p.out[(it.start + t) * p.ldo + c] = p.silu ? Silu(acc) : acc;
  }
  if (it.chunk != 0) return;
  // The new state is xpad(len - (K - 1) .. len - 1). In place, ascending: entry i reads old entry
  // len + i >= i (len >= 1 here unless there is no initial state, and then nothing is read).
  for (int64_t i = 0; i < hist; ++i) slot[i] = xpad(it.len - hist + i);
}

// ---- SelectiveScan ----------------------------------------------------------------------------

// States per register group: a thread walks a chunk once per group of 16 states.
inline constexpr int kGroup = 16;

struct ScanParams {
  SeqIndex seqs;
  int64_t channels = 0, d_state = 0;  // C, N
  const float* x = nullptr;           // [T, C], rows ldx apart (u)
  int64_t ldx = 0;
  const float* dt = nullptr;          // [T, C], rows lddt apart
  int64_t lddt = 0;
  const float* dt_bias = nullptr;     // [C] or null
  bool dt_softplus = true;
  const float* a = nullptr;           // [C, N], rows lda apart
  int64_t lda = 0;
  const float* b = nullptr;           // [T, N], rows ldb apart
  int64_t ldb = 0;
  const float* c = nullptr;           // [T, N], rows ldc apart
  int64_t ldc = 0;
  const float* d = nullptr;           // [C] or null
  const float* z = nullptr;           // [T, C], rows ldz apart, or null
  int64_t ldz = 0;
  float* state = nullptr;             // [num_slots, C, N], contiguous
  float* out = nullptr;               // [T, C], rows ldo apart
  int64_t ldo = 0;
  // Chunked mode only (null when every sequence is one item): per item, [N][C] floats, first the
  // chunk's local end state (recurrence from zero), then, after the carry pass, its start state;
  // and [C] floats of the chunk's sum of delta.
  float* carry = nullptr;
  float* delta_sum = nullptr;
};

CLEAVE_SSM_HD float Delta(const ScanParams& p, int64_t row, int64_t ch) {
  float v = p.dt[row * p.lddt + ch];
  if (p.dt_bias != nullptr) v += p.dt_bias[ch];
  return p.dt_softplus ? Softplus(v) : v;
}

CLEAVE_SSM_HD int64_t CarryIndex(const ScanParams& p, int64_t item, int64_t n, int64_t ch) {
  return (item * p.d_state + n) * p.channels + ch;
}

// Pass 1 of the chunked scan, channel ch of one item: the chunk's recurrence from h = 0, its end
// state into carry and its sum of delta into delta_sum. A sequence's last chunk has no successor
// and is skipped. kN > 0 fixes N at compile time (one group when kN <= 16).
template <int kN>
CLEAVE_SSM_HD void ScanLocalThread(const ScanParams& p, const Item& it, int64_t ch) {
  if (it.chunk + 1 >= it.num_chunks) return;
  const int64_t n_state = kN > 0 ? kN : p.d_state;
  float dsum = 0.0f;
  for (int64_t n0 = 0; n0 < n_state; n0 += kGroup) {
    float h[kGroup], a[kGroup];
    for (int j = 0; j < kGroup; ++j) {
      h[j] = 0.0f;
      a[j] = n0 + j < n_state ? p.a[ch * p.lda + n0 + j] : 0.0f;
    }
    for (int64_t t = it.t0; t < it.t1; ++t) {
      const int64_t r = it.start + t;
      const float delta = Delta(p, r, ch);
      if (n0 == 0) dsum += delta;
      const float u = p.x[r * p.ldx + ch];
      const float* br = p.b + r * p.ldb;
      for (int j = 0; j < kGroup; ++j) {
        if (n0 + j < n_state) h[j] = fmaf(expf(delta * a[j]), h[j], (delta * br[n0 + j]) * u);
      }
    }
    for (int j = 0; j < kGroup; ++j) {
      if (n0 + j < n_state) p.carry[CarryIndex(p, it.item, n0 + j, ch)] = h[j];
    }
  }
  p.delta_sum[it.item * p.channels + ch] = dsum;
}

// Pass 2 of the chunked scan, state n of channel ch of sequence `seq`: walks its chunks in order,
// replacing each chunk's local end state by its start state (the slot's state, or zero, for the
// first), h_end = exp(A * sum(delta)) * h_start + local.
CLEAVE_SSM_HD void ScanCarryThread(const ScanParams& p, int64_t seq, int64_t n, int64_t ch) {
  const int64_t first = p.seqs.chunk_off[seq], last = p.seqs.chunk_off[seq + 1];
  const int64_t slot = p.seqs.slots[seq];
  float h = p.seqs.init[seq] == 1 ? p.state[(slot * p.channels + ch) * p.d_state + n] : 0.0f;
  const float a = p.a[ch * p.lda + n];
  for (int64_t item = first; item < last; ++item) {
    float* cell = p.carry + CarryIndex(p, item, n, ch);
    if (item + 1 == last) {
      *cell = h;
      break;
    }
    const float local = *cell;
    *cell = h;
    h = fmaf(expf(a * p.delta_sum[item * p.channels + ch]), h, local);
  }
}

// The output pass, channel ch of one item: the recurrence from the chunk's start state (the carry
// in chunked mode, else the slot's state or zero), y for every token, and the final state into
// the slot from a sequence's last chunk. With more than one group of states, each group's partial
// sum of h * C is accumulated in `out` (this thread's own elements), D and z applied by the last.
template <int kN>
CLEAVE_SSM_HD void ScanOutputThread(const ScanParams& p, const Item& it, int64_t ch) {
  if (it.len == 0 && it.init) return;  // the slot stays as it is
  const int64_t n_state = kN > 0 ? kN : p.d_state;
  float* slot = p.state + (it.slot * p.channels + ch) * n_state;
  const bool last_chunk = it.chunk + 1 == it.num_chunks;
  const float dv = p.d != nullptr ? p.d[ch] : 0.0f;
  // At least one group: with N = 0, y is D * x (gated) alone.
  for (int64_t n0 = 0; n0 == 0 || n0 < n_state; n0 += kGroup) {
    const bool first_group = n0 == 0, last_group = n0 + kGroup >= n_state;
    float h[kGroup], a[kGroup];
    for (int j = 0; j < kGroup; ++j) {
      const int64_t n = n0 + j;
      const bool on = n < n_state;
      a[j] = on ? p.a[ch * p.lda + n] : 0.0f;
      if (!on) {
        h[j] = 0.0f;
      } else if (p.carry != nullptr) {
        h[j] = p.carry[CarryIndex(p, it.item, n, ch)];
      } else {
        h[j] = it.init ? slot[n] : 0.0f;
      }
    }
    for (int64_t t = it.t0; t < it.t1; ++t) {
      const int64_t r = it.start + t;
      const float delta = Delta(p, r, ch);
      const float u = p.x[r * p.ldx + ch];
      const float* br = p.b + r * p.ldb;
      const float* cr = p.c + r * p.ldc;
      float y = 0.0f;
      for (int j = 0; j < kGroup; ++j) {
        if (n0 + j < n_state) {
          h[j] = fmaf(expf(delta * a[j]), h[j], (delta * br[n0 + j]) * u);
          y = fmaf(h[j], cr[n0 + j], y);
        }
      }
      float* o = p.out + r * p.ldo + ch;
      if (!first_group) y = *o + y;
      if (last_group) {
        if (p.d != nullptr) y = fmaf(dv, u, y);
        if (p.z != nullptr) y *= Silu(p.z[r * p.ldz + ch]);
      }
      *o = y;
    }
    if (last_chunk) {
      for (int j = 0; j < kGroup; ++j) {
        if (n0 + j < n_state) slot[n0 + j] = h[j];
      }
    }
  }
}

}  // namespace cleave::kernels::cuda::ssm
