// Sampler tests: exact checks (validation, RNG golden values, penalties, greedy, logprobs) and
// statistical ones (each filter keeps exactly the expected set, empirical frequencies match
// the renormalised distribution under a chi-square bound). Every random input comes from a
// fixed, printed seed, so a failure reproduces bit for bit.
#include "cleave/kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace cleave::kernels {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kSeed = 20240607;
constexpr int kDraws = 20000;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

SamplingParams Seeded(uint64_t seed) {
  SamplingParams p;
  p.has_seed = true;
  p.seed = seed;
  return p;
}

// Logits whose softmax is `probs`; the offset checks nothing depends on logits being <= 0.
std::vector<float> LogitsFromProbs(const std::vector<double>& probs) {
  std::vector<float> logits;
  for (double p : probs) logits.push_back(p > 0 ? static_cast<float>(std::log(p) + 3.0) : kNegInf);
  return logits;
}

// Sample() clobbers its row, so every call gets a fresh copy.
int32_t SampleToken(const std::vector<float>& logits, SamplerState& state) {
  std::vector<float> row = logits;
  absl::StatusOr<SampleResult> r = Sample(row, state);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->token : -1;
}

std::vector<int> Histogram(const std::vector<float>& logits, const SamplingParams& params,
                           int draws) {
  std::printf("[ sampler ] seed %llu, %d draws\n", static_cast<unsigned long long>(params.seed),
              draws);
  SamplerState state(params, static_cast<int>(logits.size()), 0);
  std::vector<int> counts(logits.size(), 0);
  for (int i = 0; i < draws; ++i) {
    const int32_t t = SampleToken(logits, state);
    if (t >= 0 && t < static_cast<int32_t>(counts.size())) ++counts[t];
  }
  return counts;
}

// Chi-square critical value at alpha = 1e-3 (Wilson-Hilferty; within ~3% of the exact table).
double ChiSquareCritical(int df) {
  const double z = 3.0902;
  const double h = 2.0 / (9.0 * df);
  return df * std::pow(1.0 - h + z * std::sqrt(h), 3.0);
}

// Tokens with expected probability 0 must never appear; the rest must pass Pearson's test.
void ExpectDistribution(const std::vector<int>& counts, const std::vector<double>& expected) {
  ASSERT_EQ(counts.size(), expected.size());
  const double total = std::accumulate(expected.begin(), expected.end(), 0.0);
  const int n = std::accumulate(counts.begin(), counts.end(), 0);
  double chi2 = 0.0, max_abs = 0.0;
  int df = -1;
  for (size_t i = 0; i < counts.size(); ++i) {
    const double p = expected[i] / total;
    if (p == 0.0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " is outside the allowed set";
      continue;
    }
    ++df;
    const double e = p * n;
    chi2 += (counts[i] - e) * (counts[i] - e) / e;
    max_abs = std::max(max_abs, std::abs(counts[i] / static_cast<double>(n) - p));
  }
  std::printf("[ sampler ] chi2 %.3f (df %d, critical %.3f), max |freq - p| %.4f\n", chi2, df,
              df > 0 ? ChiSquareCritical(df) : 0.0, max_abs);
  if (df > 0) {
    EXPECT_LT(chi2, ChiSquareCritical(df));
  }
}

// ---- validation -------------------------------------------------------------------------------

TEST(SamplingValidation, DefaultsAndBoundariesAreAccepted) {
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams{}).ok());
  SamplingParams p;
  p.temperature = 0.0f;
  p.top_k = -1;
  p.top_p = 1.0f;
  p.min_p = 1.0f;
  p.repetition_penalty = 1e-3f;
  p.presence_penalty = -2.0f;
  p.frequency_penalty = 2.0f;
  p.top_logprobs = 20;
  EXPECT_TRUE(ValidateSamplingParams(p).ok());
  p.temperature = 100.0f;
  p.repetition_penalty = 1e6f;
  EXPECT_TRUE(ValidateSamplingParams(p).ok());
}

