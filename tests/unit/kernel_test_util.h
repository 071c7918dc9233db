// Shared by the kernel unit tests: seeded random inputs, 16-bit rounding, and a comparison that
// prints the max abs/rel error and the tolerance it was held to (house style #7).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cleave/kernels/dtype.h"

namespace cleave::kernels::testing_util {

// Fixed so failures reproduce; printed by every comparison.
inline constexpr uint32_t kSeed = 0x5eed2024;

inline std::vector<float> RandomFloats(size_t n, std::mt19937& rng, float lo = -1.0f,
                                       float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Bit patterns of `v` rounded to bf16 / f16.
inline std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = F32ToBf16(v[i]);
  return out;
}
inline std::vector<uint16_t> ToF16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = F32ToF16(v[i]);
  return out;
}
// What the kernel sees after the 16-bit weights are widened back: the reference uses these.
inline std::vector<float> FromBf16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToF32(v[i]);
  return out;
}
inline std::vector<float> FromF16(const std::vector<uint16_t>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = F16ToF32(v[i]);
  return out;
}

// Passes when |got[i] - want[i]| <= atol + rtol * |want[i]| everywhere (NaN never passes).
// Prints one line with the case label, seed, max abs/rel error and tolerances.
inline ::testing::AssertionResult AllClose(const std::string& label, const float* got,
                                           const double* want, size_t n, double atol, double rtol) {
  double max_abs = 0.0, max_rel = 0.0;
  size_t first_bad = 0, bad = 0;
  for (size_t i = 0; i < n; ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= atol + rtol * std::fabs(want[i]))) {  // written so that NaN fails
      if (bad++ == 0) first_bad = i;
    }
    max_abs = std::isnan(err) ? INFINITY : std::max(max_abs, err);
    // Relative error only where it means something (elements well away from 0).
    if (std::fabs(want[i]) > atol) max_rel = std::max(max_rel, err / std::fabs(want[i]));
  }
  std::printf("[ %-40s ] seed=%#x n=%zu max_abs=%.3g max_rel=%.3g (atol=%.1g rtol=%.1g)\n",
              label.c_str(), kSeed, n, max_abs, max_rel, atol, rtol);
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << label << ": " << bad << " of " << n << " elements out of tolerance; first at "
         << first_bad << ": got " << got[first_bad] << " want " << want[first_bad];
}

inline ::testing::AssertionResult AllClose(const std::string& label, const std::vector<float>& got,
                                           const std::vector<double>& want, double atol,
                                           double rtol) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << label << ": size mismatch";
  return AllClose(label, got.data(), want.data(), got.size(), atol, rtol);
}

}  // namespace cleave::kernels::testing_util
