// CPU backend of ssm.h's SelectiveScan: Mamba's selective scan over a packed varlen batch, each
// sequence with its own state slot.
//
// An item is (sequence, kScanBlock channels), all of the sequence's tokens (the recurrence runs
// through them). Time is walked in chunks of kTimeChunk tokens: softplus(dt) for the chunk first
// (vectorised), then one 8-channel group at a time down the chunk with its N state vectors held
// locally, re-reading the chunk's B / C rows from L1 for each group. How items are dealt, and why
// the result is bitwise batch invariant: ssm_items.h. Argument checks: ssm_checks.h.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
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
using cpu::ssm::ExpF8;
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

// Channels per scan item: 8 vectors. Small enough that a one-sequence prefill of a 1536-channel
// layer still splits into 24 items, large enough that a decode item amortises its set-up.
constexpr int64_t kScanBlock = 64;
// Tokens per scan chunk: the chunk's softplus(dt) for one block is 16 KiB and its B / C rows
// (N = 16) 8 KiB, both L1-resident while the block's 8 groups walk the chunk.
constexpr int64_t kTimeChunk = 64;
// Largest state dimension N: the scan keeps a group's N state vectors in a local array.
constexpr int64_t kMaxStateDim = 256;

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

#if CLEAVE_CPU_AVX2
// r[i][j] <- r[j][i]: unpacks, shuffles, then 128-bit permutes.
inline void Transpose8x8(__m256* r) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xee);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xee);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xee);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xee);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

// dst[j * 8 + i] = src[i * src_stride + j] for i < lanes, j < n; lanes >= `lanes` are zero.
// Turns `lanes` channel rows of n entries (A, a state slot) into n 8-channel vectors.
void GatherColumns(const float* src, int64_t src_stride, int64_t lanes, int64_t n, float* dst) {
  int64_t j = 0;
#if CLEAVE_CPU_AVX2
  if (lanes == kLanes) {
    for (; j + 8 <= n; j += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride + j);
      Transpose8x8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (j + i) * kLanes, r[i]);
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
      Transpose8x8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * dst_stride + j, r[i]);
    }
  }
#endif
  for (; j < n; ++j) {
    for (int64_t i = 0; i < lanes; ++i) dst[i * dst_stride + j] = src[j * kLanes + i];
  }
}

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
// (a scan token-channel is N = 16 exps, ~25 ns).
constexpr ItemShape kScanItems = {kScanBlock, 0, 512};

}  // namespace

absl::Status SelectiveScan(SelectiveScanArgs& a, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!a.out.device().is_cpu()) return cuda::SelectiveScan(a, stream);
#endif
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
  const NamedTensors inputs = {{"x", &a.x}, {"dt", &a.dt}, {"dt_bias", &a.dt_bias},
                               {"A", &a.A}, {"B", &a.B},   {"C", &a.C},
                               {"D", &a.D}, {"z", &a.z}};
  CLEAVE_ASSIGN_OR_RETURN(
      const std::vector<SeqWork> seqs,
      CheckOutputsAndReadSequences(kOp, "ssm_state", a.ssm_state, n, a.out, t, c, inputs, a.seqs));
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
  p.call_id = cpu::ssm::NextCallId();
  ForEachItem(
      seqs, c, kScanItems,
      [&p](const SeqWork& s, int64_t, int64_t, int64_t c0, int64_t c1) { ScanItem(p, s, c0, c1); });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
