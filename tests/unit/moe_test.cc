// MoeRoute, MoeExperts and SigmoidGatedAdd against plain loops written here: a double-precision
// softmax / top-k / renormalisation by hand, and per token a loop over its k experts computing
// silu(x·gate) * (x·up) then ·down. Shapes cover T = 1, k = 1, k = E, uneven expert loads,
// experts that receive no token, f32 / bf16 / f16 expert weights and renormalisation on and off.
// Separately: tie order, routing stats, batch invariance (bitwise), buffer reuse, non-finite
// logits and argument errors.
#include "cleave/kernels/moe.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/gemm.h"
#include "unit/kernel_test_util.h"

namespace cleave::kernels {
namespace {

using testing_util::AllClose;
using testing_util::kSeed;
using testing_util::RandomFloats;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Softmax in f32 against double: a few ulp of the probabilities.
constexpr double kWeightAtol = 1e-6;
constexpr double kWeightRtol = 1e-5;
// Three f32 GEMMs (K = D, D, F) with f32 intermediates, then up to k weighted adds; activations
// are O(1), so the error grows with D + F. Measured max_abs is 5x or more below this.
double ExpertsAtol(int64_t d, int64_t f) { return 1e-6 + 1e-8 * static_cast<double>(d + f); }
constexpr double kExpertsRtol = 1e-5;

// ------------------------------------------------------------------------------------------------
// Reference

struct RefRouting {
  std::vector<int32_t> ids;
  std::vector<double> weights;
  std::vector<int32_t> offsets;  // [E + 1]
  std::vector<int32_t> slots;    // [T * k], grouped by expert, token order within an expert
};

RefRouting ReferenceRoute(const std::vector<float>& logits, int t, int e, int k, bool renorm) {
  RefRouting r;
  for (int i = 0; i < t; ++i) {
    const float* row = logits.data() + static_cast<size_t>(i) * e;
    double max = row[0];
    for (int x = 1; x < e; ++x) max = std::max(max, static_cast<double>(row[x]));
    std::vector<double> p(static_cast<size_t>(e));
    double sum = 0.0;
    for (int x = 0; x < e; ++x) sum += p[x] = std::exp(row[x] - max);
    for (double& v : p) v /= sum;
    // Top-k by repeated argmax: the first (lowest-id) maximum wins a tie.
    std::vector<bool> taken(static_cast<size_t>(e), false);
    double top_sum = 0.0;
    const size_t first = r.ids.size();
    for (int j = 0; j < k; ++j) {
      int best = -1;
      for (int x = 0; x < e; ++x) {
        if (!taken[x] && (best < 0 || p[x] > p[best])) best = x;
      }
      taken[best] = true;
      r.ids.push_back(best);
      r.weights.push_back(p[best]);
      top_sum += p[best];
    }
    if (renorm) {
      for (size_t s = first; s < r.weights.size(); ++s) r.weights[s] /= top_sum;
    }
  }
  r.offsets.assign(static_cast<size_t>(e) + 1, 0);
  for (int x = 0; x < e; ++x) {
    for (size_t s = 0; s < r.ids.size(); ++s) {
      if (r.ids[s] == x) r.slots.push_back(static_cast<int32_t>(s));
    }
    r.offsets[x + 1] = static_cast<int32_t>(r.slots.size());
  }
  return r;
}

// One projection in nn.Linear layout, held in the dtype under test, plus the f32 values the kernel
// multiplies by after widening (the reference uses those, so only arithmetic error is measured).
struct Proj {
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0;
  std::vector<float> f32;
  std::vector<uint16_t> bits;
  std::vector<float> effective;

  Proj(DType dt, int64_t r, int64_t c, std::vector<float> w) : dtype(dt), rows(r), cols(c) {
    if (dt == DType::kBF16) {
      bits = testing_util::ToBf16(w);
      effective = testing_util::FromBf16(bits);
    } else if (dt == DType::kF16) {
      bits = testing_util::ToF16(w);
      effective = testing_util::FromF16(bits);
    } else {
      effective = w;
      f32 = std::move(w);
    }
  }
  Tensor View() {
    void* p =
        dtype == DType::kF32 ? static_cast<void*>(f32.data()) : static_cast<void*>(bits.data());
    return Tensor(p, dtype, {rows, cols});
  }
};

enum class Load {
  kRandom,  // every expert equally likely
  kSkewed,  // expert 0 is first choice of 4 tokens in 5
  kDead,    // experts in the upper half rank below every other: with k <= E/2 they get no token
};

// One MoE layer's inputs: x, router logits and E experts.
struct Problem {
  int t = 0, e = 0, k = 0;
  int64_t d = 0, f = 0;
  std::vector<float> x, logits;
  std::vector<Proj> gate, up, down;

