// Time per decode step of the device sampler (SampleRows) at B = 64, V = 128256 (Llama 3's
// vocab), per kind of row, as a ratio against reading the logits once at the bandwidth of a
// device-to-device copy measured in the same run (the floor of any sampler that reads its input).
// The time includes everything a step costs: the host-side row specs, the workspace allocation,
// the launches, the CUB sort of top-p rows and the copy of the results back (one sync).
// Prints a markdown table. Run by tests/gpu/run.sh; needs a CUDA device.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/kernels/device_sampling.h"
#include "cleave/kernels/sampling.h"
#include "cleave/kernels/tensor.h"
#include "gpu_bench_util.h"

namespace cleave::kernels {
namespace {

using namespace gpubench;  // NOLINT: the shared benchmark vocabulary

constexpr int kRows = 64;
constexpr int kVocab = 128256;

// LM-like rows: normal logits (sd 2.5) plus a handful of strong candidates, so top-p at 0.9 keeps
// tens to hundreds of tokens, as on real decode steps.
std::vector<float> LmLikeLogits() {
  std::mt19937 rng(20240607);
  std::normal_distribution<float> dist(0.0f, 2.5f);
  std::uniform_int_distribution<int> tok(0, kVocab - 1);
  std::vector<float> v(static_cast<size_t>(kRows) * kVocab);
  for (float& x : v) x = dist(rng);
  for (int r = 0; r < kRows; ++r) {
    for (int i = 0; i < 8; ++i) v[static_cast<size_t>(r) * kVocab + tok(rng)] += 18.0f - i;
  }
  return v;
}

int Main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "cuda_sampling_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n\n", prop.name);

  const size_t bytes = sizeof(float) * kRows * kVocab;
  const std::vector<float> host = LmLikeLogits();
  void* logits = DeviceAlloc(bytes);
  CHECK_CUDA(cudaMemcpy(logits, host.data(), bytes, cudaMemcpyHostToDevice));
  const Tensor t = Dev(logits, DType::kF32, {kRows, kVocab});
  const double copy_bw = CopyBandwidth(bytes);
  const double read_once_s = bytes / copy_bw;

  std::printf("| rows | shape | time (us) | ratio to one read | baseline |\n|---|---|---|---|---|\n");
  std::printf("| read logits once | %d x %d f32 | %.1f | 1.00 | D2D copy bandwidth (%.0f GB/s) |\n", kRows, kVocab,
              read_once_s * 1e6, copy_bw / 1e9);

  auto run = [&](const char* name, const std::function<SamplingParams(int)>& make, bool penalties) {
    std::vector<std::unique_ptr<SamplerState>> states;
    std::vector<SamplerState*> ptrs;
    std::mt19937 rng(7);
    std::uniform_int_distribution<int32_t> tok(0, kVocab - 1);
    for (int r = 0; r < kRows; ++r) {
      states.push_back(std::make_unique<SamplerState>(make(r), kVocab, 1000 + r));
      if (penalties) {
        for (int i = 0; i < 512; ++i) states.back()->ObserveOutput(tok(rng));  // a 512-token history
      }
      ptrs.push_back(states.back().get());
    }
    std::vector<absl::StatusOr<SampleResult>> results(kRows);
    const double s = Time([&] {
      Must(SampleRows(t, ptrs, std::span(results), nullptr), name);
      for (const auto& r : results) Must(r.status(), name);
    });
    std::printf("| %s | %d x %d f32 | %.1f | %.2f | one read of the logits |\n", name, kRows, kVocab, s * 1e6,
                s / read_once_s);
  };

  run("greedy", [](int) { SamplingParams p; p.temperature = 0.0f; return p; }, false);
  run("greedy + logprobs + 5 top_logprobs",
      [](int) { SamplingParams p; p.temperature = 0.0f; p.logprobs = true; p.top_logprobs = 5; return p; }, false);
  run("temperature 0.8", [](int) { SamplingParams p; p.temperature = 0.8f; return p; }, false);
  run("top-k 50", [](int) { SamplingParams p; p.top_k = 50; return p; }, false);
  run("top-p 0.9", [](int) { SamplingParams p; p.top_p = 0.9f; return p; }, false);
  run("top-k 50 + top-p 0.9 + min-p 0.05", [](int) {
        SamplingParams p; p.top_k = 50; p.top_p = 0.9f; p.min_p = 0.05f; return p; }, false);
  run("top-p 0.9 + penalties (512 seen)", [](int) {
        SamplingParams p; p.top_p = 0.9f; p.repetition_penalty = 1.1f; p.frequency_penalty = 0.2f; return p; }, true);
  run("half greedy, half top-p 0.9", [](int r) {
        SamplingParams p; if (r % 2 == 0) p.temperature = 0.0f; else p.top_p = 0.9f; return p; }, false);
  cudaFree(logits);
  return 0;
}

}  // namespace
}  // namespace cleave::kernels

int main() { return cleave::kernels::Main(); }
