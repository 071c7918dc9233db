// Internal to the CPU backend: the plain-pointer view of one Linear call, shared by its kernels
// (gemm.cc: OpenBLAS / GEMV fast paths; linear_invariant.cc: the batch-invariant kernel).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cleave/kernels/dtype.h"
#include "simd.h"

namespace cleave::kernels::cpu {

// Fixed after the host wrapper's checks: y[m, n] = x[m, k] · w[n, k]^T (+ bias[n]).
struct LinearParams {
  const float* x;  // [m, k], row stride ldx
  const void* w;   // [n, k] contiguous, dtype w_dtype
  DType w_dtype;
  const float* bias;  // [n] or nullptr
  float* y;           // [m, n], row stride ldy
  int64_t m, n, k, ldx, ldy;
};

// Element type of a weight row: f32 weights are read as is, 16-bit ones widened in registers.
template <DType W>
using WElem = std::conditional_t<W == DType::kF32, float, uint16_t>;

#if CLEAVE_CPU_AVX2

template <DType W>
inline __m256 LoadW8(const WElem<W>* p) {
  if constexpr (W == DType::kF32) {
    return _mm256_loadu_ps(p);
  } else if constexpr (W == DType::kBF16) {
    return LoadBf16x8(p);
  } else {
    return LoadF16x8(p);
  }
}

#endif

template <DType W>
inline float WidenOne(WElem<W> v) {
  if constexpr (W == DType::kF32) {
    return v;
  } else if constexpr (W == DType::kBF16) {
    return Bf16ToF32(v);
  } else {
    return F16ToF32(v);
  }
}

// The batch-invariant Linear (linear_invariant.cc): every y[i, j] is one fixed sequence of f32
// operations on row i of x and row j of w, whatever m, the tiling, or the thread count.
void LinearInvariant(const LinearParams& p);

}  // namespace cleave::kernels::cpu
