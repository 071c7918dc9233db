// Internal to the CPU backend: the few AVX2 building blocks the kernels share (16-bit -> f32
// widening, a vector exp, reductions). Float reductions do not auto-vectorise without
// -ffast-math, and glibc's vector expf is only reachable with it, so these are written by hand.
// Every helper has a scalar fallback, so a build without -march=x86-64-v3 (CMake's Debug type
// adds no -march) compiles and gives the same answers up to rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cleave/kernels/dtype.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CLEAVE_CPU_AVX2 1
#else
#define CLEAVE_CPU_AVX2 0
#endif

namespace cleave::kernels::cpu {

#if CLEAVE_CPU_AVX2

// 8 bf16 -> 8 f32: bf16 is the top half of an f32, so widening is a 16-bit shift (exact).
inline __m256 LoadBf16x8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// 8 f16 -> 8 f32 with F16C (exact, subnormals included).
inline __m256 LoadF16x8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

inline float HSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float HMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) on 8 lanes: Cephes' expf (range reduction by ln 2 split in two constants, degree-5
// polynomial), within ~2 ulp of std::exp over the normal range. Inputs below ln(FLT_MIN) give
// exactly 0 (so exp(-inf) == 0, which masked scores rely on), inputs from ~88.38 up give inf,
// and NaN propagates.
inline __m256 Exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-88.3762626647949f);
  const __m256 underflow = _mm256_set1_ps(-87.33654475f);  // ln(FLT_MIN)
  const __m256 zero_mask = _mm256_cmp_ps(x, underflow, _CMP_LT_OQ);
  // min/max return their second operand when either is NaN; x second keeps NaN.
  __m256 v = _mm256_max_ps(lo, _mm256_min_ps(hi, x));
  __m256 fx = _mm256_fmadd_ps(v, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  v = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), v);
  v = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), v);
  const __m256 z = _mm256_mul_ps(v, v);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, v, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, z, v);
  y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
  __m256i n = _mm256_cvttps_epi32(fx);
  n = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(n));
  return _mm256_andnot_ps(zero_mask, y);
}

#endif  // CLEAVE_CPU_AVX2

// dst[i] = float(src[i]) for a bf16 row of n elements.
inline void WidenBf16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if CLEAVE_CPU_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LoadBf16x8(src + i));
#endif
  for (; i < n; ++i) dst[i] = Bf16ToF32(src[i]);
}

// dst[i] = float(src[i]) for an f16 row of n elements.
inline void WidenF16(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if CLEAVE_CPU_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, LoadF16x8(src + i));
#endif
  for (; i < n; ++i) dst[i] = F16ToF32(src[i]);
}

// One row of n elements of `dtype` (f32, bf16 or f16; the caller has checked) to f32.
inline void WidenRow(DType dtype, const void* src, float* dst, int64_t n) {
  switch (dtype) {
    case DType::kBF16:
      WidenBf16(static_cast<const uint16_t*>(src), dst, n);
      return;
    case DType::kF16:
      WidenF16(static_cast<const uint16_t*>(src), dst, n);
      return;
    default:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
  }
}

// sum(x[i]^2) accumulated in f32 (four 8-lane partial sums, so the rounding error grows like
// n / 32 additions rather than n).
inline float SumSquares(const float* x, int64_t n) {
  int64_t i = 0;
  float sum = 0.0f;
#if CLEAVE_CPU_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    const __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
    a0 = _mm256_fmadd_ps(v0, v0, a0);
    a1 = _mm256_fmadd_ps(v1, v1, a1);
    a2 = _mm256_fmadd_ps(v2, v2, a2);
    a3 = _mm256_fmadd_ps(v3, v3, a3);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(v, v, a0);
  }
  sum = HSum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; i < n; ++i) sum += x[i] * x[i];
  return sum;
}

}  // namespace cleave::kernels::cpu
