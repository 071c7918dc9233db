// Softmax / LogSoftmax against double-precision loops, with masked (-inf) scores, huge logits,
// in-place use and argument errors.
#include "cleave/kernels/softmax.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "absl/strings/str_cat.h"
#include "unit/kernel_test_util.h"

namespace cleave::kernels {
namespace {

using testing_util::AllClose;
using testing_util::kSeed;
using testing_util::RandomFloats;

constexpr float kInf = std::numeric_limits<float>::infinity();
// Probabilities: vector exp within a few ulp, f32 sums over up to 32K terms.
constexpr double kSoftmaxAtol = 1e-8;
constexpr double kSoftmaxRtol = 2e-5;
// Log-probabilities reach ~|40| here, where one f32 ulp is ~4e-6.
constexpr double kLogAtol = 2e-5;
constexpr double kLogRtol = 1e-6;

struct Ref {
  std::vector<double> prob, log_prob;
};

Ref Reference(const std::vector<float>& x, int64_t r, int64_t c) {
  Ref ref{std::vector<double>(x.size()), std::vector<double>(x.size())};
  for (int64_t i = 0; i < r; ++i) {
    double m = -INFINITY;
    for (int64_t j = 0; j < c; ++j) m = std::max(m, static_cast<double>(x[i * c + j]));
    double sum = 0.0;
    for (int64_t j = 0; j < c; ++j) sum += std::exp(x[i * c + j] - m);
    for (int64_t j = 0; j < c; ++j) {
      ref.prob[i * c + j] = std::exp(x[i * c + j] - m) / sum;
      ref.log_prob[i * c + j] = (x[i * c + j] - m) - std::log(sum);
    }
  }
  return ref;
}

TEST(SoftmaxTest, MatchesReference) {
  const int64_t shapes[][2] = {{1, 1}, {1, 7}, {3, 63}, {7, 129}, {2, 32000}, {129, 257}};
  for (const auto& s : shapes) {
    const int64_t r = s[0], c = s[1];
    std::mt19937 rng(kSeed + static_cast<uint32_t>(r * 100000 + c));
    std::vector<float> x = RandomFloats(static_cast<size_t>(r * c), rng, -20.0f, 20.0f);
    // Mask a scattering of scores (but never a whole row) as attention and sampling do.
    std::bernoulli_distribution mask(0.2);
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 1; j < c; ++j)
        if (mask(rng)) x[i * c + j] = -kInf;
    const Ref ref = Reference(x, r, c);
    std::vector<float> prob(x.size()), log_prob(x.size());
    Tensor xt(x.data(), DType::kF32, {r, c});
    Tensor pt(prob.data(), DType::kF32, {r, c}), lt(log_prob.data(), DType::kF32, {r, c});
    ASSERT_TRUE(Softmax(xt, pt).ok());
    ASSERT_TRUE(LogSoftmax(xt, lt).ok());
    const std::string shape = absl::StrCat("_r", r, "_c", c);
    EXPECT_TRUE(AllClose("softmax" + shape, prob, ref.prob, kSoftmaxAtol, kSoftmaxRtol));
    // -inf log-probabilities must come out as exactly -inf; compare the finite ones.
    std::vector<float> got_finite;
    std::vector<double> want_finite;
    for (size_t i = 0; i < x.size(); ++i) {
      if (x[i] == -kInf) {
        EXPECT_EQ(prob[i], 0.0f);
        EXPECT_EQ(log_prob[i], -kInf);
      } else {
        got_finite.push_back(log_prob[i]);
        want_finite.push_back(ref.log_prob[i]);
      }
    }
    EXPECT_TRUE(AllClose("log_softmax" + shape, got_finite, want_finite, kLogAtol, kLogRtol));

    // In place.
    ASSERT_TRUE(Softmax(xt, xt).ok());
    EXPECT_EQ(x, prob);
  }
}

TEST(SoftmaxTest, HugeLogitsDoNotOverflow) {
  std::vector<float> x = {1e30f, 1e30f, -1e30f, 0.0f, 3e38f, 3e38f, 3e38f, 3e38f, 3e38f};
  std::vector<float> out(x.size());
  Tensor xt(x.data(), DType::kF32, {1, 9}), ot(out.data(), DType::kF32, {1, 9});
  ASSERT_TRUE(Softmax(xt, ot).ok());
  for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], 0.0f) << i;
  for (int i = 4; i < 9; ++i) EXPECT_NEAR(out[i], 0.2f, 1e-7) << i;
}