  MoeExpertWeights Weights() {
    MoeExpertWeights w;
    for (int i = 0; i < e; ++i) {
      w.gate.push_back(gate[i].View());
      w.up.push_back(up[i].View());
      w.down.push_back(down[i].View());
    }
    return w;
  }
  Tensor X() { return Tensor(x.data(), DType::kF32, {t, d}); }
  Tensor Logits() { return Tensor(logits.data(), DType::kF32, {t, e}); }
};

// Logits whose per-token values are at least 2/E apart (a random permutation of a jittered grid),
// so the f32 kernel and the double reference cannot disagree on the order; ties are tested apart.
std::vector<float> MakeLogits(int t, int e, Load load, std::mt19937& rng) {
  std::uniform_real_distribution<float> jitter(0.0f, 0.5f);
  std::vector<float> logits(static_cast<size_t>(t) * e);
  std::vector<int> perm(static_cast<size_t>(e));
  for (int i = 0; i < t; ++i) {
    float* row = logits.data() + static_cast<size_t>(i) * e;
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int x = 0; x < e; ++x) row[x] = (perm[x] + jitter(rng)) * (4.0f / e) - 2.0f;
    if (load == Load::kSkewed && i % 5 != 4) row[0] += 8.0f;
    if (load == Load::kDead) {
      for (int x = e / 2; x < e; ++x) row[x] = -30.0f - 0.25f * x;
    }
  }
  return logits;
}

Problem MakeProblem(int t, int e, int k, int64_t d, int64_t f, DType dtype, Load load,
                    uint32_t seed) {
  std::mt19937 rng(seed);
  Problem p{t, e, k, d, f, {}, {}, {}, {}, {}};
  p.x = RandomFloats(static_cast<size_t>(t * d), rng);
  p.logits = MakeLogits(t, e, load, rng);
  // Scaled so that every intermediate stays O(1).
  const float in_scale = 2.0f / std::sqrt(static_cast<float>(d));
  const float out_scale = 2.0f / std::sqrt(static_cast<float>(std::max<int64_t>(f, 1)));
  for (int i = 0; i < e; ++i) {
    p.gate.emplace_back(dtype, f, d,
                        RandomFloats(static_cast<size_t>(f * d), rng, -in_scale, in_scale));
    p.up.emplace_back(dtype, f, d,
                      RandomFloats(static_cast<size_t>(f * d), rng, -in_scale, in_scale));
    p.down.emplace_back(dtype, d, f,
                        RandomFloats(static_cast<size_t>(d * f), rng, -out_scale, out_scale));
  }
  return p;
}

// out[t] = sum_j w[t, j] * down_e(silu(x gate_e) * (x up_e)), e = ids[t, j], all in double.
std::vector<double> ReferenceExperts(const Problem& p, const std::vector<int32_t>& ids,
                                     const std::vector<double>& weights) {
  std::vector<double> out(static_cast<size_t>(p.t * p.d), 0.0), h(static_cast<size_t>(p.f));
  for (int i = 0; i < p.t; ++i) {
    const float* x = p.x.data() + i * p.d;
    for (int j = 0; j < p.k; ++j) {
      const int e = ids[static_cast<size_t>(i) * p.k + j];
      const std::vector<float>& gw = p.gate[e].effective;
      const std::vector<float>& uw = p.up[e].effective;
      const std::vector<float>& dw = p.down[e].effective;
      for (int64_t c = 0; c < p.f; ++c) {
        double g = 0.0, u = 0.0;
        for (int64_t q = 0; q < p.d; ++q) {
          g += static_cast<double>(x[q]) * gw[c * p.d + q];
          u += static_cast<double>(x[q]) * uw[c * p.d + q];
        }
        h[c] = g / (1.0 + std::exp(-g)) * u;
      }
      for (int64_t c = 0; c < p.d; ++c) {
        double o = 0.0;
        for (int64_t q = 0; q < p.f; ++q) o += h[q] * dw[c * p.f + q];
        out[i * p.d + c] += weights[static_cast<size_t>(i) * p.k + j] * o;
      }
    }
  }
  return out;
}

// Route, then run the experts into a NaN-filled out (every element must be written).
absl::Status RunLayer(Problem& p, bool renorm, MoeRouting& routing, MoeWorkspace& ws,
                      std::vector<float>& out) {
  if (absl::Status s = MoeRoute(p.Logits(), p.k, renorm, routing); !s.ok()) return s;
  out.assign(static_cast<size_t>(p.t * p.d), kNaN);
  Tensor ot(out.data(), DType::kF32, {p.t, p.d});
  return MoeExperts(p.X(), routing, p.Weights(), ws, ot);
}

// ------------------------------------------------------------------------------------------------
// Against the reference

struct MoeCase {
  int t, e, k;
  int64_t d, f;
  DType dtype;
  bool renorm;
  Load load;
};

std::string CaseName(const MoeCase& c) {
  const char* load = c.load == Load::kRandom ? "" : c.load == Load::kSkewed ? "_skewed" : "_dead";
  return absl::StrCat("t", c.t, "_e", c.e, "_k", c.k, "_d", c.d, "_f", c.f, "_",
                      std::string(DTypeName(c.dtype)), c.renorm ? "_renorm" : "", load);
}

class MoeTest : public ::testing::TestWithParam<MoeCase> {};

TEST_P(MoeTest, MatchesReference) {
  const MoeCase c = GetParam();
  const uint32_t seed = kSeed + static_cast<uint32_t>(c.t * 7919 + c.e * 131 + c.k * 17 + c.d);
  Problem p = MakeProblem(c.t, c.e, c.k, c.d, c.f, c.dtype, c.load, seed);
  const bool dead_experts = c.load == Load::kDead && c.k <= c.e / 2;
  if (dead_experts) {
    // Never routed to: any of their weights reaching an output would show as NaN.
    for (int x = c.e / 2; x < c.e; ++x) {
      p.gate[x] = Proj(c.dtype, c.f, c.d, std::vector<float>(static_cast<size_t>(c.f * c.d), kNaN));
      p.down[x] = Proj(c.dtype, c.d, c.f, std::vector<float>(static_cast<size_t>(c.f * c.d), kNaN));
    }
  }
  MoeRouting routing;
  MoeWorkspace ws;
  std::vector<float> out;
  ASSERT_TRUE(RunLayer(p, c.renorm, routing, ws, out).ok());

  const RefRouting ref = ReferenceRoute(p.logits, c.t, c.e, c.k, c.renorm);
  EXPECT_EQ(routing.num_tokens, c.t);
  EXPECT_EQ(routing.num_experts, c.e);
  EXPECT_EQ(routing.top_k, c.k);
  EXPECT_EQ(routing.topk_ids, ref.ids);
  EXPECT_TRUE(AllClose("route_" + CaseName(c), routing.topk_weights, ref.weights, kWeightAtol,
                       kWeightRtol));
  EXPECT_EQ(routing.expert_offsets, ref.offsets);
  EXPECT_EQ(routing.permuted_slots, ref.slots);
  int total = 0;
  for (int x = 0; x < c.e; ++x) total += routing.tokens_for_expert(x);
  EXPECT_EQ(total, c.t * c.k);
  if (dead_experts) {
    for (int x = c.e / 2; x < c.e; ++x) EXPECT_EQ(routing.tokens_for_expert(x), 0) << x;
  }
  if (c.load == Load::kSkewed) {
    EXPECT_GE(routing.tokens_for_expert(0), c.t * 4 / 5) << "expert 0 should carry most tokens";
  }

  EXPECT_TRUE(AllClose("experts_" + CaseName(c), out, ReferenceExperts(p, ref.ids, ref.weights),
                       ExpertsAtol(c.d, c.f), kExpertsRtol));
}

std::vector<MoeCase> Cases() {
  constexpr DType kF32 = DType::kF32, kBF16 = DType::kBF16, kF16 = DType::kF16;
  // (t, e, k, d, f): odd d / f leave scalar tails in Linear, SwiGlu and the un-permute; t = 200
  // and the skewed loads give experts >= 32 rows (Linear's packed path); t = 600 routes on
  // several threads; e = 64 leaves most experts without a token.
  return {
      {1, 8, 2, 64, 96, kF32, true, Load::kRandom},
      {1, 8, 2, 64, 96, kBF16, false, Load::kRandom},
      {1, 4, 4, 24, 16, kF32, false, Load::kRandom},
      {5, 4, 1, 33, 40, kF32, false, Load::kRandom},
      {5, 4, 1, 33, 40, kF32, true, Load::kRandom},
      {16, 6, 6, 48, 24, kF32, true, Load::kRandom},
      {16, 6, 6, 48, 24, kBF16, false, Load::kRandom},
      {37, 8, 2, 130, 72, kF32, true, Load::kRandom},
      {37, 8, 2, 130, 72, kBF16, true, Load::kSkewed},
      {64, 16, 4, 64, 128, kF32, false, Load::kRandom},
      {64, 16, 4, 64, 128, kF16, true, Load::kRandom},
      {200, 8, 2, 40, 56, kBF16, true, Load::kSkewed},
      {200, 8, 2, 40, 56, kF32, false, Load::kSkewed},
      {3, 64, 8, 32, 16, kF32, true, Load::kRandom},
      {20, 8, 2, 32, 24, kF32, true, Load::kDead},
      {20, 8, 4, 32, 24, kBF16, false, Load::kDead},
      {9, 6, 5, 17, 9, kF32, true, Load::kDead},  // k > E/2: "dead" experts are chosen after all
      {600, 8, 2, 16, 24, kF32, true, Load::kRandom},
  };
}

INSTANTIATE_TEST_SUITE_P(Shapes, MoeTest, ::testing::ValuesIn(Cases()),
                         [](const auto& info) { return CaseName(info.param); });

// ------------------------------------------------------------------------------------------------
// Routing details

TEST(MoeRouteTest, TiesKeepLowerExpertFirst) {
  // Token 0: all equal. Token 1: three-way tie for first. Token 2: tie straddling the k boundary.
  const int e = 6;
  std::vector<float> logits = {0, 0, 0, 0, 0, 0,  //
                               1, 3, 3, 0, 3, 2,  //
                               4, 1, 2, 2, 2, 0};
  Tensor lt(logits.data(), DType::kF32, {3, e});
  MoeRouting routing;
  ASSERT_TRUE(MoeRoute(lt, 3, false, routing).ok());
  EXPECT_EQ(routing.topk_ids, (std::vector<int32_t>{0, 1, 2, 1, 2, 4, 0, 2, 3}));
  // Tied probabilities are computed the same way, so they are equal bitwise.
  EXPECT_EQ(routing.topk_weights[0], routing.topk_weights[1]);
  EXPECT_EQ(routing.topk_weights[1], routing.topk_weights[2]);
  EXPECT_NEAR(routing.topk_weights[0], 1.0 / 6.0, 1e-7);
  EXPECT_EQ(routing.topk_weights[3], routing.topk_weights[4]);
  EXPECT_EQ(routing.topk_weights[4], routing.topk_weights[5]);
  EXPECT_EQ(routing.topk_weights[7], routing.topk_weights[8]);
  // Each expert's rows in increasing token order; expert 5 unused.
  EXPECT_EQ(routing.expert_offsets, (std::vector<int32_t>{0, 2, 4, 7, 8, 9, 9}));
  EXPECT_EQ(routing.permuted_slots, (std::vector<int32_t>{0, 6, 1, 3, 2, 4, 7, 8, 5}));
  EXPECT_EQ(routing.tokens_for_expert(5), 0);

  ASSERT_TRUE(MoeRoute(lt, 3, true, routing).ok());
  EXPECT_EQ(routing.topk_ids, (std::vector<int32_t>{0, 1, 2, 1, 2, 4, 0, 2, 3}));
  EXPECT_NEAR(routing.topk_weights[0], 1.0 / 3.0, 1e-7);
  EXPECT_NEAR(routing.topk_weights[3] + routing.topk_weights[4] + routing.topk_weights[5], 1.0,
              1e-6);
}

TEST(MoeRouteTest, WeightsAreSortedAndStatsSumToSlots) {
  const int t = 1000, e = 16, k = 4;
  std::mt19937 rng(kSeed);
  std::vector<float> logits = RandomFloats(static_cast<size_t>(t) * e, rng, -3.0f, 3.0f);
  Tensor lt(logits.data(), DType::kF32, {t, e});
  MoeRouting routing;
  ASSERT_TRUE(MoeRoute(lt, k, false, routing).ok());
  std::vector<int> counts(e, 0);
  for (int i = 0; i < t; ++i) {
    float sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      const size_t s = static_cast<size_t>(i) * k + j;
      ASSERT_GE(routing.topk_ids[s], 0);
      ASSERT_LT(routing.topk_ids[s], e);
      ++counts[routing.topk_ids[s]];
      sum += routing.topk_weights[s];
      if (j > 0) {
        EXPECT_GE(routing.topk_weights[s - 1], routing.topk_weights[s]);
      }
    }
    EXPECT_LE(sum, 1.0f + 1e-6f);
  }
  int total = 0;
  for (int x = 0; x < e; ++x) {
    EXPECT_EQ(routing.tokens_for_expert(x), counts[x]) << x;
    total += routing.tokens_for_expert(x);
  }
  EXPECT_EQ(total, t * k);
  EXPECT_EQ(routing.expert_offsets.back(), t * k);
}