TEST(SamplingValidation, EachBadFieldIsRejectedByName) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    std::string field;
    std::function<void(SamplingParams&)> set;
  };
  const std::vector<Case> cases = {
      {"temperature", [](SamplingParams& p) { p.temperature = -0.1f; }},
      {"temperature", [](SamplingParams& p) { p.temperature = 100.5f; }},
      {"temperature", [&](SamplingParams& p) { p.temperature = nan; }},
      {"temperature", [&](SamplingParams& p) { p.temperature = inf; }},
      {"top_k", [](SamplingParams& p) { p.top_k = -2; }},
      {"top_p", [](SamplingParams& p) { p.top_p = 0.0f; }},
      {"top_p", [](SamplingParams& p) { p.top_p = 1.01f; }},
      {"top_p", [&](SamplingParams& p) { p.top_p = nan; }},
      {"min_p", [](SamplingParams& p) { p.min_p = -0.1f; }},
      {"min_p", [](SamplingParams& p) { p.min_p = 1.5f; }},
      {"min_p", [&](SamplingParams& p) { p.min_p = nan; }},
      {"repetition_penalty", [](SamplingParams& p) { p.repetition_penalty = 0.0f; }},
      {"repetition_penalty", [](SamplingParams& p) { p.repetition_penalty = -1.0f; }},
      {"repetition_penalty", [&](SamplingParams& p) { p.repetition_penalty = inf; }},
      {"repetition_penalty", [&](SamplingParams& p) { p.repetition_penalty = nan; }},
      {"presence_penalty", [](SamplingParams& p) { p.presence_penalty = 2.5f; }},
      {"presence_penalty", [](SamplingParams& p) { p.presence_penalty = -2.01f; }},
      {"presence_penalty", [&](SamplingParams& p) { p.presence_penalty = nan; }},
      {"frequency_penalty", [](SamplingParams& p) { p.frequency_penalty = 3.0f; }},
      {"frequency_penalty", [](SamplingParams& p) { p.frequency_penalty = -2.5f; }},
      {"frequency_penalty", [&](SamplingParams& p) { p.frequency_penalty = nan; }},
      {"top_logprobs", [](SamplingParams& p) { p.top_logprobs = -1; }},
      {"top_logprobs", [](SamplingParams& p) { p.top_logprobs = 21; }},
  };
  for (const Case& c : cases) {
    SamplingParams p;
    c.set(p);
    const absl::Status s = ValidateSamplingParams(p);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.field));
  }
}

TEST(SamplingValidation, MessageCarriesTheValue) {
  SamplingParams p;
  p.top_p = 1.5f;
  EXPECT_THAT(std::string(ValidateSamplingParams(p).message()), HasSubstr("got 1.5"));
}

TEST(SamplingValidation, SampleRefusesBadParams) {
  SamplingParams p;
  p.top_logprobs = 1000;
  SamplerState state(p, 4, kSeed);
  std::vector<float> logits = {0, 1, 2, 3};
  absl::StatusOr<SampleResult> r = Sample(logits, state);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("top_logprobs"));
}

// ---- RNG --------------------------------------------------------------------------------------

// The first outputs of splitmix64-seeded xoshiro256**, computed by an independent Python
// implementation: the stream must be identical on every platform and compiler.
TEST(SamplerRng, MatchesReferenceStream) {
  struct Golden {
    uint64_t seed;
    std::vector<uint64_t> top53;
  };
  const std::vector<Golden> goldens = {
      {0, {0x133d8be6d96ebeULL, 0x17edc3ef092ac8ULL, 0x34bf093a9267cULL, 0xd54b29e24c5a5ULL}},
      {20240607, {0xc7a1ba56dba83ULL, 0x193be746623a3cULL, 0x7fdb6985a01cfULL, 0x38bc376244459ULL}},
  };
  for (const Golden& g : goldens) {
    SamplerState seeded(Seeded(g.seed), 8, /*fallback_seed=*/999);
    SamplerState fallback(SamplingParams{}, 8, /*fallback_seed=*/g.seed);
    for (uint64_t want : g.top53) {
      const double expected = static_cast<double>(want) * 0x1.0p-53;
      EXPECT_EQ(seeded.NextUniform(), expected) << "seed " << g.seed;
      EXPECT_EQ(fallback.NextUniform(), expected) << "fallback seed " << g.seed;
    }
  }
}

