// The device sampler (device_sampling.h) against the CPU sampler (sampling.h) on the same logits
// and twin SamplerStates (same params, seeds and observed tokens): every row of every call must
// pick the same token and report the same errors. Logits are well separated (a random
// permutation of evenly spaced values, plus a few raised peaks), so no decision sits on a
// rounding boundary and the tokens are asserted equal exactly.
// Tolerance: logprob and top logprobs within 1e-5 + 1e-6 * |cpu| (both are f32 roundings of
// raw - log_z, with log_z summed in double in a different order); -inf must match -inf.
//
// Built wherever the CUDA toolkit is; run by tests/gpu/run.sh on a machine with a GPU.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/device_sampling.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/sampling.h"
#include "cleave/kernels/tensor.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"

namespace cleave::kernels {
namespace {

using namespace gputest;  // NOLINT: the shared test vocabulary

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row r of [rows, vocab]: a permutation of `spread` * (i / vocab - 1/2), then 4 tokens raised by
// `peak` (distinct offsets, so the peaks stay apart).
std::vector<float> SeparatedLogits(int rows, int vocab, float spread, float peak, uint32_t salt) {
  std::mt19937 rng(Seed() ^ (salt * 0x9e3779b9u));
  std::vector<float> out(static_cast<size_t>(rows) * vocab);
  std::vector<int> perm(vocab);
  for (int r = 0; r < rows; ++r) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    float* row = out.data() + static_cast<size_t>(r) * vocab;
    for (int i = 0; i < vocab; ++i) row[i] = spread * (static_cast<float>(perm[i]) / vocab - 0.5f);
    for (int p = 0; p < 4 && p < vocab; ++p) row[perm[p]] += peak * (1.0f - 0.13f * p);
  }
  return out;
}

struct RowSetup {
  SamplingParams params;
  std::vector<int32_t> prompt;
  std::vector<int32_t> outputs;
  uint64_t fallback_seed = 0;
};

std::unique_ptr<SamplerState> MakeState(const RowSetup& s, int vocab) {
  auto state = std::make_unique<SamplerState>(s.params, vocab, s.fallback_seed);
  state->ObservePrompt(s.prompt);
  for (int32_t t : s.outputs) state->ObserveOutput(t);
  return state;
}

bool Close(float got, float want) {
  if (std::isinf(want)) return got == want;
  return std::fabs(static_cast<double>(got) - want) <= 1e-5 + 1e-6 * std::fabs(want);
}

class CudaSampling : public CudaOps {
 protected:
  // Samples `steps` decode steps of `setups` on `logits` ([rows, vocab] host, row stride `ld`)
  // with both samplers, feeding each step's token back into both states.
  void Compare(const std::vector<float>& logits, int vocab, const std::vector<RowSetup>& setups,
               const std::string& what, int steps = 1, int64_t ld = 0) {
    if (ld == 0) ld = vocab;
    const int rows = static_cast<int>(setups.size());
    ASSERT_GE(logits.size(), static_cast<size_t>((rows - 1) * ld + vocab));
    std::vector<std::unique_ptr<SamplerState>> cpu, dev;
    std::vector<SamplerState*> dev_ptrs;
    for (const RowSetup& s : setups) {
      cpu.push_back(MakeState(s, vocab));
      dev.push_back(MakeState(s, vocab));
      dev_ptrs.push_back(dev.back().get());
    }
    auto d = Upload(backend(), logits);
    const Tensor t = d->View(DType::kF32, {static_cast<int64_t>(logits.size())})
                         .Reshape({static_cast<int64_t>(logits.size() / ld), ld})
                         .Slice0(0, rows)
                         .Narrow(1, 0, vocab);
    for (int step = 0; step < steps; ++step) {
      std::vector<absl::StatusOr<SampleResult>> got(rows);
      ASSERT_TRUE(SampleRows(t, dev_ptrs, std::span(got), nullptr).ok()) << what;
      for (int r = 0; r < rows; ++r) {
        std::vector<float> row(logits.begin() + r * ld, logits.begin() + r * ld + vocab);
        const absl::StatusOr<SampleResult> want = Sample(row, *cpu[r]);
        const std::string where = what + ", step " + std::to_string(step) + ", row " + std::to_string(r) +
                                  " (seed " + std::to_string(Seed()) + ")";
        ASSERT_EQ(got[r].ok(), want.ok()) << where << ": device " << got[r].status() << ", cpu " << want.status();
        if (!want.ok()) {
          EXPECT_EQ(got[r].status(), want.status()) << where;
          continue;
        }
        EXPECT_EQ(got[r]->token, want->token) << where;
        const SamplingParams& p = setups[r].params;
        if (p.logprobs || p.top_logprobs > 0) {
          EXPECT_TRUE(Close(got[r]->logprob, want->logprob))
              << where << ": logprob " << got[r]->logprob << " vs " << want->logprob;
        }
        ASSERT_EQ(got[r]->top.size(), want->top.size()) << where;
        for (size_t i = 0; i < want->top.size(); ++i) {
          EXPECT_EQ(got[r]->top[i].token, want->top[i].token) << where << ", top " << i;
          EXPECT_TRUE(Close(got[r]->top[i].logprob, want->top[i].logprob))
              << where << ", top " << i << ": " << got[r]->top[i].logprob << " vs " << want->top[i].logprob;
        }
        cpu[r]->ObserveOutput(want->token);
        dev[r]->ObserveOutput(want->token);
      }
    }
  }

