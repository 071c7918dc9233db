// Rotary embeddings: inverse frequencies (default, linear, llama3) against transformers' formulas
// recomputed here in double, the cos/sin tables against transformers' f32 angle, ApplyRope
// against a plain loop for both pair layouts, the halves <-> interleaved permutation identity,
// and argument errors.
#include "cleave/kernels/rope.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "unit/kernel_test_util.h"

namespace cleave::kernels {
namespace {

using testing_util::AllClose;
using testing_util::kSeed;
using testing_util::RandomFloats;

// transformers' _compute_default_rope_parameters: 1 / base^(arange(0, dim, 2) / dim).
std::vector<double> DefaultInvFreq(int dim, double base) {
  std::vector<double> f;
  for (int j = 0; j < dim; j += 2) f.push_back(1.0 / std::pow(base, static_cast<double>(j) / dim));
  return f;
}

// transformers' _compute_llama3_parameters, written in its torch.where form (masks over the
// whole vector) rather than the kernel's per-element branches.
std::vector<double> Llama3InvFreq(int dim, double base, double factor, double low_freq_factor,
                                  double high_freq_factor, double old_context_len) {
  const std::vector<double> inv_freq = DefaultInvFreq(dim, base);
  const double low_freq_wavelen = old_context_len / low_freq_factor;
  const double high_freq_wavelen = old_context_len / high_freq_factor;
  std::vector<double> out(inv_freq.size());
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    const double wavelen = 2 * std::numbers::pi / inv_freq[i];
    double llama = wavelen > low_freq_wavelen ? inv_freq[i] / factor : inv_freq[i];
    const double smooth =
        (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
    const double smoothed = (1 - smooth) * llama / factor + smooth * llama;
    const bool is_medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
    out[i] = is_medium ? smoothed : llama;
  }
  return out;
}

// Rounded to f32 and back, as the kernel's contract says.
std::vector<double> RoundToF32(const std::vector<double>& v) {
  std::vector<double> out;
  for (double x : v) out.push_back(static_cast<float>(x));
  return out;
}

// The kernel computes in f32 as transformers does (checked bit for bit against torch below);
// against these double-precision formulas it agrees to a few f32 ulp.
constexpr double kInvFreqAtol = 0.0;
constexpr double kInvFreqRtol = 1e-6;

TEST(RopeInvFreqTest, DefaultMatchesTransformers) {
  for (auto [dim, theta] :
       {std::pair{128, 10000.0}, {128, 500000.0}, {64, 10000.0}, {96, 1e6}, {2, 10000.0}}) {
    RopeConfig c;
    c.rotary_dim = dim;
    c.theta = theta;
    auto got = RopeInvFreq(c);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(AllClose(absl::StrCat("inv_freq_default_d", dim, "_theta", theta), *got,
                         RoundToF32(DefaultInvFreq(dim, theta)), kInvFreqAtol, kInvFreqRtol));
  }
  // Spot values, worked by hand: theta^(-2/128) for theta = 1e4 and 5e5.
  RopeConfig c;
  c.rotary_dim = 128;
  EXPECT_FLOAT_EQ((*RopeInvFreq(c))[1], 0.86596432f);
  c.theta = 500000.0;
  EXPECT_FLOAT_EQ((*RopeInvFreq(c))[1], 0.81461722f);
}

// tests/data/rope_inv_freq.json holds torch's own f32 inv_freq (tools/make_rope_goldens.py).
TEST(RopeInvFreqTest, BitForBitWithTransformers) {
  std::ifstream in("tests/data/rope_inv_freq.json");
  ASSERT_TRUE(in) << "missing tests/data/rope_inv_freq.json";
  const nlohmann::json cases = nlohmann::json::parse(in);
  ASSERT_GE(cases.size(), 8u);
  for (const auto& k : cases) {
    RopeConfig c;
    c.rotary_dim = k.at("dim").get<int>();
    c.theta = k.at("theta").get<double>();
    if (k.contains("scaling")) {
      const auto& sc = k.at("scaling");
      c.factor = sc.at("factor").get<double>();
      if (sc.at("rope_type") == "linear") {
        c.scaling = RopeScaling::kLinear;
      } else {
        c.scaling = RopeScaling::kLlama3;
        c.low_freq_factor = sc.at("low_freq_factor").get<double>();
        c.high_freq_factor = sc.at("high_freq_factor").get<double>();
        c.original_max_position = sc.at("original_max_position_embeddings").get<int>();
      }
    }
    auto got = RopeInvFreq(c);
    ASSERT_TRUE(got.ok()) << got.status();
    const auto want = k.at("inv_freq").get<std::vector<float>>();
    ASSERT_EQ(got->size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ((*got)[i], want[i]) << k.dump().substr(0, 120) << " i=" << i;
    }
  }
}

TEST(RopeInvFreqTest, LinearDividesByFactor) {
  RopeConfig c;
  c.rotary_dim = 128;
  c.scaling = RopeScaling::kLinear;
  c.factor = 4.0;
  auto got = RopeInvFreq(c);
  ASSERT_TRUE(got.ok()) << got.status();
  std::vector<double> want = DefaultInvFreq(128, 10000.0);
  for (double& f : want) f /= 4.0;
  EXPECT_TRUE(AllClose("inv_freq_linear_x4", *got, RoundToF32(want), kInvFreqAtol, kInvFreqRtol));
}

TEST(RopeInvFreqTest, Llama3MatchesTransformers) {
  // Llama 3.1 8B's rope_scaling, plus a variant with a wider smoothing band.
  struct Case {
    double factor, low, high;
    int old_context;
  };
  for (const Case& k : {Case{8.0, 1.0, 4.0, 8192}, Case{32.0, 1.0, 8.0, 4096}}) {
    RopeConfig c;
    c.rotary_dim = 128;
    c.theta = 500000.0;
    c.scaling = RopeScaling::kLlama3;
    c.factor = k.factor;
    c.low_freq_factor = k.low;
    c.high_freq_factor = k.high;
    c.original_max_position = k.old_context;
    auto got = RopeInvFreq(c);
    ASSERT_TRUE(got.ok()) << got.status();
    const std::vector<double> want =
        Llama3InvFreq(128, 500000.0, k.factor, k.low, k.high, k.old_context);
    EXPECT_TRUE(AllClose(absl::StrCat("inv_freq_llama3_f", k.factor, "_ctx", k.old_context), *got,
                         RoundToF32(want), kInvFreqAtol, kInvFreqRtol));
    // All three regimes occur: kept (high frequency), divided (low), and blended in between.
    const std::vector<double> base = DefaultInvFreq(128, 500000.0);
    int kept = 0, divided = 0, blended = 0;
    for (size_t i = 0; i < base.size(); ++i) {
      const float g = (*got)[i];
      if (std::fabs(g - base[i]) <= kInvFreqRtol * base[i]) {
        ++kept;
      } else if (std::fabs(g - base[i] / k.factor) <= kInvFreqRtol * base[i] / k.factor) {
        ++divided;
      } else {
        ++blended;
        EXPECT_LT(g, base[i]);
        EXPECT_GT(g, base[i] / k.factor);
      }
    }
    EXPECT_GT(kept, 0);
    EXPECT_GT(divided, 0);
    EXPECT_GT(blended, 0);
  }
}

TEST(RopeInvFreqTest, RejectsBadConfigs) {
  RopeConfig odd;
  odd.rotary_dim = 7;
  EXPECT_TRUE(absl::IsInvalidArgument(RopeInvFreq(odd).status()));
  RopeConfig zero;
  EXPECT_TRUE(absl::IsInvalidArgument(RopeInvFreq(zero).status()));
  RopeConfig bad_theta;
  bad_theta.rotary_dim = 8;
  bad_theta.theta = 0.0;
  EXPECT_TRUE(absl::IsInvalidArgument(RopeInvFreq(bad_theta).status()));
  RopeConfig bad_linear;
  bad_linear.rotary_dim = 8;
  bad_linear.scaling = RopeScaling::kLinear;
  bad_linear.factor = 0.0;
  EXPECT_TRUE(absl::IsInvalidArgument(RopeInvFreq(bad_linear).status()));
  RopeConfig bad_llama3;
  bad_llama3.rotary_dim = 8;
  bad_llama3.scaling = RopeScaling::kLlama3;
  bad_llama3.factor = 8.0;
  bad_llama3.low_freq_factor = 4.0;
  bad_llama3.high_freq_factor = 4.0;  // empty band: transformers would divide by zero
  EXPECT_TRUE(absl::IsInvalidArgument(RopeInvFreq(bad_llama3).status()));
}

TEST(RopeTablesTest, MatchTransformersF32Angles) {
  RopeConfig c;
  c.rotary_dim = 128;
  c.theta = 500000.0;
  c.scaling = RopeScaling::kLlama3;
  c.factor = 8.0;
  const int64_t positions = 4099, half = 64;
  std::vector<float> cos(static_cast<size_t>(positions * half)), sin(cos.size());
  Tensor ct(cos.data(), DType::kF32, {positions, half}),
      st(sin.data(), DType::kF32, {positions, half});
  ASSERT_TRUE(BuildRopeTables(c, ct, st).ok());
  const std::vector<float> inv_freq = *RopeInvFreq(c);
  std::vector<double> want_cos, want_sin;
  for (int64_t p = 0; p < positions; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      // torch: (inv_freq.float() @ position_ids.float()) in f32, then cos/sin.
      const float angle = static_cast<float>(p) * inv_freq[static_cast<size_t>(i)];
      want_cos.push_back(std::cos(static_cast<double>(angle)));
      want_sin.push_back(std::sin(static_cast<double>(angle)));
    }
  }
  // Correctly rounded f32 of the same angle: within half an ulp of |value| <= 1.
  EXPECT_TRUE(AllClose("rope_cos_table", cos, want_cos, 6e-8, 0.0));
  EXPECT_TRUE(AllClose("rope_sin_table", sin, want_sin, 6e-8, 0.0));
}

TEST(RopeTablesTest, RejectsMismatchedTables) {
  RopeConfig c;
  c.rotary_dim = 8;
  std::vector<float> a(16 * 4), b(16 * 4);
  Tensor cos(a.data(), DType::kF32, {16, 4});
  Tensor sin_wrong(b.data(), DType::kF32, {16, 3});
  Tensor cos_wrong(a.data(), DType::kF32, {8, 8});
  Tensor sin(b.data(), DType::kF32, {16, 4});
  EXPECT_TRUE(absl::IsInvalidArgument(BuildRopeTables(c, cos, sin_wrong)));
  EXPECT_TRUE(absl::IsInvalidArgument(BuildRopeTables(c, cos_wrong, sin)));
  EXPECT_TRUE(BuildRopeTables(c, cos, sin).ok());
}

// Plain-loop rotation in double of one [T, H, D] tensor (contiguous), for both pair layouts.
std::vector<double> ReferenceRotate(const std::vector<float>& x, int64_t t, int64_t h, int64_t d,
                                    int64_t rotary_dim, const std::vector<int32_t>& pos,
                                    const std::vector<float>& cos, const std::vector<float>& sin,
                                    RopeStyle style) {
  const int64_t half = rotary_dim / 2;
  std::vector<double> out(x.begin(), x.end());
  for (int64_t ti = 0; ti < t; ++ti) {
    for (int64_t hi = 0; hi < h; ++hi) {
      const int64_t base = (ti * h + hi) * d;
      for (int64_t i = 0; i < half; ++i) {
        const double c = cos[pos[ti] * half + i], s = sin[pos[ti] * half + i];
        const int64_t a = style == RopeStyle::kHalves ? i : 2 * i;
        const int64_t b = style == RopeStyle::kHalves ? i + half : 2 * i + 1;
        out[base + a] = x[base + a] * c - static_cast<double>(x[base + b]) * s;
        out[base + b] = x[base + b] * c + static_cast<double>(x[base + a]) * s;
      }
    }
  }
  return out;
}

struct Tables {
  int64_t positions, half;
  std::vector<float> cos, sin;
  Tensor cos_t, sin_t;