TEST(SamplerRng, UniformStaysInUnitInterval) {
  SamplerState state(Seeded(kSeed), 8, 0);
  double sum = 0.0;
  for (int i = 0; i < 100000; ++i) {
    const double u = state.NextUniform();
    ASSERT_GE(u, 0.0);
    ASSERT_LT(u, 1.0);
    sum += u;
  }
  EXPECT_NEAR(sum / 100000, 0.5, 0.005);
}

std::vector<int32_t> TokenSequence(uint64_t seed, int n) {
  std::vector<float> logits(1000, 0.0f);  // uniform: every draw depends on the stream
  SamplerState state(Seeded(seed), 1000, 0);
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) out.push_back(SampleToken(logits, state));
  return out;
}

TEST(SamplerRng, SameSeedSameTokensDifferentSeedsDiffer) {
  EXPECT_EQ(TokenSequence(kSeed, 200), TokenSequence(kSeed, 200));
  std::set<std::vector<int32_t>> distinct;
  for (uint64_t seed = 1; seed <= 20; ++seed) distinct.insert(TokenSequence(seed, 64));
  EXPECT_EQ(distinct.size(), 20u);
}

// ---- greedy -----------------------------------------------------------------------------------

TEST(SamplerGreedy, ArgmaxWithTiesToLowestId) {
  SamplingParams p;
  p.temperature = 0.0f;
  SamplerState state(p, 6, kSeed);
  EXPECT_EQ(SampleToken({1.0f, 5.0f, 3.0f, 5.0f, kNegInf, 5.0f}, state), 1);
  EXPECT_EQ(SampleToken({kNegInf, -7.0f, -7.0f, kNegInf, -9.0f, -8.0f}, state), 1);
  EXPECT_EQ(SampleToken({0, 0, 0, 0, 0, 0}, state), 0);
}

TEST(SamplerGreedy, PenaltiesStillApply) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.repetition_penalty = 1.5f;  // token 0: 2.0 -> 1.333
  SamplerState state(p, 3, kSeed);
  const std::vector<int32_t> prompt = {0};
  state.ObservePrompt(prompt);
  EXPECT_EQ(SampleToken({2.0f, 1.4f, 0.0f}, state), 1);
  EXPECT_EQ(SampleToken({2.0f, 1.3f, 0.0f}, state), 0);
}

TEST(SamplerGreedy, TopK1EqualsGreedy) {
  std::printf("[ sampler ] seed %llu\n", static_cast<unsigned long long>(kSeed));
  std::mt19937_64 gen(kSeed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int row = 0; row < 200; ++row) {
    std::vector<float> logits(50);
    // Half the rows on a coarse grid, so ties at the top are common.
    for (float& v : logits) v = row % 2 ? std::round(normal(gen)) : normal(gen);
    SamplingParams greedy;
    greedy.temperature = 0.0f;
    SamplerState greedy_state(greedy, 50, 0);
    SamplingParams topk1 = Seeded(kSeed + row);
    topk1.top_k = 1;
    topk1.temperature = 0.7f;
    SamplerState topk1_state(topk1, 50, 0);
    EXPECT_EQ(SampleToken(logits, topk1_state), SampleToken(logits, greedy_state)) << "row " << row;
  }
}

// ---- penalties (hand computed) ----------------------------------------------------------------

struct PenaltyCase {
  float rep, freq, pres;
  std::vector<float> want;
};

// vocab 6; prompt {0, 1, 0}; outputs {2, 2, 3, 1}: token 0 prompt only, token 1 prompt + 1
// output, token 2 two outputs, token 3 one output, tokens 4, 5 unseen.
std::vector<float> Penalised(float rep, float freq, float pres) {
  SamplingParams p;
  p.repetition_penalty = rep;
  p.frequency_penalty = freq;
  p.presence_penalty = pres;
  SamplerState state(p, 6, kSeed);
  const std::vector<int32_t> prompt = {0, 1, 0};
  state.ObservePrompt(prompt);
  for (int32_t t : {2, 2, 3, 1}) state.ObserveOutput(t);
  std::vector<float> logits = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 0.0f};
  EXPECT_TRUE(ApplyPenalties(logits, state).ok());
  return logits;
}