TEST(MoeRouteTest, NonFiniteLogitsGiveValidIds) {
  // NaN and infinities must not break the top-k order (nor crash): ids stay in range and the
  // permutation stays consistent, so MoeExperts accepts the routing; only that token's row is NaN.
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> logits = {kNaN, 1,    2,    kNaN,  //
                               inf,  0,    -inf, 1,     //
                               -inf, -inf, -inf, -inf,  //
                               0.5f, -1,   2,    0};
  Tensor lt(logits.data(), DType::kF32, {4, 4});
  MoeRouting routing;
  ASSERT_TRUE(MoeRoute(lt, 2, true, routing).ok());
  for (int32_t id : routing.topk_ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, 4);
  }
  EXPECT_EQ(routing.topk_ids[6], 2);  // the finite token is routed normally
  EXPECT_EQ(routing.topk_ids[7], 0);
  EXPECT_EQ(routing.expert_offsets.back(), 8);

  Problem p = MakeProblem(4, 4, 2, 16, 8, DType::kF32, Load::kRandom, kSeed);
  std::vector<float> out(static_cast<size_t>(4 * 16), kNaN);
  Tensor ot(out.data(), DType::kF32, {4, 16});
  MoeWorkspace ws;
  ASSERT_TRUE(MoeExperts(p.X(), routing, p.Weights(), ws, ot).ok());
  for (int64_t c = 0; c < 16; ++c) EXPECT_TRUE(std::isfinite(out[3 * 16 + c])) << c;
}