  Tables(int rotary_dim, int64_t max_positions)
      : positions(max_positions),
        half(rotary_dim / 2),
        cos(static_cast<size_t>(max_positions * half)),
        sin(cos.size()),
        cos_t(cos.data(), DType::kF32, {max_positions, half}),
        sin_t(sin.data(), DType::kF32, {max_positions, half}) {
    RopeConfig c;
    c.rotary_dim = rotary_dim;
    EXPECT_TRUE(BuildRopeTables(c, cos_t, sin_t).ok());
  }
};

// Two f32 products and a sum per element of magnitude <= ~1.4.
constexpr double kRotAtol = 1e-6;
constexpr double kRotRtol = 1e-6;

TEST(ApplyRopeTest, MatchesReferenceBothStyles) {
  struct Case {
    int64_t t, hq, hk, d, rotary_dim;
  };
  const Case cases[] = {{1, 1, 1, 2, 2},   {7, 4, 2, 64, 64}, {63, 2, 1, 128, 128},
                        {5, 3, 1, 63, 32}, {129, 1, 1, 8, 8}, {3, 8, 8, 80, 40}};
  for (RopeStyle style : {RopeStyle::kHalves, RopeStyle::kInterleaved}) {
    for (const Case& k : cases) {
      Tables tables(static_cast<int>(k.rotary_dim), 300);
      std::mt19937 rng(kSeed + static_cast<uint32_t>(k.t * 1000 + k.d));
      std::vector<float> q = RandomFloats(static_cast<size_t>(k.t * k.hq * k.d), rng);
      std::vector<float> kk = RandomFloats(static_cast<size_t>(k.t * k.hk * k.d), rng);
      std::vector<int32_t> pos(static_cast<size_t>(k.t));
      std::uniform_int_distribution<int32_t> pick(0, 299);
      for (int32_t& p : pos) p = pick(rng);
      pos[0] = 299;  // the last table row
      const auto want_q =
          ReferenceRotate(q, k.t, k.hq, k.d, k.rotary_dim, pos, tables.cos, tables.sin, style);
      const auto want_k =
          ReferenceRotate(kk, k.t, k.hk, k.d, k.rotary_dim, pos, tables.cos, tables.sin, style);
      Tensor pt(pos.data(), DType::kI32, {k.t});
      Tensor qt(q.data(), DType::kF32, {k.t, k.hq, k.d}),
          kt(kk.data(), DType::kF32, {k.t, k.hk, k.d});
      ASSERT_TRUE(ApplyRope(pt, tables.cos_t, tables.sin_t, style, qt, kt).ok());
      const std::string label =
          absl::StrCat(style == RopeStyle::kHalves ? "halves" : "interleaved", "_t", k.t, "_h",
                       k.hq, "x", k.hk, "_d", k.d, "_r", k.rotary_dim);
      // Dims past rotary_dim are untouched, so they match the reference (a copy) exactly.
      EXPECT_TRUE(AllClose("rope_q_" + label, q, want_q, kRotAtol, kRotRtol));
      EXPECT_TRUE(AllClose("rope_k_" + label, kk, want_k, kRotAtol, kRotRtol));
    }
  }
}

// Interleaved index 2i holds halves index i and 2i+1 holds i + half (the per-head permutation
// converting checkpoints between the two layouts): rotating a permuted vector with kInterleaved
// must equal permuting the kHalves-rotated one. Dims past rotary_dim stay in place.
TEST(ApplyRopeTest, InterleavedIsPermutedHalves) {
  const int64_t t = 9, h = 3, d = 48, rotary_dim = 32, half = rotary_dim / 2;
  Tables tables(rotary_dim, 64);
  std::mt19937 rng(kSeed);
  std::vector<float> x = RandomFloats(static_cast<size_t>(t * h * d), rng);
  std::vector<int32_t> pos(static_cast<size_t>(t));
  for (int64_t i = 0; i < t; ++i) pos[i] = static_cast<int32_t>(i * 7);
  auto permute = [&](const std::vector<float>& v) {
    std::vector<float> out(v);
    for (int64_t head = 0; head < t * h; ++head) {
      for (int64_t i = 0; i < half; ++i) {
        out[head * d + 2 * i] = v[head * d + i];
        out[head * d + 2 * i + 1] = v[head * d + i + half];
      }
    }
    return out;
  };
  std::vector<float> halves = x, inter = permute(x);
  std::vector<float> k_dummy(static_cast<size_t>(t * d)), k_dummy2(k_dummy);
  Tensor pt(pos.data(), DType::kI32, {t});
  Tensor ht(halves.data(), DType::kF32, {t, h, d}), it(inter.data(), DType::kF32, {t, h, d});
  Tensor k1(k_dummy.data(), DType::kF32, {t, 1, d}), k2(k_dummy2.data(), DType::kF32, {t, 1, d});
  ASSERT_TRUE(ApplyRope(pt, tables.cos_t, tables.sin_t, RopeStyle::kHalves, ht, k1).ok());
  ASSERT_TRUE(ApplyRope(pt, tables.cos_t, tables.sin_t, RopeStyle::kInterleaved, it, k2).ok());
  // Same products in the same order per element, so the results agree exactly.
  EXPECT_EQ(permute(halves), inter);
}

// q and k as head windows of one fused [T, Hq + 2 Hk, D] projection: v must be left alone.
TEST(ApplyRopeTest, StridedHeadsOfFusedQkv) {
  const int64_t t = 6, hq = 4, hk = 2, d = 16;
  Tables tables(static_cast<int>(d), 32);
  std::mt19937 rng(kSeed);
  std::vector<float> qkv = RandomFloats(static_cast<size_t>(t * (hq + 2 * hk) * d), rng);
  const std::vector<float> orig = qkv;
  std::vector<int32_t> pos = {0, 1, 2, 30, 31, 5};
  Tensor all(qkv.data(), DType::kF32, {t, hq + 2 * hk, d});
  Tensor qt = all.Narrow(1, 0, hq), kt = all.Narrow(1, hq, hk);
  Tensor pt(pos.data(), DType::kI32, {t});
  ASSERT_TRUE(ApplyRope(pt, tables.cos_t, tables.sin_t, RopeStyle::kHalves, qt, kt).ok());
  std::vector<float> q_in, k_in, q_out, k_out;
  for (int64_t ti = 0; ti < t; ++ti) {
    for (int64_t hh = 0; hh < hq + 2 * hk; ++hh) {
      for (int64_t i = 0; i < d; ++i) {
        const size_t idx = static_cast<size_t>((ti * (hq + 2 * hk) + hh) * d + i);
        if (hh < hq) {
          q_in.push_back(orig[idx]);
          q_out.push_back(qkv[idx]);
        } else if (hh < hq + hk) {
          k_in.push_back(orig[idx]);
          k_out.push_back(qkv[idx]);
        } else {
          ASSERT_EQ(qkv[idx], orig[idx]) << "v modified at token " << ti << " head " << hh;
        }
      }
    }
  }
  EXPECT_TRUE(
      AllClose("rope_fused_q", q_out,
               ReferenceRotate(q_in, t, hq, d, d, pos, tables.cos, tables.sin, RopeStyle::kHalves),
               kRotAtol, kRotRtol));
  EXPECT_TRUE(
      AllClose("rope_fused_k", k_out,
               ReferenceRotate(k_in, t, hk, d, d, pos, tables.cos, tables.sin, RopeStyle::kHalves),
               kRotAtol, kRotRtol));
}

TEST(ApplyRopeTest, RejectsBadArguments) {
  Tables tables(8, 16);
  std::vector<float> q(2 * 2 * 8, 1.0f), k(2 * 1 * 8, 1.0f);
  const std::vector<float> q0 = q, k0 = k;
  Tensor qt(q.data(), DType::kF32, {2, 2, 8}), kt(k.data(), DType::kF32, {2, 1, 8});
  for (int32_t bad : {16, -1, 1000}) {
    std::vector<int32_t> pos = {3, bad};
    Tensor pt(pos.data(), DType::kI32, {2});
    const absl::Status s = ApplyRope(pt, tables.cos_t, tables.sin_t, RopeStyle::kHalves, qt, kt);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_NE(std::string(s.message()).find(absl::StrCat("positions[1] = ", bad)),
              std::string::npos)
        << s;
    EXPECT_EQ(q, q0);  // nothing rotated before the bad position was found
    EXPECT_EQ(k, k0);
  }
  std::vector<int32_t> pos = {1, 2};
  Tensor pt(pos.data(), DType::kI32, {2});
  // Token count mismatch between positions and q / k.
  Tensor one_token_k(k.data(), DType::kF32, {1, 1, 8});
  EXPECT_TRUE(absl::IsInvalidArgument(
      ApplyRope(pt, tables.cos_t, tables.sin_t, RopeStyle::kHalves, qt, one_token_k)));
  // head_dim below rotary_dim.
  Tensor narrow_q(q.data(), DType::kF32, {2, 4, 4});
  EXPECT_TRUE(absl::IsInvalidArgument(
      ApplyRope(pt, tables.cos_t, tables.sin_t, RopeStyle::kHalves, narrow_q, kt)));
  // q not 3-D, wrong dtypes, mismatched sin.
  Tensor flat_q(q.data(), DType::kF32, {2, 16});
  EXPECT_TRUE(absl::IsInvalidArgument(
      ApplyRope(pt, tables.cos_t, tables.sin_t, RopeStyle::kHalves, flat_q, kt)));
  Tensor i64_pos(pos.data(), DType::kI64, {1});
  EXPECT_TRUE(absl::IsInvalidArgument(
      ApplyRope(i64_pos, tables.cos_t, tables.sin_t, RopeStyle::kHalves, qt, kt)));
  Tensor bf16_q(q.data(), DType::kBF16, {2, 2, 8});
  EXPECT_TRUE(absl::IsInvalidArgument(
      ApplyRope(pt, tables.cos_t, tables.sin_t, RopeStyle::kHalves, bf16_q, kt)));
  Tensor short_sin(tables.sin.data(), DType::kF32, {8, 4});
  EXPECT_TRUE(
      absl::IsInvalidArgument(ApplyRope(pt, tables.cos_t, short_sin, RopeStyle::kHalves, qt, kt)));
  EXPECT_TRUE(ApplyRope(pt, tables.cos_t, tables.sin_t, RopeStyle::kHalves, qt, kt).ok());
}

}  // namespace
}  // namespace cleave::kernels