TEST(SamplerPenalties, EachPenaltyMatchesHandComputation) {
  const std::vector<PenaltyCase> cases = {
      // Repetition: positive / 1.25, negative * 1.25, prompt and output alike.
      {1.25f, 0.0f, 0.0f, {1.6f, -1.25f, 0.4f, 2.4f, -2.0f, 0.0f}},
      // Frequency: -= 0.5 * output count; prompt-only tokens untouched.
      {1.0f, 0.5f, 0.0f, {2.0f, -1.5f, -0.5f, 2.5f, -2.0f, 0.0f}},
      // Presence: -= 0.3 once for any output token.
      {1.0f, 0.0f, 0.3f, {2.0f, -1.3f, 0.2f, 2.7f, -2.0f, 0.0f}},
      // Negative presence / frequency reward repeats.
      {1.0f, -0.5f, -0.3f, {2.0f, -0.2f, 1.8f, 3.8f, -2.0f, 0.0f}},
      // All three, repetition first: token 1: -1 * 1.25 - 0.5 - 0.3; token 2: 0.4 - 1.0 - 0.3.
      {1.25f, 0.5f, 0.3f, {1.6f, -2.05f, -0.9f, 1.6f, -2.0f, 0.0f}},
  };
  for (const PenaltyCase& c : cases) {
    const std::vector<float> got = Penalised(c.rep, c.freq, c.pres);
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_NEAR(got[i], c.want[i], 1e-6f)
          << "rep " << c.rep << " freq " << c.freq << " pres " << c.pres << " token " << i;
    }
  }
}

TEST(SamplerPenalties, RepetitionLeavesZeroAndMaskedLogitsAlone) {
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  SamplerState state(p, 3, kSeed);
  const std::vector<int32_t> prompt = {0, 1, 2};
  state.ObservePrompt(prompt);
  std::vector<float> logits = {0.0f, kNegInf, 4.0f};
  ASSERT_TRUE(ApplyPenalties(logits, state).ok());
  EXPECT_EQ(logits[0], 0.0f);
  EXPECT_EQ(logits[1], kNegInf);
  EXPECT_EQ(logits[2], 2.0f);
}

TEST(SamplerPenalties, RejectsWrongRowSize) {
  SamplerState state(SamplingParams{}, 4, kSeed);
  std::vector<float> logits(3, 0.0f);
  EXPECT_EQ(ApplyPenalties(logits, state).code(), absl::StatusCode::kInvalidArgument);
}

// A tiny repetition penalty divides a large logit past FLT_MAX: the sampler must clamp, not
// produce inf - inf = NaN.
TEST(SamplerPenalties, OverflowIsClampedNotNaN) {
  SamplingParams p = Seeded(kSeed);
  p.repetition_penalty = 1e-30f;
  p.logprobs = true;
  SamplerState state(p, 3, 0);
  const std::vector<int32_t> prompt = {1};
  state.ObservePrompt(prompt);
  std::vector<float> logits = {0.0f, 1e10f, 5.0f};
  absl::StatusOr<SampleResult> r = Sample(logits, state);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->token, 1);
  EXPECT_NEAR(r->logprob, 0.0f, 1e-6f);  // raw logits: token 1 already holds all the mass
}

// ---- observation bookkeeping ------------------------------------------------------------------

TEST(SamplerState, BadIdsAreIgnoredAndSeenTokensAreDistinct) {
  SamplerState state(SamplingParams{}, 5, kSeed);
  const std::vector<int32_t> prompt = {3, -1, 5, 3, 1000000, 0};
  state.ObservePrompt(prompt);
  state.ObserveOutput(-7);
  state.ObserveOutput(5);
  state.ObserveOutput(2);
  state.ObserveOutput(3);
  state.ObserveOutput(2);
  EXPECT_EQ(state.seen_tokens(), (std::vector<int32_t>{3, 0, 2}));
  EXPECT_TRUE(state.seen_in_prompt(3));
  EXPECT_FALSE(state.seen_in_prompt(2));
  EXPECT_FALSE(state.seen_in_prompt(-1));
  EXPECT_FALSE(state.seen_in_prompt(5));
  EXPECT_EQ(state.output_count(2), 2u);
  EXPECT_EQ(state.output_count(3), 1u);
  EXPECT_EQ(state.output_count(0), 0u);
  EXPECT_EQ(state.output_count(-7), 0u);
  EXPECT_EQ(state.output_count(5), 0u);
}

