// Linear against a double-precision plain loop, for f32/bf16/f16 weights, in batch-invariant mode
// (one kernel for every shape) and on the fast paths (GEMV, widened panel + sgemm, OpenBLAS), with
// strided rows, bias, and argument errors. That a row's result does not depend on the batch is
// tested bitwise in batch_invariance_test.cc.
#include "cleave/kernels/gemm.h"

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <limits>
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

// Weights in the dtype under test plus the f32 values the kernel will actually multiply by
// (the reference uses the latter, so only accumulation error is measured).
struct Weights {
  DType dtype;
  std::vector<float> f32;
  std::vector<uint16_t> bits16;
  std::vector<float> effective;

  Weights(DType dt, const std::vector<float>& w) : dtype(dt), f32(w) {
    if (dt == DType::kBF16) {
      bits16 = testing_util::ToBf16(w);
      effective = testing_util::FromBf16(bits16);
    } else if (dt == DType::kF16) {
      bits16 = testing_util::ToF16(w);
      effective = testing_util::FromF16(bits16);
    } else {
      effective = w;
    }
  }
  Tensor View(int64_t n, int64_t k) {
    void* p =
        dtype == DType::kF32 ? static_cast<void*>(f32.data()) : static_cast<void*>(bits16.data());
    return Tensor(p, dtype, {n, k});
  }
};

// y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) in double.
std::vector<double> Reference(const std::vector<float>& x, int64_t ldx, const std::vector<float>& w,
                              const std::vector<float>* bias, int64_t m, int64_t n, int64_t k) {
  std::vector<double> y(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = bias != nullptr ? (*bias)[j] : 0.0;
      for (int64_t t = 0; t < k; ++t) acc += static_cast<double>(x[i * ldx + t]) * w[j * k + t];
      y[i * n + j] = acc;
    }
  }
  return y;
}

// f32 accumulation over k terms of size <= 1: the error grows with k (blocked sums keep it far
// below the linear bound; this leaves ample margin while catching any indexing mistake).
double Atol(int64_t k) { return 1e-7 * static_cast<double>(k) + 1e-6; }
constexpr double kRtol = 1e-5;

struct LinearCase {
  int64_t m, n, k;
  DType dtype;
  bool bias;
};

std::string CaseName(const LinearCase& c) {
  return absl::StrCat("m", c.m, "_n", c.n, "_k", c.k, "_", std::string(DTypeName(c.dtype)),
                      c.bias ? "_bias" : "");
}

class LinearTest : public ::testing::TestWithParam<LinearCase> {};

// Runs body(label prefix) in both modes of SetBatchInvariant, then restores the default.
template <typename F>
void ForBothModes(F&& body) {
  for (bool invariant : {true, false}) {
    SCOPED_TRACE(invariant ? "batch-invariant" : "fast paths");
    SetBatchInvariant(invariant);
    body(invariant ? "inv_" : "fast_");
  }
  SetBatchInvariant(true);
}

TEST_P(LinearTest, MatchesReference) {
  const LinearCase c = GetParam();
  ForBothModes([&](const std::string& mode) {
    std::mt19937 rng(kSeed + static_cast<uint32_t>(c.m * 131 + c.n * 7 + c.k));
    std::vector<float> x = RandomFloats(static_cast<size_t>(c.m * c.k), rng);
    Weights w(c.dtype, RandomFloats(static_cast<size_t>(c.n * c.k), rng));
    std::vector<float> bias = RandomFloats(static_cast<size_t>(c.n), rng);
    // NaN everywhere: every output must be written, never accumulated into.
    std::vector<float> y(static_cast<size_t>(c.m * c.n), std::numeric_limits<float>::quiet_NaN());

    Tensor xt(x.data(), DType::kF32, {c.m, c.k});
    Tensor wt = w.View(c.n, c.k);
    Tensor bt(bias.data(), DType::kF32, {c.n});
    Tensor yt(y.data(), DType::kF32, {c.m, c.n});
    ASSERT_TRUE(Linear(xt, wt, c.bias ? &bt : nullptr, yt).ok());

    const std::vector<double> want =
        Reference(x, c.k, w.effective, c.bias ? &bias : nullptr, c.m, c.n, c.k);
    EXPECT_TRUE(AllClose(mode + CaseName(c), y, want, Atol(c.k), kRtol));
  });
}

