// CPU kernel micro-benchmarks at Llama-7B/8B layer shapes.
//   Linear:   decode (M = 1, bound by reading the weights: watch bytes_per_second) and prefill
//             (M = 128, bound by FLOPs: items_per_second counts 2*M*N*K flops), f32 and bf16 W.
//   RmsNorm, SwiGlu, ApplyRope: memory-bound; bytes_per_second counts bytes read + written.
// All use wall-clock time, since the kernels run on the worker pools, not only the caller.
// Run with e.g. --benchmark_min_time=0.1 for a quick pass.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <vector>

#include "cleave/kernels/activation.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/norm.h"
#include "cleave/kernels/rope.h"

namespace cleave::kernels {
namespace {

// Cheap deterministic values in [-0.5, 0.5): a 180 MB weight matrix fills in well under a second
// (std::mt19937 would dominate the benchmark's set-up time).
std::vector<float> Fill(size_t n, uint32_t salt) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t h = (static_cast<uint32_t>(i) + salt) * 2654435761u;
    v[i] = static_cast<float>(h >> 8) / 16777216.0f - 0.5f;
  }
  return v;
}

// Args: m, k, n, weight dtype (0 = f32, 1 = bf16).
void BM_Linear(benchmark::State& state) {
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  const DType dt = state.range(3) == 0 ? DType::kF32 : DType::kBF16;
  std::vector<float> x = Fill(static_cast<size_t>(m * k), 1);
  std::vector<float> y(static_cast<size_t>(m * n));
  std::vector<float> w32 = Fill(static_cast<size_t>(n * k), 2);
  std::vector<uint16_t> w16;
  if (dt == DType::kBF16) {
    w16.resize(w32.size());
    for (size_t i = 0; i < w32.size(); ++i) w16[i] = F32ToBf16(w32[i]);
    std::vector<float>().swap(w32);
  }
  Tensor xt(x.data(), DType::kF32, {m, k}), yt(y.data(), DType::kF32, {m, n});
  Tensor wt(dt == DType::kF32 ? static_cast<void*>(w32.data()) : static_cast<void*>(w16.data()), dt,
            {n, k});
  for (auto _ : state) {
    if (!Linear(xt, wt, nullptr, yt).ok()) state.SkipWithError("Linear failed");
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * 2 * m * n * k);  // flops
  state.SetBytesProcessed(
      state.iterations() *
      static_cast<int64_t>(n * k * DTypeSize(dt) + (m * k + m * n) * sizeof(float)));
  state.SetLabel(dt == DType::kF32 ? "w=f32" : "w=bf16");
}
BENCHMARK(BM_Linear)
    ->ArgNames({"m", "k", "n", "bf16"})
    ->ArgsProduct({{1}, {4096}, {4096, 11008}, {0, 1}})
    ->Args({1, 11008, 4096, 0})
    ->Args({1, 11008, 4096, 1})
    ->Args({128, 4096, 4096, 0})
    ->Args({128, 4096, 4096, 1})
    ->Args({128, 11008, 4096, 0})
    ->Args({128, 11008, 4096, 1})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// Args: t (tokens), d.
void BM_RmsNorm(benchmark::State& state) {
  const int64_t t = state.range(0), d = state.range(1);
  std::vector<float> x = Fill(static_cast<size_t>(t * d), 3), w = Fill(static_cast<size_t>(d), 4);
  std::vector<float> out(x.size());
  Tensor xt(x.data(), DType::kF32, {t, d}), wt(w.data(), DType::kF32, {d});
  Tensor ot(out.data(), DType::kF32, {t, d});
  for (auto _ : state) {
    if (!RmsNorm(xt, wt, 1e-5f, ot).ok()) state.SkipWithError("RmsNorm failed");
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * t * d);
  state.SetBytesProcessed(state.iterations() *
                          static_cast<int64_t>((2 * t * d + d) * sizeof(float)));
}
BENCHMARK(BM_RmsNorm)->ArgNames({"t", "d"})->Args({1, 4096})->Args({128, 4096})->UseRealTime();

// Args: t, f (intermediate size).
void BM_SwiGlu(benchmark::State& state) {
  const int64_t t = state.range(0), f = state.range(1);
  std::vector<float> in = Fill(static_cast<size_t>(t * 2 * f), 5);
  std::vector<float> out(static_cast<size_t>(t * f));
  Tensor it(in.data(), DType::kF32, {t, 2 * f}), ot(out.data(), DType::kF32, {t, f});
  for (auto _ : state) {
    if (!SwiGlu(it, ot).ok()) state.SkipWithError("SwiGlu failed");
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations() * t * f);
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(3 * t * f * sizeof(float)));
}
BENCHMARK(BM_SwiGlu)->ArgNames({"t", "f"})->Args({1, 11008})->Args({128, 11008})->UseRealTime();

// Args: t, style (0 = halves, 1 = interleaved). Llama-3-8B heads: 32 q, 8 kv, head_dim 128.
void BM_ApplyRope(benchmark::State& state) {
  const int64_t t = state.range(0), hq = 32, hk = 8, d = 128, max_pos = 8192;
  const RopeStyle style = state.range(1) == 0 ? RopeStyle::kHalves : RopeStyle::kInterleaved;
  RopeConfig config;
  config.rotary_dim = static_cast<int>(d);
  config.theta = 500000.0;
  std::vector<float> cos(static_cast<size_t>(max_pos * d / 2)), sin(cos.size());
  Tensor ct(cos.data(), DType::kF32, {max_pos, d / 2}),
      st(sin.data(), DType::kF32, {max_pos, d / 2});
  if (!BuildRopeTables(config, ct, st).ok()) state.SkipWithError("BuildRopeTables failed");
  std::vector<float> q = Fill(static_cast<size_t>(t * hq * d), 6),
                     k = Fill(static_cast<size_t>(t * hk * d), 7);
  std::vector<int32_t> pos(static_cast<size_t>(t));
  for (int64_t i = 0; i < t; ++i) pos[static_cast<size_t>(i)] = static_cast<int32_t>(1000 + i);
  Tensor pt(pos.data(), DType::kI32, {t});
  Tensor qt(q.data(), DType::kF32, {t, hq, d}), kt(k.data(), DType::kF32, {t, hk, d});
  for (auto _ : state) {
    if (!ApplyRope(pt, ct, st, style, qt, kt).ok()) state.SkipWithError("ApplyRope failed");
    benchmark::DoNotOptimize(q.data());
  }
  state.SetItemsProcessed(state.iterations() * t * (hq + hk) * d);
  state.SetBytesProcessed(state.iterations() *
                          static_cast<int64_t>(2 * t * (hq + hk) * d * sizeof(float)));
}
BENCHMARK(BM_ApplyRope)
    ->ArgNames({"t", "interleaved"})
    ->ArgsProduct({{1, 128}, {0, 1}})
    ->UseRealTime();

}  // namespace
}  // namespace cleave::kernels

BENCHMARK_MAIN();