TEST(MoeRouteTest, EmptyBatch) {
  MoeRouting routing;
  Tensor lt(nullptr, DType::kF32, {0, 8});
  ASSERT_TRUE(MoeRoute(lt, 2, true, routing).ok());
  EXPECT_EQ(routing.num_tokens, 0);
  EXPECT_EQ(routing.expert_offsets, std::vector<int32_t>(9, 0));
  EXPECT_TRUE(routing.permuted_slots.empty());
  Problem p = MakeProblem(1, 8, 2, 16, 8, DType::kF32, Load::kRandom, kSeed);
  Tensor x(nullptr, DType::kF32, {0, 16}), out(nullptr, DType::kF32, {0, 16});
  MoeWorkspace ws;
  EXPECT_TRUE(MoeExperts(x, routing, p.Weights(), ws, out).ok());
}

// ------------------------------------------------------------------------------------------------
// Batch invariance and reuse

// A token's output row is bitwise the same alone, in a batch of 37, in a sub-batch, and on one
// thread. bf16 weights; the skewed load puts > 32 rows on expert 0 in the full batch (Linear's
// packed path) and 1 row alone; d = 75 leaves vector tails everywhere.
TEST(MoeExpertsTest, BatchInvariant) {
  ASSERT_TRUE(BatchInvariant());
  const int t = 37;
  const int64_t d = 75, f = 40;
  Problem batch = MakeProblem(t, 4, 2, d, f, DType::kBF16, Load::kSkewed, kSeed + 1);
  MoeRouting routing;
  MoeWorkspace ws;
  std::vector<float> full;
  ASSERT_TRUE(RunLayer(batch, true, routing, ws, full).ok());
  ASSERT_GT(routing.tokens_for_expert(0), 32);

  // Rows [begin, end) of the batch as a problem of their own, sharing the weights.
  const auto run_rows = [&](int begin, int end, std::vector<float>& out) {
    Problem sub = batch;
    sub.t = end - begin;
    sub.x.assign(batch.x.begin() + begin * d, batch.x.begin() + end * d);
    sub.logits.assign(batch.logits.begin() + begin * 4, batch.logits.begin() + end * 4);
    MoeRouting r;
    MoeWorkspace w;
    return RunLayer(sub, true, r, w, out);
  };
  const auto same_rows = [&](const std::vector<float>& got, int begin) {
    return std::memcmp(got.data(), full.data() + begin * d, got.size() * sizeof(float)) == 0;
  };
  std::vector<float> part;
  for (int i = 0; i < t; ++i) {
    ASSERT_TRUE(run_rows(i, i + 1, part).ok());
    EXPECT_TRUE(same_rows(part, i)) << "token " << i << " alone differs from its row in the batch";
  }
  ASSERT_TRUE(run_rows(5, 21, part).ok());
  EXPECT_TRUE(same_rows(part, 5)) << "sub-batch [5, 21)";

  SetCpuThreads(1);
  std::vector<float> single;
  const absl::Status st = RunLayer(batch, true, routing, ws, single);
  SetCpuThreads(0);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(std::memcmp(single.data(), full.data(), full.size() * sizeof(float)), 0)
      << "one thread differs from the default pool";
}

