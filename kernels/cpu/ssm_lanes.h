// Internal to the CPU backend's Mamba ops (ssm_conv.cc, ssm_scan.cc): the 8-lane vector they both
// compute on. A channel is one lane and lanes never mix, which is what makes each channel's result
// independent of how a batch is cut into items (see ssm_items.h).
//
// GCC/Clang vector types: one AVX2 register with -march=x86-64-v3, two SSE registers otherwise.
// Helpers take and return F8 by reference: passing a 32-byte vector by value changes the ABI when
// AVX is off, which -Wpsabi rejects.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace cleave::kernels::cpu::ssm {

typedef float F8 __attribute__((vector_size(32)));
inline constexpr int64_t kLanes = 8;

inline void Load8(F8& v, const float* p) { std::memcpy(&v, p, sizeof(F8)); }
inline void Store8(float* p, const F8& v) { std::memcpy(p, &v, sizeof(F8)); }

// The first n (<= 8) lanes from p, the rest zero: a block's partial last vector runs the very same
// operations as a full one.
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

// exp on 8 lanes (cpu::Exp8, within ~2 ulp of std::exp; exactly 0 below ln(FLT_MIN)).
inline void ExpF8(const F8& x, F8& out) {
#if CLEAVE_CPU_AVX2
  const __m256 r = Exp8(reinterpret_cast<const __m256&>(x));
  std::memcpy(&out, &r, sizeof(F8));
#else
  for (int i = 0; i < kLanes; ++i) out[i] = std::exp(x[i]);
#endif
}

// x * sigmoid(x) as torch computes it: x / (1 + exp(-x)).
inline void SiluF8(const F8& x, F8& out) {
  F8 e;
  ExpF8(-x, e);
  out = x / (1.0f + e);
}

}  // namespace cleave::kernels::cpu::ssm
