// Mixture-of-experts layer micro-benchmarks at small Mixtral-like shapes: D = 1024, F = 2048,
// E = 8 experts, top-2, bf16 expert weights (100 MB), T = 1 (decode), 16 and 256 tokens.
//   BM_MoeLayer:          router Linear + MoeRoute + MoeExperts (one grouped GEMM per expert and
//                         projection over all its tokens).
//   BM_MoePerTokenLinear: the same routing, then per token and slot three one-row Linear calls —
//                         what looping over tokens instead of grouping them costs.
//   BM_MoeNaiveLoop:      the plain scalar per-token loop of moe_test's reference, in f32.
//   BM_DenseFfn:          a dense SwiGLU FFN with the same active parameters (F_dense = k * F):
//                         fused gate/up Linear + SwiGlu + down Linear. Same flops per token as
//                         the MoE layer, but once tokens spread over all experts the MoE layer
//                         reads E / k = 4x the weight bytes (bound by that at small T).
// items_per_second counts tokens; GFLOP (a rate) counts the 6 * D * F * k flops per token of the
// active experts' three GEMMs (router and un-permute excluded). Wall-clock time, since the kernels
// run on the pools.
// Run with e.g. --benchmark_min_time=0.2 for a quick pass, or --benchmark_repetitions=5
// --benchmark_report_aggregates_only=true for the median over repetitions.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cleave/kernels/activation.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/moe.h"

namespace cleave::kernels {
namespace {

constexpr int64_t kD = 1024, kF = 2048;
constexpr int kExperts = 8, kTopK = 2;
constexpr int64_t kMaxTokens = 256;

// Cheap deterministic values in [-scale, scale) (std::mt19937 would dominate set-up time).
std::vector<float> Fill(size_t n, uint32_t salt, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t h = (static_cast<uint32_t>(i) + salt * 0x9e3779b9u) * 2654435761u;
    v[i] = (static_cast<float>(h >> 8) / 16777216.0f - 0.5f) * 2.0f * scale;
  }
  return v;
}

std::vector<uint16_t> FillBf16(size_t n, uint32_t salt, float scale) {
  const std::vector<float> f = Fill(n, salt, scale);
  std::vector<uint16_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = F32ToBf16(f[i]);
  return out;
}

// The layer's weights, built once and shared by every benchmark.
struct MoeModel {
  std::vector<float> x, router;  // x: [kMaxTokens, D]; router: [E, D] f32
  std::vector<std::vector<uint16_t>> gate, up, down;
  std::vector<uint16_t> dense_gate_up, dense_down;  // [2 k F, D], [D, k F]
  MoeExpertWeights experts;

  MoeModel() {
    const float in_scale = 1.0f / std::sqrt(static_cast<float>(kD));
    const float out_scale = 1.0f / std::sqrt(static_cast<float>(kF));
    x = Fill(static_cast<size_t>(kMaxTokens * kD), 1, 1.0f);
    router = Fill(static_cast<size_t>(kExperts * kD), 2, in_scale);
    for (int e = 0; e < kExperts; ++e) {
      gate.push_back(FillBf16(static_cast<size_t>(kF * kD), 10 + 3 * e, in_scale));
      up.push_back(FillBf16(static_cast<size_t>(kF * kD), 11 + 3 * e, in_scale));
      down.push_back(FillBf16(static_cast<size_t>(kD * kF), 12 + 3 * e, out_scale));
      experts.gate.emplace_back(gate.back().data(), DType::kBF16,
                                std::initializer_list<int64_t>{kF, kD});
      experts.up.emplace_back(up.back().data(), DType::kBF16,
                              std::initializer_list<int64_t>{kF, kD});
      experts.down.emplace_back(down.back().data(), DType::kBF16,
                                std::initializer_list<int64_t>{kD, kF});
    }
    dense_gate_up = FillBf16(static_cast<size_t>(2 * kTopK * kF * kD), 3, in_scale);
    dense_down = FillBf16(static_cast<size_t>(kD * kTopK * kF), 4, out_scale);
  }