// Routing and workspace reused for a smaller call with fewer experts give what fresh ones give.
TEST(MoeExpertsTest, ReusesBuffersAcrossCalls) {
  Problem big = MakeProblem(50, 8, 3, 48, 64, DType::kF32, Load::kRandom, kSeed + 2);
  Problem small = MakeProblem(3, 4, 2, 24, 16, DType::kBF16, Load::kRandom, kSeed + 3);
  MoeRouting routing;
  MoeWorkspace ws;
  std::vector<float> out_big, reused, fresh;
  ASSERT_TRUE(RunLayer(big, false, routing, ws, out_big).ok());
  ASSERT_TRUE(RunLayer(small, true, routing, ws, reused).ok());
  EXPECT_EQ(routing.expert_offsets.size(), 5u);
  EXPECT_EQ(routing.permuted_slots.size(), 6u);
  MoeRouting r2;
  MoeWorkspace w2;
  ASSERT_TRUE(RunLayer(small, true, r2, w2, fresh).ok());
  EXPECT_EQ(std::memcmp(reused.data(), fresh.data(), fresh.size() * sizeof(float)), 0);
}

// Strided x and out rows (views into wider buffers); the padding of out is left alone.
TEST(MoeExpertsTest, StridedRows) {
  const int t = 6;
  const int64_t d = 20, ld = 27;
  Problem p = MakeProblem(t, 4, 2, d, 12, DType::kF32, Load::kRandom, kSeed + 4);
  std::vector<float> xbuf(static_cast<size_t>(t * ld), kNaN),
      obuf(static_cast<size_t>(t * ld), 7.0f);
  for (int i = 0; i < t; ++i) std::copy_n(p.x.begin() + i * d, d, xbuf.begin() + i * ld + 3);
  Tensor x = Tensor(xbuf.data(), DType::kF32, {t, ld}).Narrow(1, 3, d);
  Tensor out = Tensor(obuf.data(), DType::kF32, {t, ld}).Narrow(1, 0, d);
  MoeRouting routing;
  MoeWorkspace ws;
  ASSERT_TRUE(MoeRoute(p.Logits(), 2, true, routing).ok());
  ASSERT_TRUE(MoeExperts(x, routing, p.Weights(), ws, out).ok());
  std::vector<float> packed;
  ASSERT_TRUE(RunLayer(p, true, routing, ws, packed).ok());
  for (int i = 0; i < t; ++i) {
    EXPECT_EQ(std::memcmp(obuf.data() + i * ld, packed.data() + i * d, d * sizeof(float)), 0) << i;
    for (int64_t c = d; c < ld; ++c) EXPECT_EQ(obuf[i * ld + c], 7.0f);
  }
}

