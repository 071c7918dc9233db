// Mamba ops (ssm.h) at a Mamba-130m layer's shape: d_inner C = 1536, d_state N = 16,
// d_conv K = 4, dt_rank R = 48.
//   prefill: one sequence of T in {128, 1024} tokens, from zero state;
//   decode:  B in {1, 16, 64, 256} sequences of one token each, continuing from their slots.
// The operands sit where the model puts them: x and z are the two column halves of in_proj's
// [T, 2C] output, B and C column slices of x_proj's [T, R + 2N] output.
// Each case runs the kernel (ref:0) and, in the same binary, a plain single-threaded loop over
// (sequence, channel, token, n) in f32 (ref:1). items_per_second is tokens/s.
// All use wall-clock time, since the kernels run on the worker pool, not only the caller.
// Run with e.g. --benchmark_min_time=0.1 for a quick pass; --cpu_threads=1 for one core.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cleave/kernels/gemm.h"
#include "cleave/kernels/ssm.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {
namespace {

constexpr int64_t kC = 1536, kN = 16, kK = 4, kR = 48;

// Cheap deterministic values in [lo, hi).
std::vector<float> Fill(size_t n, uint32_t salt, float lo = -0.5f, float hi = 0.5f) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t h = (static_cast<uint32_t>(i) + salt) * 2654435761u;
    v[i] = lo + (hi - lo) * (static_cast<float>(h >> 8) / 16777216.0f);
  }
  return v;
}

// One layer's operands for `b` sequences of `t` tokens each (T = b * t rows).
struct Layer {
  Layer(int64_t t, int64_t b) : tokens(t * b), seqs(b) {
    xz = Fill(static_cast<size_t>(tokens * 2 * kC), 1, -2.0f, 2.0f);
    xproj = Fill(static_cast<size_t>(tokens * (kR + 2 * kN)), 2, -1.0f, 1.0f);
    dt = Fill(static_cast<size_t>(tokens * kC), 3);
    dt_bias = Fill(kC, 4, -5.0f, -3.0f);
    conv_w = Fill(kC * kK, 5);
    conv_b = Fill(kC, 6);
    a.resize(kC * kN);
    for (int64_t c = 0; c < kC; ++c) {
      for (int64_t n = 0; n < kN; ++n) a[c * kN + n] = -static_cast<float>(n + 1);
    }
    d = Fill(kC, 7, 0.5f, 1.5f);
    conv_state = Fill(static_cast<size_t>(b * kC * (kK - 1)), 8);
    ssm_state = Fill(static_cast<size_t>(b * kC * kN), 9);
    u.resize(static_cast<size_t>(tokens * kC));
    y.resize(u.size());
    for (int64_t i = 0; i <= b; ++i) qsl.push_back(static_cast<int32_t>(i * t));
    for (int64_t i = 0; i < b; ++i) slots.push_back(static_cast<int32_t>(i));
    init.assign(static_cast<size_t>(b), t == 1 ? 1 : 0);
  }

  Tensor X() { return Tensor(xz.data(), DType::kF32, {tokens, 2 * kC}).Narrow(1, 0, kC); }
  Tensor Z() { return Tensor(xz.data(), DType::kF32, {tokens, 2 * kC}).Narrow(1, kC, kC); }
  Tensor XProj(int64_t start) {
    return Tensor(xproj.data(), DType::kF32, {tokens, kR + 2 * kN}).Narrow(1, start, kN);
  }
  SsmSequences Seqs() {
    SsmSequences s;
    s.query_start_loc = Tensor(qsl.data(), DType::kI32, {seqs + 1});
    s.state_slots = Tensor(slots.data(), DType::kI32, {seqs});
    s.has_initial_state = Tensor(init.data(), DType::kI32, {seqs});
    return s;
  }

  int64_t tokens, seqs;
  std::vector<float> xz, xproj, dt, dt_bias, conv_w, conv_b, a, d, conv_state, ssm_state, u, y;
  std::vector<int32_t> qsl, slots, init;
};

// The plain loops: what the kernel replaces.
void ReferenceConv(Layer& l) {
  const float* x = l.xz.data();
  for (int64_t s = 0; s < l.seqs; ++s) {
    for (int64_t c = 0; c < kC; ++c) {
      float* st = l.conv_state.data() + (s * kC + c) * (kK - 1);
      float win[kK];
      for (int64_t i = 0; i < kK - 1; ++i) win[i] = l.init[s] ? st[i] : 0.0f;
      for (int64_t t = l.qsl[s]; t < l.qsl[s + 1]; ++t) {
        win[kK - 1] = x[t * 2 * kC + c];
        float acc = l.conv_b[c];
        for (int64_t i = 0; i < kK; ++i) acc += l.conv_w[c * kK + i] * win[i];
        l.u[t * kC + c] = acc / (1.0f + std::exp(-acc));
        for (int64_t i = 0; i + 1 < kK; ++i) win[i] = win[i + 1];
      }
      for (int64_t i = 0; i < kK - 1; ++i) st[i] = win[i];
    }
  }
}

