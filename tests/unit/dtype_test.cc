// 16-bit float conversions: exhaustive round trips, and agreement with the compiler's own
// _Float16 (GCC) on random f32 bit patterns.
#include "cleave/kernels/dtype.h"

#include <cmath>
#include <cstdio>
#include <random>

#include "gtest/gtest.h"

namespace cleave::kernels {
namespace {

TEST(DType, F16RoundTripsEveryHalf) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToF16(f), h) << "half 0x" << std::hex << h;
  }
}

TEST(DType, Bf16RoundTripsEveryBf16) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = Bf16ToF32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(F32ToBf16(f), h) << "bf16 0x" << std::hex << h;
  }
}

TEST(DType, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 lies exactly between two bf16 values; ties go to the even mantissa (1.0).
  EXPECT_EQ(F32ToBf16(1.0f + std::ldexp(1.0f, -8)), F32ToBf16(1.0f));
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::nanf("")))));
}

#if defined(__GNUC__) && !defined(__clang__)
TEST(DType, F16MatchesCompilerFloat16) {
  const uint32_t seed = 1234;
  std::printf("seed %u\n", seed);
  std::mt19937 rng(seed);
  for (int i = 0; i < 1000000; ++i) {
    const uint32_t bits = rng();
    float f;
    std::memcpy(&f, &bits, 4);
    if (std::isnan(f)) continue;
    const _Float16 ref = static_cast<_Float16>(f);
    uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    ASSERT_EQ(F32ToF16(f), ref_bits) << "f32 " << f;
  }
}
#endif

}  // namespace
}  // namespace cleave::kernels