// ------------------------------------------------------------------------------------------------
// Argument errors

class FakeCudaStream final : public Stream {
 public:
  Device device() const override { return Device::Cuda(0); }
  absl::Status Synchronize() override { return absl::OkStatus(); }
  void* native_handle() const override { return nullptr; }
};

TEST(MoeRouteTest, RejectsBadArguments) {
  std::vector<float> logits(4 * 8, 0.0f);
  Tensor lt(logits.data(), DType::kF32, {4, 8});
  MoeRouting routing;
  for (int k : {0, -1, 9}) {
    const absl::Status st = MoeRoute(lt, k, true, routing);
    EXPECT_TRUE(absl::IsInvalidArgument(st)) << k << " " << st;
  }
  EXPECT_TRUE(absl::IsInvalidArgument(
      MoeRoute(Tensor(logits.data(), DType::kBF16, {4, 8}), 2, true, routing)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      MoeRoute(Tensor(logits.data(), DType::kF32, {32}), 2, true, routing)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      MoeRoute(Tensor(logits.data(), DType::kF32, {2, 2, 8}), 2, true, routing)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      MoeRoute(Tensor(logits.data(), DType::kF32, {4, 0}), 1, true, routing)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      MoeRoute(Tensor(logits.data(), DType::kF32, {4, 8}, Device::Cuda(0)), 2, true, routing)));
  FakeCudaStream cuda;
  EXPECT_TRUE(absl::IsInvalidArgument(MoeRoute(lt, 2, true, routing, &cuda)));
  // Failed calls leave the routing untouched; a good one fills it.
  EXPECT_EQ(routing.num_tokens, 0);
  EXPECT_TRUE(MoeRoute(lt, 8, true, routing).ok());
  EXPECT_EQ(routing.num_tokens, 4);
}

// One valid MoeExperts call, perturbed one argument at a time.
struct ExpertsArgs {
  Problem p = MakeProblem(5, 4, 2, 16, 8, DType::kF32, Load::kRandom, kSeed + 5);
  std::vector<float> out = std::vector<float>(5 * 16);
  MoeRouting routing;
  MoeWorkspace ws;
  MoeExpertWeights weights = p.Weights();
  std::vector<float> wide = std::vector<float>(8 * 32);  // room for a strided [8, 16] weight
  Tensor x = p.X();
  Tensor ot = Tensor(out.data(), DType::kF32, {5, 16});

  ExpertsArgs() { EXPECT_TRUE(MoeRoute(p.Logits(), 2, true, routing).ok()); }
  absl::Status Run() { return MoeExperts(x, routing, weights, ws, ot); }
};

// Runs `mutate` on a fresh valid call and expects InvalidArgument mentioning `needle`.
template <typename F>
void ExpectRejected(const std::string& label, const std::string& needle, F&& mutate) {
  ExpertsArgs a;
  ASSERT_TRUE(a.Run().ok()) << label << ": the unmutated call must succeed";
  mutate(a);
  const absl::Status st = a.Run();
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << label << ": " << st;
  EXPECT_NE(std::string(st.message()).find(needle), std::string::npos) << label << ": " << st;
}