// ---- distribution filters (statistical) -------------------------------------------------------

TEST(SamplerDistribution, PlainSamplingMatchesSoftmax) {
  const std::vector<double> probs = {0.4, 0.25, 0.2, 0.1, 0.05};
  ExpectDistribution(Histogram(LogitsFromProbs(probs), Seeded(kSeed), kDraws), probs);
}

TEST(SamplerDistribution, TemperatureSharpensAndFlattens) {
  const std::vector<double> probs = {0.5, 0.3, 0.15, 0.05};
  for (float t : {0.5f, 2.0f, 0.8f}) {
    std::printf("[ sampler ] temperature %.2f\n", t);
    SamplingParams p = Seeded(kSeed);
    p.temperature = t;
    std::vector<double> want;  // softmax(log p / t) = p^(1/t), renormalised
    for (double q : probs) want.push_back(std::pow(q, 1.0 / t));
    ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), want);
  }
}

TEST(SamplerDistribution, TinyTemperatureIsArgmaxWithoutNaN) {
  SamplingParams p = Seeded(kSeed);
  p.temperature = 1e-30f;
  SamplerState state(p, 4, 0);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(SampleToken({1.0f, 3.0f, 2.999f, -50.0f}, state), 1);
  // Extreme finite logits stay finite in the weight arithmetic.
  const float big = std::numeric_limits<float>::max();
  SamplerState state2(Seeded(kSeed), 3, 0);
  EXPECT_EQ(SampleToken({-big, big, 0.0f}, state2), 1);
}

TEST(SamplerDistribution, TopKKeepsTheKBest) {
  const std::vector<double> probs = {0.25, 0.3, 0.1, 0.2, 0.15};
  SamplingParams p = Seeded(kSeed);
  p.top_k = 3;
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), {0.25, 0.3, 0, 0.2, 0});
}

TEST(SamplerDistribution, TopKAtOrAboveVocabIsOff) {
  const std::vector<double> probs = {0.5, 0.3, 0.2};
  SamplingParams p = Seeded(kSeed);
  p.top_k = 3;
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), probs);
  p.top_k = 1000;
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), probs);
}

TEST(SamplerDistribution, TopPKeepsSmallestPrefixReachingP) {
  // Ids shuffled relative to probability so the order comes from the sort, not from the ids.
  const std::vector<double> probs = {0.1, 0.4, 0.2, 0.3};
  SamplingParams p = Seeded(kSeed);
  p.top_p = 0.6f;  // 0.4 < 0.6 <= 0.4 + 0.3
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), {0, 0.4, 0, 0.3});
  p.top_p = 0.75f;  // needs 0.4 + 0.3 + 0.2
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), {0, 0.4, 0.2, 0.3});
  p.top_p = 0.01f;  // always at least one token
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), {0, 1, 0, 0});
}

TEST(SamplerDistribution, MinPDropsTokensBelowFractionOfMax) {
  const std::vector<double> probs = {0.15, 0.5, 0.1, 0.25};
  SamplingParams p = Seeded(kSeed);
  p.min_p = 0.25f;  // threshold 0.125: token 2 (0.1) goes
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), {0.15, 0.5, 0, 0.25});
  p.min_p = 1.0f;  // only the max survives
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), {0, 1, 0, 0});
}

// top-p is measured on the top-k set renormalised: on the raw probabilities 0.35 + 0.25 = 0.6
// would not reach 0.7 and three tokens would stay; after top-k = 3 they are 0.4375 + 0.3125.
TEST(SamplerDistribution, TopPRunsOnTopKSurvivors) {
  const std::vector<double> probs = {0.35, 0.25, 0.2, 0.1, 0.1};
  SamplingParams p = Seeded(kSeed);
  p.top_k = 3;
  p.top_p = 0.7f;
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), {0.35, 0.25, 0, 0, 0});
}

// min-p sees the tempered distribution: at T = 2 the weights are sqrt(p) = .707, .548, .447,
// so min_p 0.7 keeps two tokens; on the untempered row it would keep only the first.
TEST(SamplerDistribution, MinPRunsAfterTemperature) {
  const std::vector<double> probs = {0.5, 0.3, 0.2};
  SamplingParams p = Seeded(kSeed);
  p.temperature = 2.0f;
  p.min_p = 0.7f;
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws),
                     {std::sqrt(0.5), std::sqrt(0.3), 0});
}

