// CPU backend of ssm.h's CausalConv1d: Mamba's causal depthwise conv1d over a packed varlen
// batch, each sequence with its own state slot.
//
// Items are (sequence, chunk of kConvChunk tokens, kConvBlock channels); see kConvBlock. How
// items are dealt, and why the result is bitwise batch invariant: ssm_items.h. Argument checks:
// ssm_checks.h.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ssm_ops.h"
#include "cleave/kernels/ssm.h"
#include "simd.h"
#include "ssm_checks.h"
#include "ssm_items.h"
#include "ssm_lanes.h"

namespace cleave::kernels {
namespace {

using cpu::ssm::CheckOptionalVector;
using cpu::ssm::CheckOutputsAndReadSequences;
using cpu::ssm::CheckRows;
using cpu::ssm::F8;
using cpu::ssm::ForEachItem;
using cpu::ssm::ItemShape;
using cpu::ssm::kAny;
using cpu::ssm::kLanes;
using cpu::ssm::Load8;
using cpu::ssm::LoadLanes;
using cpu::ssm::NamedTensors;
using cpu::ssm::SeqWork;
using cpu::ssm::SiluF8;
using cpu::ssm::Store8;
using cpu::ssm::StoreLanes;

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

// Work below which waking another thread does not pay, in token-channels: ~10 us on one core
// (a conv token-channel is K = 4 FMAs and a SiLU, ~2.5 ns).
constexpr ItemShape kConvItems = {kConvBlock, kConvChunk, 4 * 1024};

}  // namespace

absl::Status CausalConv1d(CausalConv1dArgs& a, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!a.out.device().is_cpu()) return cuda::CausalConv1d(a, stream);
#endif
  constexpr const char* kOp = "CausalConv1d";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "x", a.x, kAny, kAny));
  const int64_t t = a.x.dim(0), c = a.x.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "weight", a.weight, c, kAny));
  const int64_t k = a.weight.dim(1);
  if (k < 1) return cpu::ArgError(kOp, "weight", a.weight, "needs a kernel width K >= 1");
  CLEAVE_RETURN_IF_ERROR(CheckOptionalVector(kOp, "bias", a.bias, c));
  const NamedTensors inputs = {{"x", &a.x}, {"weight", &a.weight}, {"bias", &a.bias}};
  CLEAVE_ASSIGN_OR_RETURN(const std::vector<SeqWork> seqs,
                          CheckOutputsAndReadSequences(kOp, "conv_state", a.conv_state, k - 1,
                                                       a.out, t, c, inputs, a.seqs));
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
  p.call_id = cpu::ssm::NextCallId();
  ItemShape shape = kConvItems;
  shape.chunk_tokens = std::max(kConvChunk, k - 1);  // only a sequence's first chunk reads its slot
  ForEachItem(seqs, c, shape,
              [&p](const SeqWork& s, int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
                ConvItem(p, s, t0, t1, c0, c1);
              });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