  // `rows` setups from `make(r)`; seeds differ per row.
  template <typename Make>
  static std::vector<RowSetup> Rows(int rows, Make make) {
    std::vector<RowSetup> out(rows);
    for (int r = 0; r < rows; ++r) {
      out[r].params = make(r);
      out[r].fallback_seed = Seed() * 1000003ull + static_cast<uint64_t>(r);
    }
    return out;
  }
};

constexpr int kVocabs[] = {32000, 512};

TEST_F(CudaSampling, GreedyMatchesCpu) {
  for (int vocab : kVocabs) {
    const auto setups = Rows(64, [](int r) {
      SamplingParams p;
      p.temperature = 0.0f;
      p.logprobs = r % 2 == 0;
      return p;
    });
    Compare(SeparatedLogits(64, vocab, 12.0f, 3.0f, 1), vocab, setups, "greedy V=" + std::to_string(vocab));
  }
}

TEST_F(CudaSampling, TemperatureOnly) {
  for (int vocab : kVocabs) {
    const auto setups = Rows(64, [](int r) {
      SamplingParams p;
      p.temperature = std::array<float, 4>{0.3f, 0.7f, 1.0f, 1.8f}[r % 4];
      return p;
    });
    Compare(SeparatedLogits(64, vocab, 10.0f, 3.0f, 2), vocab, setups, "temperature V=" + std::to_string(vocab), 3);
  }
}

TEST_F(CudaSampling, TopK) {
  for (int vocab : kVocabs) {
    const auto setups = Rows(64, [vocab](int r) {
      SamplingParams p;
      p.temperature = r % 3 == 0 ? 0.5f : 1.0f;
      p.top_k = std::array<int, 8>{1, 2, 5, 50, 400, vocab - 1, vocab, vocab + 7}[r % 8];
      return p;
    });
    Compare(SeparatedLogits(64, vocab, 8.0f, 2.0f, 3), vocab, setups, "top-k V=" + std::to_string(vocab), 3);
  }
}

TEST_F(CudaSampling, TopP) {
  for (int vocab : kVocabs) {
    const auto setups = Rows(64, [](int r) {
      SamplingParams p;
      p.temperature = r % 2 == 0 ? 1.0f : 0.6f;
      p.top_p = std::array<float, 6>{0.05f, 0.3f, 0.6f, 0.9f, 0.99f, 0.999f}[r % 6];
      return p;
    });
    Compare(SeparatedLogits(64, vocab, 8.0f, 2.0f, 4), vocab, setups, "top-p V=" + std::to_string(vocab), 3);
  }
}

TEST_F(CudaSampling, MinP) {
  for (int vocab : kVocabs) {
    const auto setups = Rows(64, [](int r) {
      SamplingParams p;
      p.temperature = r % 2 == 0 ? 1.0f : 1.5f;
      p.min_p = std::array<float, 4>{0.001f, 0.05f, 0.3f, 1.0f}[r % 4];
      return p;
    });
    Compare(SeparatedLogits(64, vocab, 8.0f, 2.0f, 5), vocab, setups, "min-p V=" + std::to_string(vocab), 3);
  }
}

TEST_F(CudaSampling, FiltersCombined) {
  for (int vocab : kVocabs) {
    const auto setups = Rows(64, [](int r) {
      SamplingParams p;
      p.temperature = std::array<float, 3>{0.4f, 1.0f, 2.5f}[r % 3];
      p.top_k = std::array<int, 4>{0, 20, 300, -1}[r % 4];
      p.top_p = std::array<float, 5>{1.0f, 0.95f, 0.7f, 0.5f, 0.2f}[r % 5];
      p.min_p = r % 7 == 0 ? 0.02f : 0.0f;
      p.top_logprobs = r % 6 == 0 ? 3 : 0;
      return p;
    });
    Compare(SeparatedLogits(64, vocab, 9.0f, 2.5f, 6), vocab, setups, "combined V=" + std::to_string(vocab), 3);
  }
}

TEST_F(CudaSampling, PenaltiesWithSeenTokens) {
  for (int vocab : kVocabs) {
    std::mt19937 rng(Seed() ^ 77u);
    std::uniform_int_distribution<int32_t> tok(0, vocab - 1);
    auto setups = Rows(64, [](int r) {
      SamplingParams p;
      p.temperature = r % 4 == 0 ? 0.0f : 0.9f;
      p.repetition_penalty = std::array<float, 4>{1.0f, 1.3f, 0.7f, 2.0f}[r % 4];
      p.frequency_penalty = std::array<float, 3>{0.0f, 0.5f, -0.3f}[r % 3];
      p.presence_penalty = std::array<float, 5>{0.0f, 0.8f, -1.0f, 0.3f, 2.0f}[r % 5];
      p.top_p = r % 8 == 1 ? 0.8f : 1.0f;
      p.top_k = r % 8 == 2 ? 40 : 0;
      p.logprobs = r % 3 == 0;
      return p;
    });
    const std::vector<float> logits = SeparatedLogits(64, vocab, 6.0f, 2.0f, 7);
    for (int r = 0; r < 64; ++r) {
      for (int i = 0; i < 30; ++i) setups[r].prompt.push_back(tok(rng));
      for (int i = 0; i < 20; ++i) setups[r].outputs.push_back(tok(rng));
      // The current favourites are seen too, so the penalties move the argmax and the cuts.
      const float* row = logits.data() + static_cast<size_t>(r) * vocab;
      const int32_t best = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
      setups[r].outputs.push_back(best);
      if (r % 2 == 0) setups[r].outputs.push_back(best);
      if (r % 3 == 0) setups[r].prompt.push_back((best + 1) % vocab);
    }
    Compare(logits, vocab, setups, "penalties V=" + std::to_string(vocab), 4);
  }
}

TEST_F(CudaSampling, SeededRequestsDrawTheCpuTokens) {
  const int vocab = 32000;
  const auto setups = Rows(16, [](int r) {
    SamplingParams p;
    p.has_seed = true;
    p.seed = 1234 + static_cast<uint64_t>(r % 4);  // rows with the same seed must agree too
    p.temperature = 1.2f;
    p.top_p = r % 2 == 0 ? 0.95f : 1.0f;
    return p;
  });
  // A flat-ish row: every step really depends on the uniform.
  Compare(SeparatedLogits(16, vocab, 3.0f, 0.5f, 8), vocab, setups, "seeded", 8);

  // The device alone, twice from the same seed: the same tokens.
  std::vector<float> logits = SeparatedLogits(1, vocab, 3.0f, 0.5f, 9);
  auto d = Upload(backend(), logits);
  const Tensor t = d->View(DType::kF32, {1, vocab});
  std::vector<int32_t> first, second;
  for (std::vector<int32_t>* out : {&first, &second}) {
    SamplerState state(setups[0].params, vocab, 0);
    std::vector<SamplerState*> states{&state};
    for (int step = 0; step < 6; ++step) {
      std::vector<absl::StatusOr<SampleResult>> got(1);
      ASSERT_TRUE(SampleRows(t, states, std::span(got), nullptr).ok());
      ASSERT_TRUE(got[0].ok()) << got[0].status();
      out->push_back(got[0]->token);
      state.ObserveOutput(got[0]->token);
    }
  }
  EXPECT_EQ(first, second);
}

TEST_F(CudaSampling, LogprobsAndTopLogprobs) {
  for (int vocab : kVocabs) {
    const auto setups = Rows(64, [](int r) {
      SamplingParams p;
      p.temperature = r % 3 == 0 ? 0.0f : 1.0f;
      p.logprobs = r % 2 == 0;
      p.top_logprobs = std::array<int, 6>{0, 1, 2, 5, 19, 20}[r % 6];
      p.top_p = r % 5 == 0 ? 0.9f : 1.0f;
      return p;
    });
    Compare(SeparatedLogits(64, vocab, 15.0f, 4.0f, 10), vocab, setups, "logprobs V=" + std::to_string(vocab), 2);
  }
}

TEST_F(CudaSampling, TiesGoToLowestId) {
  const int vocab = 512;
  std::vector<float> logits(6 * vocab, 0.0f);  // row 0: all equal
  for (int i : {7, 40, 41, 300}) logits[1 * vocab + i] = 5.0f;  // row 1: four tied maxima
  for (int i = 0; i < 30; ++i) logits[2 * vocab + 100 + i] = 3.0f;  // row 2: 30 tied, top_k cuts inside
  for (int i = 0; i < vocab; ++i) logits[3 * vocab + i] = static_cast<float>(i % 4);  // row 3: many ties
  logits[4 * vocab + 9] = -0.0f;  // row 4: -0.0 and +0.0 tie, then by id
  for (int i = 0; i < vocab; ++i) logits[5 * vocab + i] = i < 3 ? 1.0f : kNegInf;  // row 5: 3 finite
  std::vector<RowSetup> setups(6);
  setups[0].params.temperature = 0.0f;
  setups[0].params.top_logprobs = 20;
  setups[1].params.temperature = 0.0f;
  setups[1].params.top_logprobs = 5;
  setups[2].params.top_k = 3;
  setups[2].params.top_logprobs = 4;
  setups[3].params.top_p = 0.3f;
  setups[3].params.top_k = 200;
  setups[4].params.temperature = 0.0f;
  setups[4].params.top_logprobs = 12;
  setups[5].params.top_logprobs = 5;
  setups[5].params.top_p = 0.5f;
  for (size_t r = 0; r < setups.size(); ++r) setups[r].fallback_seed = Seed() + r;
  Compare(logits, vocab, setups, "ties", 4);

  // And the expected answers themselves, independent of the CPU.
  auto d = Upload(backend(), logits);
  std::vector<std::unique_ptr<SamplerState>> states;
  std::vector<SamplerState*> ptrs;
  for (const RowSetup& s : setups) {
    states.push_back(MakeState(s, vocab));
    ptrs.push_back(states.back().get());
  }
  std::vector<absl::StatusOr<SampleResult>> got(6);
  ASSERT_TRUE(SampleRows(d->View(DType::kF32, {6, vocab}), ptrs, std::span(got), nullptr).ok());
  for (const auto& g : got) ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(got[0]->token, 0);
  for (int i = 0; i < 20; ++i) EXPECT_EQ(got[0]->top[i].token, i);
  EXPECT_EQ(got[1]->token, 7);
  EXPECT_EQ(got[1]->top[0].token, 7);
  EXPECT_EQ(got[1]->top[3].token, 300);
  EXPECT_EQ(got[1]->top[4].token, 0);
  EXPECT_TRUE(got[2]->token >= 100 && got[2]->token < 103) << got[2]->token;
  EXPECT_EQ(got[4]->token, 0);
  EXPECT_EQ(got[4]->top[9].token, 9);
  EXPECT_LT(got[5]->token, 3);
  EXPECT_EQ(got[5]->top[4].token, 4);
  EXPECT_EQ(got[5]->top[4].logprob, kNegInf);
}

TEST_F(CudaSampling, MaskedRowsAndStridedLogits) {
  const int vocab = 32000, ld = vocab + 37;  // rows past the first are not 16-byte aligned
  std::vector<float> logits = SeparatedLogits(8, ld, 8.0f, 2.0f, 11);
  std::mt19937 rng(Seed() ^ 5u);
  for (int r = 0; r < 8; ++r) {
    for (int i = 0; i < vocab; ++i) {
      if (rng() % 4 != 0) logits[r * ld + i] = kNegInf;  // three quarters masked
    }
  }
  const auto setups = Rows(8, [](int r) {
    SamplingParams p;
    p.temperature = r == 0 ? 0.0f : 0.8f;
    p.top_k = r % 3 == 1 ? 100 : 0;
    p.top_p = r % 2 == 0 ? 0.9f : 1.0f;
    p.top_logprobs = 2;
    return p;
  });
  Compare(logits, vocab, setups, "masked, strided (scalar loads)", 3, ld);
}

TEST_F(CudaSampling, BadRowsFailAloneWithTheCpuMessages) {
  const int vocab = 512;
  std::vector<float> logits = SeparatedLogits(6, vocab, 8.0f, 2.0f, 12);
  logits[0 * vocab + 17] = std::numeric_limits<float>::quiet_NaN();
  logits[0 * vocab + 99] = std::numeric_limits<float>::infinity();
  logits[1 * vocab + 3] = std::numeric_limits<float>::infinity();
  for (int i = 0; i < vocab; ++i) logits[2 * vocab + i] = kNegInf;
  auto setups = Rows(6, [](int r) {
    SamplingParams p;
    p.temperature = r == 5 ? 0.0f : 1.0f;
    p.top_p = r == 1 ? 0.9f : 1.0f;
    p.logprobs = true;
    return p;
  });
  setups[3].params.top_p = 1.5f;  // invalid params: rejected on the host
  Compare(logits, vocab, setups, "bad rows");
}

TEST_F(CudaSampling, BadArgumentsThenAGoodCall) {
  const int vocab = 512;
  std::vector<float> logits = SeparatedLogits(2, vocab, 8.0f, 2.0f, 13);
  auto d = Upload(backend(), logits);
  SamplerState a(SamplingParams{}, vocab, 1), b(SamplingParams{}, vocab, 2), small(SamplingParams{}, 100, 3);
  std::vector<SamplerState*> two{&a, &b}, one{&a}, with_null{&a, nullptr};
  std::vector<absl::StatusOr<SampleResult>> res2(2), res1(1);
  const Tensor good = d->View(DType::kF32, {2, vocab});
  auto code = [](const absl::Status& s) { return s.code(); };
  EXPECT_EQ(code(SampleRows(d->View(DType::kBF16, {2, vocab}), two, std::span(res2), nullptr)),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(SampleRows(d->View(DType::kF32, {2 * vocab}), two, std::span(res2), nullptr)),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(SampleRows(good, one, std::span(res2), nullptr)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(SampleRows(good, two, std::span(res1), nullptr)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(SampleRows(good, with_null, std::span(res2), nullptr)), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(SampleRows(Tensor(logits.data(), DType::kF32, {2, vocab}), two, std::span(res2), nullptr)),
            absl::StatusCode::kInvalidArgument);
  // A state for another vocab fails its row only.
  std::vector<SamplerState*> mismatched{&a, &small};
  ASSERT_TRUE(SampleRows(good, mismatched, std::span(res2), nullptr).ok());
  EXPECT_TRUE(res2[0].ok()) << res2[0].status();
  EXPECT_EQ(res2[1].status().code(), absl::StatusCode::kInvalidArgument);

  ASSERT_TRUE(SampleRows(good, two, std::span(res2), nullptr).ok());
  for (const auto& r : res2) {
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_GE(r->token, 0);
    EXPECT_LT(r->token, vocab);
  }
}

}  // namespace
}  // namespace cleave::kernels