  Tensor X(int64_t t) { return Tensor(x.data(), DType::kF32, {t, kD}); }
};

MoeModel& Model() {
  static MoeModel* model = new MoeModel();
  return *model;
}

void SetCounters(benchmark::State& state, int64_t t) {
  state.SetItemsProcessed(state.iterations() * t);
  state.counters["GFLOP"] = benchmark::Counter(static_cast<double>(6 * kD * kF * kTopK * t) * 1e-9,
                                               benchmark::Counter::kIsIterationInvariantRate);
}

// Router logits [t, E] = x W_router^T, then MoeRoute (Mixtral: renormalised top-2).
absl::Status Route(MoeModel& m, int64_t t, std::vector<float>& logits, MoeRouting& routing) {
  logits.resize(static_cast<size_t>(t * kExperts));
  Tensor lt(logits.data(), DType::kF32, {t, kExperts});
  Tensor rw(m.router.data(), DType::kF32, {kExperts, kD});
  if (absl::Status s = Linear(m.X(t), rw, nullptr, lt); !s.ok()) return s;
  return MoeRoute(lt, kTopK, true, routing);
}

// Arg: t (tokens).
void BM_MoeLayer(benchmark::State& state) {
  const int64_t t = state.range(0);
  MoeModel& m = Model();
  std::vector<float> logits, out(static_cast<size_t>(t * kD));
  Tensor ot(out.data(), DType::kF32, {t, kD});
  MoeRouting routing;
  MoeWorkspace ws;
  for (auto _ : state) {
    if (!Route(m, t, logits, routing).ok()) state.SkipWithError("route failed");
    if (!MoeExperts(m.X(t), routing, m.experts, ws, ot).ok())
      state.SkipWithError("MoeExperts failed");
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  int active = 0;
  for (int e = 0; e < kExperts; ++e) active += routing.tokens_for_expert(e) > 0;
  state.counters["active_experts"] = active;
  SetCounters(state, t);
}

// Arg: t. Same routing; then token by token, slot by slot, three one-row GEMMs.
void BM_MoePerTokenLinear(benchmark::State& state) {
  const int64_t t = state.range(0);
  MoeModel& m = Model();
  std::vector<float> logits, out(static_cast<size_t>(t * kD));
  std::vector<float> gate_up(static_cast<size_t>(2 * kF)), act(static_cast<size_t>(kF)),
      y(static_cast<size_t>(kD));
  Tensor gut(gate_up.data(), DType::kF32, {1, 2 * kF}), at(act.data(), DType::kF32, {1, kF});
  Tensor gt = gut.Narrow(1, 0, kF), ut = gut.Narrow(1, kF, kF);
  Tensor yt(y.data(), DType::kF32, {1, kD});
  MoeRouting routing;
  for (auto _ : state) {
    if (!Route(m, t, logits, routing).ok()) state.SkipWithError("route failed");
    for (int64_t i = 0; i < t; ++i) {
      Tensor xt(m.x.data() + i * kD, DType::kF32, {1, kD});
      float* o = out.data() + i * kD;
      for (int64_t c = 0; c < kD; ++c) o[c] = 0.0f;
      for (int j = 0; j < kTopK; ++j) {
        const int e = routing.topk_ids[i * kTopK + j];
        const float w = routing.topk_weights[i * kTopK + j];
        if (!Linear(xt, m.experts.gate[e], nullptr, gt).ok() ||
            !Linear(xt, m.experts.up[e], nullptr, ut).ok() || !SwiGlu(gut, at).ok() ||
            !Linear(at, m.experts.down[e], nullptr, yt).ok()) {
          state.SkipWithError("expert failed");
        }
        for (int64_t c = 0; c < kD; ++c) o[c] += w * y[c];
      }
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  SetCounters(state, t);
}

// Arg: t. moe_test's reference loop in f32: per token, per slot, scalar dot products.
void BM_MoeNaiveLoop(benchmark::State& state) {
  const int64_t t = state.range(0);
  MoeModel& m = Model();
  std::vector<float> logits, out(static_cast<size_t>(t * kD)), h(static_cast<size_t>(kF));
  MoeRouting routing;
  for (auto _ : state) {
    if (!Route(m, t, logits, routing).ok()) state.SkipWithError("route failed");
    for (int64_t i = 0; i < t; ++i) {
      const float* x = m.x.data() + i * kD;
      float* o = out.data() + i * kD;
      for (int64_t c = 0; c < kD; ++c) o[c] = 0.0f;
      for (int j = 0; j < kTopK; ++j) {
        const int e = routing.topk_ids[i * kTopK + j];
        const uint16_t* gw = m.gate[e].data();
        const uint16_t* uw = m.up[e].data();
        const uint16_t* dw = m.down[e].data();
        for (int64_t r = 0; r < kF; ++r) {
          float g = 0.0f, u = 0.0f;
          for (int64_t q = 0; q < kD; ++q) {
            g += x[q] * Bf16ToF32(gw[r * kD + q]);
            u += x[q] * Bf16ToF32(uw[r * kD + q]);
          }
          h[r] = g / (1.0f + std::exp(-g)) * u;
        }
        const float w = routing.topk_weights[i * kTopK + j];
        for (int64_t c = 0; c < kD; ++c) {
          float acc = 0.0f;
          for (int64_t q = 0; q < kF; ++q) acc += h[q] * Bf16ToF32(dw[c * kF + q]);
          o[c] += w * acc;
        }
      }
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  SetCounters(state, t);
}

// Arg: t. Dense SwiGLU FFN, F_dense = k * F (same active parameters; no router).
void BM_DenseFfn(benchmark::State& state) {
  const int64_t t = state.range(0), fd = kTopK * kF;
  MoeModel& m = Model();
  std::vector<float> gate_up(static_cast<size_t>(t * 2 * fd)), act(static_cast<size_t>(t * fd)),
      out(static_cast<size_t>(t * kD));
  Tensor wgu(m.dense_gate_up.data(), DType::kBF16, {2 * fd, kD});
  Tensor wd(m.dense_down.data(), DType::kBF16, {kD, fd});
  Tensor gut(gate_up.data(), DType::kF32, {t, 2 * fd}), at(act.data(), DType::kF32, {t, fd});
  Tensor ot(out.data(), DType::kF32, {t, kD});
  for (auto _ : state) {
    if (!Linear(m.X(t), wgu, nullptr, gut).ok() || !SwiGlu(gut, at).ok() ||
        !Linear(at, wd, nullptr, ot).ok()) {
      state.SkipWithError("dense FFN failed");
    }
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  SetCounters(state, t);
}

void TokenCounts(benchmark::internal::Benchmark* b) {
  b->ArgName("t")->Arg(1)->Arg(16)->Arg(256)->UseRealTime()->Unit(benchmark::kMillisecond);
}
BENCHMARK(BM_MoeLayer)->Apply(TokenCounts);
BENCHMARK(BM_MoePerTokenLinear)->Apply(TokenCounts);
BENCHMARK(BM_DenseFfn)->Apply(TokenCounts);
BENCHMARK(BM_MoeNaiveLoop)->Apply(TokenCounts);

}  // namespace
}  // namespace cleave::kernels

BENCHMARK_MAIN();
