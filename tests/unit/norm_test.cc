// RmsNorm / AddRmsNorm against a double-precision loop, including strided rows, in-place use
// and argument errors.
#include "cleave/kernels/norm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "unit/kernel_test_util.h"

namespace cleave::kernels {
namespace {

using testing_util::AllClose;
using testing_util::kSeed;
using testing_util::RandomFloats;

constexpr float kEps = 1e-5f;
// One f32 sum of squares (relative error ~1e-7 for these sizes) and two roundings per element.
constexpr double kAtol = 1e-6;
constexpr double kRtol = 1e-5;

std::vector<double> Reference(const std::vector<float>& x, const std::vector<float>& w, int64_t t,
                              int64_t d) {
  std::vector<double> out(x.size());
  for (int64_t r = 0; r < t; ++r) {
    double ss = 0.0;
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(x[r * d + i]) * x[r * d + i];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(d) + kEps);
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = w[i] * (x[r * d + i] * inv);
  }
  return out;
}

struct Shape {
  int64_t t, d;
};
const Shape kShapes[] = {{1, 1}, {1, 7}, {3, 63}, {7, 129}, {1, 4096}, {129, 257}, {64, 1000}};

TEST(RmsNormTest, MatchesReference) {
  for (const Shape& s : kShapes) {
    std::mt19937 rng(kSeed + static_cast<uint32_t>(s.t * 1000 + s.d));
    std::vector<float> x = RandomFloats(static_cast<size_t>(s.t * s.d), rng, -3.0f, 3.0f);
    std::vector<float> w = RandomFloats(static_cast<size_t>(s.d), rng, 0.5f, 1.5f);
    std::vector<float> out(x.size());
    Tensor xt(x.data(), DType::kF32, {s.t, s.d}), wt(w.data(), DType::kF32, {s.d});
    Tensor ot(out.data(), DType::kF32, {s.t, s.d});
    ASSERT_TRUE(RmsNorm(xt, wt, kEps, ot).ok());
    const std::vector<double> want = Reference(x, w, s.t, s.d);
    EXPECT_TRUE(AllClose(absl::StrCat("rmsnorm_t", s.t, "_d", s.d), out, want, kAtol, kRtol));

    // In place (out aliases x) gives the same answer.
    ASSERT_TRUE(RmsNorm(xt, wt, kEps, xt).ok());
    EXPECT_EQ(x, out);
  }
}

TEST(RmsNormTest, StridedRows) {
  const int64_t t = 5, d = 33, ld = 40;
  std::mt19937 rng(kSeed);
  std::vector<float> buf = RandomFloats(static_cast<size_t>(t * ld), rng);
  std::vector<float> w = RandomFloats(static_cast<size_t>(d), rng);
  std::vector<float> out(static_cast<size_t>(t * ld), 7.0f);
  Tensor xt = Tensor(buf.data(), DType::kF32, {t, ld}).Narrow(1, 2, d);
  Tensor ot = Tensor(out.data(), DType::kF32, {t, ld}).Narrow(1, 4, d);
  Tensor wt(w.data(), DType::kF32, {d});
  ASSERT_TRUE(RmsNorm(xt, wt, kEps, ot).ok());
  std::vector<float> packed, got;
  for (int64_t r = 0; r < t; ++r) {
    for (int64_t i = 0; i < d; ++i) {
      packed.push_back(buf[r * ld + 2 + i]);
      got.push_back(out[r * ld + 4 + i]);
    }
    for (int64_t i = 0; i < 4; ++i) EXPECT_EQ(out[r * ld + i], 7.0f);
  }
  EXPECT_TRUE(AllClose("rmsnorm_strided", got, Reference(packed, w, t, d), kAtol, kRtol));
}

TEST(AddRmsNormTest, MatchesReference) {
  for (const Shape& s : kShapes) {
    std::mt19937 rng(kSeed + static_cast<uint32_t>(s.t * 1000 + s.d));
    const size_t n = static_cast<size_t>(s.t * s.d);
    std::vector<float> x = RandomFloats(n, rng), residual = RandomFloats(n, rng);
    std::vector<float> w = RandomFloats(static_cast<size_t>(s.d), rng, 0.5f, 1.5f);
    std::vector<float> sum(n), out(n);
    std::vector<double> want_residual(n);
    for (size_t i = 0; i < n; ++i) {
      sum[i] = residual[i] + x[i];  // the f32 sum the kernel must store
      want_residual[i] = sum[i];
    }
    Tensor xt(x.data(), DType::kF32, {s.t, s.d}), rt(residual.data(), DType::kF32, {s.t, s.d});
    Tensor wt(w.data(), DType::kF32, {s.d}), ot(out.data(), DType::kF32, {s.t, s.d});
    ASSERT_TRUE(AddRmsNorm(xt, rt, wt, kEps, ot).ok());
    const std::string label = absl::StrCat("add_rmsnorm_t", s.t, "_d", s.d);
    EXPECT_TRUE(AllClose(label + "_residual", residual, want_residual, 0.0, 0.0));
    EXPECT_TRUE(AllClose(label, out, Reference(sum, w, s.t, s.d), kAtol, kRtol));
  }
}

TEST(AddRmsNormTest, OutMayAliasX) {
  const int64_t t = 3, d = 20;
  std::mt19937 rng(kSeed);
  std::vector<float> x = RandomFloats(static_cast<size_t>(t * d), rng);
  std::vector<float> r1 = RandomFloats(static_cast<size_t>(t * d), rng), r2 = r1;
  std::vector<float> w = RandomFloats(static_cast<size_t>(d), rng);
  std::vector<float> x2 = x, out(x.size());
  Tensor wt(w.data(), DType::kF32, {d});
  Tensor xt(x.data(), DType::kF32, {t, d}), r1t(r1.data(), DType::kF32, {t, d});
  Tensor ot(out.data(), DType::kF32, {t, d});
  ASSERT_TRUE(AddRmsNorm(xt, r1t, wt, kEps, ot).ok());
  Tensor x2t(x2.data(), DType::kF32, {t, d}), r2t(r2.data(), DType::kF32, {t, d});
  ASSERT_TRUE(AddRmsNorm(x2t, r2t, wt, kEps, x2t).ok());
  EXPECT_EQ(x2, out);
  EXPECT_EQ(r2, r1);
}

TEST(NormErrorTest, RejectsBadArguments) {
  std::vector<float> a(4 * 8), b(4 * 8), w(8);
  Tensor x(a.data(), DType::kF32, {4, 8}), out(b.data(), DType::kF32, {4, 8});
  Tensor wt(w.data(), DType::kF32, {8});
  Tensor short_w(w.data(), DType::kF32, {7});
  Tensor bad_out(b.data(), DType::kF32, {4, 7});
  Tensor bf16_x(a.data(), DType::kBF16, {4, 8});
  Tensor cuda_x(a.data(), DType::kF32, {4, 8}, Device::Cuda(0));
  Tensor rank3(a.data(), DType::kF32, {2, 2, 8});
  EXPECT_TRUE(absl::IsInvalidArgument(RmsNorm(x, short_w, kEps, out)));
  EXPECT_TRUE(absl::IsInvalidArgument(RmsNorm(x, wt, kEps, bad_out)));
  EXPECT_TRUE(absl::IsInvalidArgument(RmsNorm(bf16_x, wt, kEps, out)));
  EXPECT_TRUE(absl::IsInvalidArgument(RmsNorm(cuda_x, wt, kEps, out)));
  EXPECT_TRUE(absl::IsInvalidArgument(RmsNorm(rank3, wt, kEps, out)));
  const absl::Status s = RmsNorm(x, short_w, kEps, out);
  EXPECT_NE(std::string(s.message()).find("f32[7]"), std::string::npos) << s;

  Tensor residual(b.data(), DType::kF32, {4, 8});
  EXPECT_TRUE(
      absl::IsInvalidArgument(AddRmsNorm(x, residual, wt, kEps, residual)));  // out == residual
  EXPECT_TRUE(absl::IsInvalidArgument(AddRmsNorm(x, bad_out, wt, kEps, out)));
  EXPECT_TRUE(absl::IsInvalidArgument(AddRmsNorm(x, residual, short_w, kEps, x)));
}

}  // namespace
}  // namespace cleave::kernels