TEST(SamplerDistribution, AllFiltersTogether) {
  const std::vector<double> probs = {0.3, 0.05, 0.25, 0.15, 0.1, 0.15};
  SamplingParams p = Seeded(kSeed);
  p.top_k = 5;     // drops token 1; mass 0.95
  p.top_p = 0.8f;  // 0.3 + 0.25 + 0.15 + 0.15 (tie: id 3 before 5) = 0.85 >= 0.76
  p.min_p = 0.6f;  // threshold 0.18 drops tokens 3 and 5
  ExpectDistribution(Histogram(LogitsFromProbs(probs), p, kDraws), {0.3, 0, 0.25, 0, 0, 0});
}

TEST(SamplerDistribution, OnlyAllowedTokensAcrossManySeeds) {
  const std::vector<float> logits = LogitsFromProbs({0.1, 0.4, 0.2, 0.3, 0.0});
  const std::set<int32_t> allowed = {1, 3};
  for (uint64_t seed = 0; seed < 2000; ++seed) {
    SamplingParams p = Seeded(seed);
    p.top_p = 0.6f;
    SamplerState state(p, static_cast<int>(logits.size()), 0);
    const int32_t t = SampleToken(logits, state);
    ASSERT_TRUE(allowed.count(t)) << "seed " << seed << " drew token " << t;
  }
}

// A vocab large enough that top-p's lazy sort needs several rounds to reach the cut.
TEST(SamplerDistribution, TopPCutOnLargeVocab) {
  constexpr int kVocab = 5000;
  std::printf("[ sampler ] seed %llu\n", static_cast<unsigned long long>(kSeed));
  std::vector<float> logits(kVocab);
  std::vector<int32_t> ids(kVocab);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937_64(kSeed));
  for (int rank = 0; rank < kVocab; ++rank) logits[ids[rank]] = -1e-3f * rank;
  // Reference cut in double: rank r is kept while the mass before it is < 0.5.
  double z = 0.0;
  for (float v : logits) z += std::exp(static_cast<double>(v));
  std::set<int32_t> allowed;
  double cum = 0.0;
  for (int rank = 0; rank < kVocab && cum < 0.5 * z; ++rank) {
    allowed.insert(ids[rank]);
    cum += std::exp(static_cast<double>(logits[ids[rank]]));
  }
  SamplingParams p = Seeded(kSeed);
  p.top_p = 0.5f;
  SamplerState state(p, kVocab, 0);
  int worst_rank = 0;
  std::vector<int> rank_of(kVocab);
  for (int rank = 0; rank < kVocab; ++rank) rank_of[ids[rank]] = rank;
  for (int i = 0; i < 5000; ++i) {
    const int32_t t = SampleToken(logits, state);
    ASSERT_TRUE(allowed.count(t)) << "token " << t << " at rank " << rank_of[t];
    worst_rank = std::max(worst_rank, rank_of[t]);
  }
  std::printf("[ sampler ] kept %zu of %d, worst drawn rank %d\n", allowed.size(), kVocab,
              worst_rank);
  EXPECT_GT(worst_rank, static_cast<int>(allowed.size()) * 9 / 10);  // the tail is reachable
}