void ReferenceScan(Layer& l) {
  const int64_t ld = kR + 2 * kN;
  for (int64_t s = 0; s < l.seqs; ++s) {
    for (int64_t c = 0; c < kC; ++c) {
      float* h = l.ssm_state.data() + (s * kC + c) * kN;
      if (!l.init[s]) std::fill(h, h + kN, 0.0f);
      for (int64_t t = l.qsl[s]; t < l.qsl[s + 1]; ++t) {
        const float v = l.dt[t * kC + c] + l.dt_bias[c];
        const float delta = v > 20.0f ? v : std::log1p(std::exp(v));
        const float x = l.xz[t * 2 * kC + c], z = l.xz[t * 2 * kC + kC + c];
        const float* bt = l.xproj.data() + t * ld + kR;
        const float* ct = bt + kN;
        float y = 0.0f;
        for (int64_t n = 0; n < kN; ++n) {
          h[n] = std::exp(delta * l.a[c * kN + n]) * h[n] + delta * bt[n] * x;
          y += h[n] * ct[n];
        }
        y += l.d[c] * x;
        l.y[t * kC + c] = y * (z / (1.0f + std::exp(-z)));
      }
    }
  }
}

// Args: t (tokens per sequence), b (sequences), ref (1 = the plain loop).
void BM_CausalConv1d(benchmark::State& state) {
  const int64_t t = state.range(0), b = state.range(1);
  const bool ref = state.range(2) != 0;
  Layer l(t, b);
  CausalConv1dArgs a;
  a.x = l.X();
  a.weight = Tensor(l.conv_w.data(), DType::kF32, {kC, kK});
  a.bias = Tensor(l.conv_b.data(), DType::kF32, {kC});
  a.seqs = l.Seqs();
  a.conv_state = Tensor(l.conv_state.data(), DType::kF32, {b, kC, kK - 1});
  a.out = Tensor(l.u.data(), DType::kF32, {l.tokens, kC});
  for (auto _ : state) {
    if (ref) {
      ReferenceConv(l);
    } else if (!CausalConv1d(a).ok()) {
      state.SkipWithError("CausalConv1d failed");
    }
    benchmark::DoNotOptimize(l.u.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * l.tokens);
  state.SetLabel(ref ? "reference" : "kernel");
}
BENCHMARK(BM_CausalConv1d)
    ->ArgNames({"t", "b", "ref"})
    ->ArgsProduct({{128, 1024}, {1}, {0, 1}})
    ->ArgsProduct({{1}, {1, 16, 64, 256}, {0, 1}})
    ->UseRealTime();

void BM_SelectiveScan(benchmark::State& state) {
  const int64_t t = state.range(0), b = state.range(1);
  const bool ref = state.range(2) != 0;
  Layer l(t, b);
  SelectiveScanArgs a;
  a.x = l.X();
  a.dt = Tensor(l.dt.data(), DType::kF32, {l.tokens, kC});
  a.dt_bias = Tensor(l.dt_bias.data(), DType::kF32, {kC});
  a.A = Tensor(l.a.data(), DType::kF32, {kC, kN});
  a.B = l.XProj(kR);
  a.C = l.XProj(kR + kN);
  a.D = Tensor(l.d.data(), DType::kF32, {kC});
  a.z = l.Z();
  a.seqs = l.Seqs();
  a.ssm_state = Tensor(l.ssm_state.data(), DType::kF32, {b, kC, kN});
  a.out = Tensor(l.y.data(), DType::kF32, {l.tokens, kC});
  for (auto _ : state) {
    if (ref) {
      ReferenceScan(l);
    } else if (!SelectiveScan(a).ok()) {
      state.SkipWithError("SelectiveScan failed");
    }
    benchmark::DoNotOptimize(l.y.data());
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(state.iterations() * l.tokens);
  state.SetLabel(ref ? "reference" : "kernel");
}
BENCHMARK(BM_SelectiveScan)
    ->ArgNames({"t", "b", "ref"})
    ->ArgsProduct({{128, 1024}, {1}, {0, 1}})
    ->ArgsProduct({{1}, {1, 16, 64, 256}, {0, 1}})
    ->UseRealTime();

}  // namespace
}  // namespace cleave::kernels

// --cpu_threads=N sizes the kernels' worker pool (default: one thread per core); the reference
// loops always run on one thread.
int main(int argc, char** argv) {
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--cpu_threads=", 14) == 0) {
      cleave::kernels::SetCpuThreads(std::atoi(argv[i] + 14));
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