std::vector<LinearCase> Cases() {
  // (m, n, k): m <= 4 takes the 16-bit GEMV path, larger m the panel path; k = 16400 makes the
  // panel (112 rows) narrower than n = 300 so several panels and a ragged last one are
  // exercised; odd k leaves a scalar tail after the 8-wide loop; n % 4 != 0 leaves single
  // weight rows.
  const std::vector<std::array<int64_t, 3>> shapes = {
      {1, 1, 1},     {1, 7, 63},    {1, 129, 1000}, {1, 300, 4100}, {2, 7, 129},
      {3, 63, 7},    {4, 129, 63},  {5, 63, 129},   {7, 300, 4100}, {7, 300, 16400},
      {63, 129, 63}, {129, 7, 129}, {17, 1, 1}};
  std::vector<LinearCase> cases;
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (const auto& s : shapes) {
      for (bool bias : {false, true}) cases.push_back({s[0], s[1], s[2], dt, bias});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Shapes, LinearTest, ::testing::ValuesIn(Cases()),
                         [](const ::testing::TestParamInfo<LinearCase>& info) {
                           return CaseName(info.param);
                         });

// x and y as column windows of wider buffers (row stride > k / n); the padding must survive.
TEST(LinearStridedTest, RowStridesRespected) {
  ForBothModes([](const std::string& mode) {
    constexpr float kPad = 12345.0f;
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
      for (int64_t m : {1, 3, 9}) {
        const int64_t n = 37, k = 45, ldx = 64, ldy = 50;
        std::mt19937 rng(kSeed + static_cast<uint32_t>(m));
        std::vector<float> x = RandomFloats(static_cast<size_t>(m * ldx), rng);
        Weights w(dt, RandomFloats(static_cast<size_t>(n * k), rng));
        std::vector<float> bias = RandomFloats(static_cast<size_t>(n), rng);
        std::vector<float> y(static_cast<size_t>(m * ldy), kPad);

        Tensor xt = Tensor(x.data(), DType::kF32, {m, ldx}).Narrow(1, 3, k);
        Tensor yt = Tensor(y.data(), DType::kF32, {m, ldy}).Narrow(1, 5, n);
        Tensor wt = w.View(n, k);
        Tensor bt(bias.data(), DType::kF32, {n});
        ASSERT_TRUE(Linear(xt, wt, &bt, yt).ok());

        std::vector<float> x_packed(static_cast<size_t>(m * k));
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < k; ++j) x_packed[i * k + j] = x[i * ldx + 3 + j];
        const std::vector<double> want = Reference(x_packed, k, w.effective, &bias, m, n, k);
        std::vector<float> got(static_cast<size_t>(m * n));
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < ldy; ++j) {
            if (j >= 5 && j < 5 + n) {
              got[i * n + j - 5] = y[i * ldy + j];
            } else {
              ASSERT_EQ(y[i * ldy + j], kPad) << "padding overwritten at row " << i << " col " << j;
            }
          }
        }
        EXPECT_TRUE(AllClose(absl::StrCat(mode, "strided_m", m, "_", std::string(DTypeName(dt))),
                             got, want, Atol(k), kRtol));
      }
    }
  });
}

TEST(LinearEdgeTest, EmptyReductionGivesBias) {
  std::vector<float> bias = {1.5f, -2.0f, 3.0f};
  std::vector<float> y(6, std::numeric_limits<float>::quiet_NaN());
  Tensor x(nullptr, DType::kF32, {2, 0});
  Tensor w(nullptr, DType::kBF16, {3, 0});
  Tensor b(bias.data(), DType::kF32, {3});
  Tensor yt(y.data(), DType::kF32, {2, 3});
  ASSERT_TRUE(Linear(x, w, &b, yt).ok());
  EXPECT_EQ(y, (std::vector<float>{1.5f, -2.0f, 3.0f, 1.5f, -2.0f, 3.0f}));
  ASSERT_TRUE(Linear(x, w, nullptr, yt).ok());
  EXPECT_EQ(y, std::vector<float>(6, 0.0f));
}

TEST(LinearEdgeTest, NoRowsIsANoOp) {
  std::vector<float> w(12, 1.0f);
  Tensor x(nullptr, DType::kF32, {0, 4});
  Tensor wt(w.data(), DType::kF32, {3, 4});
  Tensor y(nullptr, DType::kF32, {0, 3});
  EXPECT_TRUE(Linear(x, wt, nullptr, y).ok());
}

class LinearErrorTest : public ::testing::Test {
 protected:
  std::vector<float> xs = std::vector<float>(2 * 8);
  std::vector<float> ws = std::vector<float>(3 * 8);
  std::vector<float> ys = std::vector<float>(2 * 3);
  std::vector<float> bs = std::vector<float>(3);
  Tensor x{xs.data(), DType::kF32, {2, 8}};
  Tensor w{ws.data(), DType::kF32, {3, 8}};
  Tensor y{ys.data(), DType::kF32, {2, 3}};
  Tensor b{bs.data(), DType::kF32, {3}};

  void ExpectInvalid(const Tensor& xx, const Tensor& ww, const Tensor* bb, Tensor yy,
                     const std::string& must_mention) {
    const absl::Status s = Linear(xx, ww, bb, yy);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_NE(std::string(s.message()).find(must_mention), std::string::npos) << s;
  }
};

TEST_F(LinearErrorTest, Accepts) { EXPECT_TRUE(Linear(x, w, &b, y).ok()); }

TEST_F(LinearErrorTest, RejectsBadShapesDtypesAndDevices) {
  ExpectInvalid(Tensor(xs.data(), DType::kF32, {2, 7}), w, nullptr, y, "f32[3, 8]");  // k mismatch
  ExpectInvalid(x, w, nullptr, Tensor(ys.data(), DType::kF32, {3, 2}), "f32[3, 2]");  // y shape
  ExpectInvalid(x, w, nullptr, Tensor(ys.data(), DType::kF32, {6}), "f32[6]");        // y rank
  ExpectInvalid(Tensor(xs.data(), DType::kF32, {2, 2, 4}), w, nullptr, y, "f32[2, 2, 4]");
  Tensor short_bias(bs.data(), DType::kF32, {2});
  ExpectInvalid(x, w, &short_bias, y, "f32[2]");
  ExpectInvalid(Tensor(xs.data(), DType::kBF16, {2, 8}), w, nullptr, y, "bf16[2, 8]");  // x dtype
  ExpectInvalid(x, Tensor(ws.data(), DType::kI32, {3, 8}), nullptr, y, "i32[3, 8]");    // w dtype
  ExpectInvalid(x, w, nullptr, Tensor(ys.data(), DType::kF16, {2, 3}), "f16[2, 3]");    // y dtype
  ExpectInvalid(x, Tensor(ws.data(), DType::kF32, {3, 8}, Device::Cuda(0)), nullptr, y, "cuda:0");
  // w must be contiguous: a column window of a wider matrix is not.
  std::vector<float> wide(3 * 16);
  ExpectInvalid(x, Tensor(wide.data(), DType::kF32, {3, 16}).Narrow(1, 0, 8), nullptr, y,
                "contiguous");
}

}  // namespace
}  // namespace cleave::kernels