TEST(SoftmaxTest, FullyMaskedRowIsNaNLikeTorch) {
  for (int64_t c : {3, 8, 19}) {
    std::vector<float> x(static_cast<size_t>(2 * c), -kInf);
    for (int64_t j = 0; j < c; ++j) x[c + j] = static_cast<float>(j);  // row 1 is fine
    std::vector<float> out(x.size());
    Tensor xt(x.data(), DType::kF32, {2, c}), ot(out.data(), DType::kF32, {2, c});
    ASSERT_TRUE(Softmax(xt, ot).ok());
    for (int64_t j = 0; j < c; ++j) EXPECT_TRUE(std::isnan(out[j])) << j;
    double total = 0.0;
    for (int64_t j = 0; j < c; ++j) total += out[c + j];
    EXPECT_NEAR(total, 1.0, 1e-6);
  }
}

TEST(SoftmaxTest, NaNPropagates) {
  std::vector<float> x(17, 1.0f);
  x[11] = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(x.size());
  Tensor xt(x.data(), DType::kF32, {1, 17}), ot(out.data(), DType::kF32, {1, 17});
  ASSERT_TRUE(Softmax(xt, ot).ok());
  for (float v : out) EXPECT_TRUE(std::isnan(v));
}

TEST(SoftmaxTest, StridedRows) {
  const int64_t r = 3, c = 21, ld = 32;
  std::mt19937 rng(kSeed);
  std::vector<float> buf = RandomFloats(static_cast<size_t>(r * ld), rng, -5.0f, 5.0f);
  std::vector<float> out(static_cast<size_t>(r * ld), 4.0f);
  Tensor xt = Tensor(buf.data(), DType::kF32, {r, ld}).Narrow(1, 3, c);
  Tensor ot = Tensor(out.data(), DType::kF32, {r, ld}).Narrow(1, 8, c);
  ASSERT_TRUE(LogSoftmax(xt, ot).ok());
  std::vector<float> packed, got;
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j < c; ++j) {
      packed.push_back(buf[i * ld + 3 + j]);
      got.push_back(out[i * ld + 8 + j]);
    }
    for (int64_t j = 0; j < 8; ++j) EXPECT_EQ(out[i * ld + j], 4.0f);
  }
  EXPECT_TRUE(
      AllClose("log_softmax_strided", got, Reference(packed, r, c).log_prob, kLogAtol, kLogRtol));
}

TEST(SoftmaxTest, RejectsBadArguments) {
  std::vector<float> a(12), b(12);
  Tensor x(a.data(), DType::kF32, {3, 4});
  Tensor transposed_shape(b.data(), DType::kF32, {4, 3});
  EXPECT_TRUE(absl::IsInvalidArgument(Softmax(x, transposed_shape)));
  Tensor bad_dtype(b.data(), DType::kF16, {3, 4});
  Tensor rank1(a.data(), DType::kF32, {12});
  Tensor out(b.data(), DType::kF32, {3, 4});
  EXPECT_TRUE(absl::IsInvalidArgument(Softmax(x, bad_dtype)));
  EXPECT_TRUE(absl::IsInvalidArgument(LogSoftmax(rank1, out)));
  EXPECT_TRUE(absl::IsInvalidArgument(LogSoftmax(Tensor(a.data(), DType::kBF16, {3, 4}), out)));
  EXPECT_TRUE(Softmax(x, out).ok());
}

}  // namespace
}  // namespace cleave::kernels
