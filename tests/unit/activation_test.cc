// SwiGlu against a double-precision loop over odd widths (vector body + scalar tail), strided
// rows, extreme inputs and argument errors.
#include "cleave/kernels/activation.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "unit/kernel_test_util.h"

namespace cleave::kernels {
namespace {

using testing_util::AllClose;
using testing_util::kSeed;
using testing_util::RandomFloats;

// The vector exp is within a few ulp of expf; silu * up adds two roundings.
constexpr double kAtol = 1e-6;
constexpr double kRtol = 2e-6;

std::vector<double> Reference(const std::vector<float>& gate_up, int64_t t, int64_t f) {
  std::vector<double> out(static_cast<size_t>(t * f));
  for (int64_t r = 0; r < t; ++r) {
    for (int64_t i = 0; i < f; ++i) {
      const double g = gate_up[r * 2 * f + i], u = gate_up[r * 2 * f + f + i];
      out[r * f + i] = g / (1.0 + std::exp(-g)) * u;
    }
  }
  return out;
}

TEST(SwiGluTest, MatchesReference) {
  const int64_t shapes[][2] = {{1, 1}, {1, 7}, {3, 63}, {7, 129}, {2, 11008}, {129, 65}};
  for (const auto& s : shapes) {
    const int64_t t = s[0], f = s[1];
    std::mt19937 rng(kSeed + static_cast<uint32_t>(t * 100000 + f));
    std::vector<float> in = RandomFloats(static_cast<size_t>(t * 2 * f), rng, -8.0f, 8.0f);
    std::vector<float> out(static_cast<size_t>(t * f));
    Tensor it(in.data(), DType::kF32, {t, 2 * f}), ot(out.data(), DType::kF32, {t, f});
    ASSERT_TRUE(SwiGlu(it, ot).ok());
    EXPECT_TRUE(
        AllClose(absl::StrCat("swiglu_t", t, "_f", f), out, Reference(in, t, f), kAtol, kRtol));
  }
}

TEST(SwiGluTest, ExtremeGates) {
  // Saturated sigmoid on both sides, exp overflow/underflow, and exact zeros.
  std::vector<float> gates = {-200.0f, -100.0f, -88.5f, -87.0f, -20.0f, -1e-3f, 0.0f, 1e-3f,
                              20.0f,   87.0f,   88.5f,  100.0f, 200.0f, -0.0f,  3.0f, -3.0f};
  const int64_t f = static_cast<int64_t>(gates.size());
  std::vector<float> in(gates);
  for (int64_t i = 0; i < f; ++i) in.push_back(1.5f);
  std::vector<float> out(static_cast<size_t>(f));
  Tensor it(in.data(), DType::kF32, {1, 2 * f}), ot(out.data(), DType::kF32, {1, f});
  ASSERT_TRUE(SwiGlu(it, ot).ok());
  EXPECT_TRUE(AllClose("swiglu_extreme", out, Reference(in, 1, f), kAtol, kRtol));
}

TEST(SwiGluTest, StridedRows) {
  // gate_up as a window of a wider buffer, out with padded rows.
  const int64_t t = 4, f = 19, ld_in = 2 * f + 5, ld_out = f + 3;
  std::mt19937 rng(kSeed);
  std::vector<float> buf = RandomFloats(static_cast<size_t>(t * ld_in), rng, -4.0f, 4.0f);
  std::vector<float> out(static_cast<size_t>(t * ld_out), 9.0f);
  Tensor it = Tensor(buf.data(), DType::kF32, {t, ld_in}).Narrow(1, 1, 2 * f);
  Tensor ot = Tensor(out.data(), DType::kF32, {t, ld_out}).Narrow(1, 0, f);
  ASSERT_TRUE(SwiGlu(it, ot).ok());
  std::vector<float> packed, got;
  for (int64_t r = 0; r < t; ++r) {
    for (int64_t i = 0; i < 2 * f; ++i) packed.push_back(buf[r * ld_in + 1 + i]);
    for (int64_t i = 0; i < f; ++i) got.push_back(out[r * ld_out + i]);
    for (int64_t i = f; i < ld_out; ++i) EXPECT_EQ(out[r * ld_out + i], 9.0f);
  }
  EXPECT_TRUE(AllClose("swiglu_strided", got, Reference(packed, t, f), kAtol, kRtol));
}

TEST(SwiGluTest, RejectsBadArguments) {
  std::vector<float> a(4 * 10), b(4 * 5);
  Tensor odd(a.data(), DType::kF32, {4, 9});
  Tensor in(a.data(), DType::kF32, {4, 10});
  Tensor out(b.data(), DType::kF32, {4, 5});
  Tensor wrong_out(b.data(), DType::kF32, {4, 4});
  Tensor bf16_in(a.data(), DType::kBF16, {4, 10});
  Tensor out_bad_dtype(b.data(), DType::kI32, {4, 5});
  Tensor out_odd(b.data(), DType::kF32, {4, 4});
  EXPECT_TRUE(absl::IsInvalidArgument(SwiGlu(odd, out_odd)));
  EXPECT_TRUE(absl::IsInvalidArgument(SwiGlu(in, wrong_out)));
  EXPECT_TRUE(absl::IsInvalidArgument(SwiGlu(bf16_in, out)));
  EXPECT_TRUE(absl::IsInvalidArgument(SwiGlu(in, out_bad_dtype)));
  EXPECT_TRUE(SwiGlu(in, out).ok());
}

}  // namespace
}  // namespace cleave::kernels