// The kept set of top-k -> top-p -> min-p by the textbook method (full sort, double weights).
std::set<int32_t> ReferenceKeptSet(const std::vector<float>& logits, const SamplingParams& p) {
  std::vector<int32_t> order;
  for (size_t i = 0; i < logits.size(); ++i) {
    if (logits[i] != kNegInf) order.push_back(static_cast<int32_t>(i));
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  if (p.top_k > 0 && static_cast<size_t>(p.top_k) < order.size()) order.resize(p.top_k);
  const double max = logits[order[0]];
  std::vector<double> w;
  for (int32_t id : order) w.push_back(std::exp((logits[id] - max) / p.temperature));
  const double total = std::accumulate(w.begin(), w.end(), 0.0);
  double cum = 0.0;
  std::set<int32_t> kept;
  for (size_t i = 0; i < order.size(); ++i) {
    if (w[i] >= p.min_p) kept.insert(order[i]);
    cum += w[i];
    if (cum >= p.top_p * static_cast<double>(total)) break;
  }
  return kept;
}

// The selection-based filters against the reference on random rows and parameter mixes.
TEST(SamplerDistribution, FiltersMatchSortBasedReference) {
  constexpr int kVocab = 2000;
  std::printf("[ sampler ] seed %llu\n", static_cast<unsigned long long>(kSeed));
  std::mt19937_64 gen(kSeed);
  const std::vector<float> sds = {0.5f, 2.0f, 5.0f};
  const std::vector<int> top_ks = {0, 5, 100, 1500};
  const std::vector<float> top_ps = {1.0f, 0.5f, 0.9f, 0.99f};
  const std::vector<float> min_ps = {0.0f, 0.01f, 0.2f};
  const std::vector<float> temperatures = {0.3f, 1.0f, 1.7f};
  size_t total_kept = 0;
  for (int row = 0; row < 300; ++row) {
    std::normal_distribution<float> normal(0.0f, sds[row % sds.size()]);
    std::vector<float> logits(kVocab);
    for (float& v : logits) v = normal(gen);
    for (int i = 0; i < 50; ++i) logits[gen() % kVocab] = kNegInf;
    SamplingParams p = Seeded(kSeed + row);
    p.top_k = top_ks[gen() % top_ks.size()];
    p.top_p = top_ps[gen() % top_ps.size()];
    p.min_p = min_ps[gen() % min_ps.size()];
    p.temperature = temperatures[gen() % temperatures.size()];
    const std::set<int32_t> kept = ReferenceKeptSet(logits, p);
    total_kept += kept.size();
    SamplerState state(p, kVocab, 0);
    for (int i = 0; i < 50; ++i) {
      const int32_t t = SampleToken(logits, state);
      ASSERT_TRUE(kept.count(t)) << "row " << row << " top_k " << p.top_k << " top_p " << p.top_p
                                 << " min_p " << p.min_p << " T " << p.temperature << ": token "
                                 << t << " outside the " << kept.size() << "-token reference set";
    }
  }
  std::printf("[ sampler ] 300 rows, mean reference set size %.1f\n", total_kept / 300.0);
}

TEST(SamplerDistribution, MaskedTokensNeverDrawn) {
  SamplingParams p = Seeded(kSeed);
  ExpectDistribution(Histogram({0.0f, kNegInf, 0.0f, kNegInf}, p, 4000), {1, 0, 1, 0});
}

// ---- logprobs ---------------------------------------------------------------------------------

std::vector<double> ReferenceLogSoftmax(const std::vector<float>& logits) {
  double max = -std::numeric_limits<double>::infinity();
  for (float v : logits) max = std::max(max, static_cast<double>(v));
  double sum = 0.0;
  for (float v : logits) sum += std::exp(v - max);
  std::vector<double> out;
  for (float v : logits) out.push_back(v - max - std::log(sum));
  return out;
}

// Logprobs are of the raw row even while penalties, temperature and top-k shape the draw.
TEST(SamplerLogprobs, MatchReferenceLogSoftmaxOfRawLogits) {
  constexpr int kVocab = 1000;
  std::printf("[ sampler ] seed %llu\n", static_cast<unsigned long long>(kSeed));
  std::mt19937_64 gen(kSeed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  SamplingParams p = Seeded(kSeed);
  p.temperature = 0.7f;
  p.top_k = 50;
  p.repetition_penalty = 1.3f;
  p.frequency_penalty = 0.4f;
  p.presence_penalty = 0.2f;
  p.logprobs = true;
  p.top_logprobs = 5;
  SamplerState state(p, kVocab, 0);
  std::vector<int32_t> prompt(30);
  for (int32_t& t : prompt) t = static_cast<int32_t>(gen() % kVocab);
  state.ObservePrompt(prompt);
  double max_err = 0.0;
  for (int step = 0; step < 30; ++step) {
    std::vector<float> logits(kVocab);
    for (float& v : logits) v = normal(gen);
    const std::vector<double> ref = ReferenceLogSoftmax(logits);
    std::vector<int32_t> order(kVocab);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    std::vector<float> row = logits;
    absl::StatusOr<SampleResult> r = Sample(row, state);
    ASSERT_TRUE(r.ok()) << r.status();
    max_err = std::max(max_err, std::abs(r->logprob - ref[r->token]));
    EXPECT_NEAR(r->logprob, ref[r->token], 1e-5) << "step " << step;
    ASSERT_EQ(r->top.size(), 5u);
    for (size_t i = 0; i < r->top.size(); ++i) {
      EXPECT_EQ(r->top[i].token, order[i]) << "step " << step << " rank " << i;
      EXPECT_NEAR(r->top[i].logprob, ref[order[i]], 1e-5);
      max_err = std::max(max_err, std::abs(r->top[i].logprob - ref[order[i]]));
    }
    state.ObserveOutput(r->token);
  }
  std::printf("[ sampler ] logprob max abs err %.3g (atol 1e-5)\n", max_err);
}

TEST(SamplerLogprobs, TopLogprobsTiesGoToLowestId) {
  SamplingParams p;
  p.temperature = 0.0f;
  p.top_logprobs = 4;  // without p.logprobs: the chosen logprob is still filled
  SamplerState state(p, 5, kSeed);
  std::vector<float> logits = {1.0f, 3.0f, 3.0f, 2.0f, 3.0f};
  const std::vector<double> ref = ReferenceLogSoftmax(logits);
  absl::StatusOr<SampleResult> r = Sample(logits, state);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->token, 1);
  EXPECT_NEAR(r->logprob, ref[1], 1e-6);
  ASSERT_EQ(r->top.size(), 4u);
  const std::vector<int32_t> want = {1, 2, 4, 3};
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(r->top[i].token, want[i]);
    EXPECT_NEAR(r->top[i].logprob, ref[want[i]], 1e-6);
  }
}