TEST(MoeExpertsTest, RejectsBadArguments) {
  using A = ExpertsArgs;
  // x and out.
  ExpectRejected("x dtype", "x ", [](A& a) { a.x = Tensor(a.p.x.data(), DType::kBF16, {5, 16}); });
  ExpectRejected("x rank", "x ", [](A& a) { a.x = Tensor(a.p.x.data(), DType::kF32, {80}); });
  ExpectRejected("x width", "out", [](A& a) { a.x = Tensor(a.p.x.data(), DType::kF32, {5, 15}); });
  ExpectRejected("x on cuda", "cuda", [](A& a) {
    a.x = Tensor(a.p.x.data(), DType::kF32, {5, 16}, Device::Cuda(0));
  });
  ExpectRejected("out shape", "out", [](A& a) {
    a.ot = Tensor(a.out.data(), DType::kF32, {5, 15});
  });
  ExpectRejected("out rows", "out", [](A& a) {
    a.ot = Tensor(a.out.data(), DType::kF32, {4, 16});
  });
  ExpectRejected("out aliases x", "alias", [](A& a) { a.ot = a.x; });
  ExpectRejected("x has fewer tokens than routing", "routing is for 5 tokens", [](A& a) {
    a.x = a.x.Slice0(0, 4);
    a.ot = a.ot.Slice0(0, 4);
  });
  // Expert weights.
  ExpectRejected("mismatched expert counts", "3 up", [](A& a) { a.weights.up.pop_back(); });
  ExpectRejected("no experts", "weights hold 0", [](A& a) { a.weights = MoeExpertWeights{}; });
  ExpectRejected("routing over other experts", "over 4 experts", [](A& a) {
    a.weights.gate.pop_back();
    a.weights.up.pop_back();
    a.weights.down.pop_back();
  });
  ExpectRejected("gate shape", "weights.gate[2]", [](A& a) {
    a.weights.gate[2] = a.p.gate[2].View().Reshape({4, 32});
  });
  ExpectRejected("down shape", "weights.down[1]",
                 [](A& a) { a.weights.down[1] = a.p.gate[1].View(); });
  ExpectRejected("other F", "weights.up[3]",
                 [](A& a) { a.weights.up[3] = a.p.up[3].View().Slice0(0, 7); });
  ExpectRejected("weight dtype", "f32, bf16 or f16", [](A& a) {
    a.weights.down[0] = Tensor(a.p.down[0].f32.data(), DType::kI32, {16, 8});
  });
  ExpectRejected("weight not contiguous", "contiguous", [](A& a) {
    a.weights.gate[0] = Tensor(a.wide.data(), DType::kF32, {8, 32}).Narrow(1, 0, 16);
  });
  // Routing: top_k, ids, the permutation and the buffers' sizes.
  ExpectRejected("top_k 0", "top_k 0", [](A& a) { a.routing.top_k = 0; });
  ExpectRejected("top_k > E", "top_k 5", [](A& a) { a.routing.top_k = 5; });
  ExpectRejected("expert id out of range", "chose expert", [](A& a) { a.routing.topk_ids[3] = 4; });
  ExpectRejected("expert id negative", "chose expert", [](A& a) { a.routing.topk_ids[0] = -1; });
  ExpectRejected("duplicate slot", "",
                 [](A& a) { a.routing.permuted_slots[1] = a.routing.permuted_slots[0]; });
  ExpectRejected("slot out of range", "is not a slot",
                 [](A& a) { a.routing.permuted_slots[0] = 10; });
  ExpectRejected("offsets end", "expert_offsets",
                 [](A& a) { a.routing.expert_offsets.back() = 9; });
  ExpectRejected("offsets decrease", "", [](A& a) {
    a.routing.expert_offsets[1] = 10;
    a.routing.expert_offsets[2] = 0;
  });
  ExpectRejected("short buffers", "sizes", [](A& a) { a.routing.topk_weights.pop_back(); });
  ExpectRejected("routing never filled", "routing", [](A& a) { a.routing = MoeRouting{}; });
}

TEST(MoeExpertsTest, RejectsForeignStream) {
  ExpertsArgs a;
  FakeCudaStream cuda;
  const absl::Status st = MoeExperts(a.x, a.routing, a.weights, a.ws, a.ot, &cuda);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  auto cpu_stream = CpuBackend().CreateStream();
  ASSERT_TRUE(cpu_stream.ok()) << cpu_stream.status();
  EXPECT_TRUE(MoeExperts(a.x, a.routing, a.weights, a.ws, a.ot, cpu_stream->get()).ok());
}

// ------------------------------------------------------------------------------------------------
// SigmoidGatedAdd