TEST(SamplerLogprobs, MoreAlternativesThanVocabAndNoneRequested) {
  SamplingParams p = Seeded(kSeed);
  p.top_logprobs = 20;
  SamplerState state(p, 3, 0);
  std::vector<float> logits = {0.0f, kNegInf, 1.0f};
  absl::StatusOr<SampleResult> r = Sample(logits, state);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->top.size(), 3u);
  EXPECT_EQ(r->top[0].token, 2);
  EXPECT_EQ(r->top[1].token, 0);
  EXPECT_EQ(r->top[2].token, 1);
  EXPECT_EQ(r->top[2].logprob, kNegInf);

  SamplerState plain(Seeded(kSeed), 3, 0);
  std::vector<float> logits2 = {0.0f, 0.5f, 1.0f};
  absl::StatusOr<SampleResult> r2 = Sample(logits2, plain);
  ASSERT_TRUE(r2.ok());
  EXPECT_TRUE(r2->top.empty());
  EXPECT_EQ(r2->logprob, 0.0f);
}

// ---- bad rows ---------------------------------------------------------------------------------

TEST(SamplerBadRows, NaNAndPositiveInfinityAreRejected) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  for (float temperature : {0.0f, 1.0f}) {
    SamplingParams p = Seeded(kSeed);
    p.temperature = temperature;
    SamplerState state(p, 4, 0);
    std::vector<float> with_nan = {0.0f, 1.0f, nan, 2.0f};
    absl::StatusOr<SampleResult> r = Sample(with_nan, state);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("NaN at token 2"));
    std::vector<float> with_inf = {inf, 1.0f, 0.0f, 2.0f};
    r = Sample(with_inf, state);
    ASSERT_FALSE(r.ok());
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("+inf at token 0"));
  }
}

TEST(SamplerBadRows, FullyMaskedAndWrongSizeAreRejected) {
  for (float temperature : {0.0f, 1.0f}) {
    SamplingParams p = Seeded(kSeed);
    p.temperature = temperature;
    p.logprobs = true;
    SamplerState state(p, 3, 0);
    std::vector<float> masked(3, kNegInf);
    EXPECT_EQ(Sample(masked, state).status().code(), absl::StatusCode::kInvalidArgument);
    std::vector<float> short_row(2, 0.0f);
    EXPECT_EQ(Sample(short_row, state).status().code(), absl::StatusCode::kInvalidArgument);
  }
  SamplerState empty(SamplingParams{}, 0, 0);
  std::vector<float> none;
  EXPECT_EQ(Sample(none, empty).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cleave::kernels