TEST(SigmoidGatedAddTest, MatchesReference) {
  const int64_t shapes[][2] = {{1, 1}, {1, 9}, {3, 64}, {17, 129}, {300, 72}};
  for (const auto& s : shapes) {
    const int64_t t = s[0], d = s[1];
    std::mt19937 rng(kSeed + static_cast<uint32_t>(t * 1000 + d));
    std::vector<float> g = RandomFloats(static_cast<size_t>(t), rng, -6.0f, 6.0f);
    if (t >= 3) {
      g[0] = -100.0f;  // sigmoid saturates to 0 and 1; exp overflows to inf on the way
      g[1] = 100.0f;
      g[2] = 0.0f;
    }
    std::vector<float> y = RandomFloats(static_cast<size_t>(t * d), rng);
    std::vector<float> out = RandomFloats(static_cast<size_t>(t * d), rng);
    std::vector<double> want(out.size());
    for (int64_t i = 0; i < t; ++i) {
      const double sig = 1.0 / (1.0 + std::exp(-static_cast<double>(g[i])));
      for (int64_t c = 0; c < d; ++c) want[i * d + c] = out[i * d + c] + sig * y[i * d + c];
    }
    Tensor gt(g.data(), DType::kF32, {t, 1}), yt(y.data(), DType::kF32, {t, d});
    Tensor ot(out.data(), DType::kF32, {t, d});
    ASSERT_TRUE(SigmoidGatedAdd(gt, yt, ot).ok());
    EXPECT_TRUE(AllClose(absl::StrCat("sigmoid_gated_add_t", t, "_d", d), out, want, 1e-6, 1e-6));
  }
}

TEST(SigmoidGatedAddTest, StridedRows) {
  const int64_t t = 4, d = 10, ld = 13;
  std::mt19937 rng(kSeed);
  std::vector<float> gbuf = RandomFloats(static_cast<size_t>(t * 2), rng);
  std::vector<float> ybuf = RandomFloats(static_cast<size_t>(t * ld), rng);
  std::vector<float> obuf(static_cast<size_t>(t * ld), 1.0f);
  Tensor gt = Tensor(gbuf.data(), DType::kF32, {t, 2}).Narrow(1, 1, 1);
  Tensor yt = Tensor(ybuf.data(), DType::kF32, {t, ld}).Narrow(1, 2, d);
  Tensor ot = Tensor(obuf.data(), DType::kF32, {t, ld}).Narrow(1, 0, d);
  ASSERT_TRUE(SigmoidGatedAdd(gt, yt, ot).ok());
  std::vector<float> got;
  std::vector<double> want;
  for (int64_t i = 0; i < t; ++i) {
    const double sig = 1.0 / (1.0 + std::exp(-static_cast<double>(gbuf[i * 2 + 1])));
    for (int64_t c = 0; c < d; ++c) {
      got.push_back(obuf[i * ld + c]);
      want.push_back(1.0 + sig * ybuf[i * ld + 2 + c]);
    }
    for (int64_t c = d; c < ld; ++c) EXPECT_EQ(obuf[i * ld + c], 1.0f);
  }
  EXPECT_TRUE(AllClose("sigmoid_gated_add_strided", got, want, 1e-6, 1e-6));
}

TEST(SigmoidGatedAddTest, RejectsBadArguments) {
  std::vector<float> g(8), y(4 * 8), out(4 * 8);
  Tensor gt(g.data(), DType::kF32, {4, 1}), yt(y.data(), DType::kF32, {4, 8});
  Tensor ot(out.data(), DType::kF32, {4, 8});
  Tensor g_wide(g.data(), DType::kF32, {4, 2}), g_rows(g.data(), DType::kF32, {3, 1});
  Tensor g_flat(g.data(), DType::kF32, {4}), g_bf16(g.data(), DType::kBF16, {4, 1});
  Tensor y_bad(y.data(), DType::kF32, {4, 7}), out_bad(out.data(), DType::kF32, {2, 8});
  EXPECT_TRUE(absl::IsInvalidArgument(SigmoidGatedAdd(g_wide, yt, ot)));
  EXPECT_TRUE(absl::IsInvalidArgument(SigmoidGatedAdd(g_rows, yt, ot)));
  EXPECT_TRUE(absl::IsInvalidArgument(SigmoidGatedAdd(g_flat, yt, ot)));
  EXPECT_TRUE(absl::IsInvalidArgument(SigmoidGatedAdd(g_bf16, yt, ot)));
  EXPECT_TRUE(absl::IsInvalidArgument(SigmoidGatedAdd(gt, y_bad, ot)));
  EXPECT_TRUE(absl::IsInvalidArgument(SigmoidGatedAdd(gt, yt, out_bad)));
  FakeCudaStream cuda;
  EXPECT_TRUE(absl::IsInvalidArgument(SigmoidGatedAdd(gt, yt, ot, &cuda)));
  EXPECT_TRUE(SigmoidGatedAdd(gt, yt, ot).ok());
}

}  // namespace
}  // namespace cleave::kernels
