// One whole decode step (embed, every layer, final norm, LM head) of a real model at a given
// context length, batch 1 and batch 8. MODEL_DIR env var picks the model (default
// models/stories260K, made by scripts/setup-model.sh).
#include <cstdlib>
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "cleave/kernels/gemm.h"
#include "cleave/model/decoder.h"

namespace {

using namespace cleave;

const model::DecoderModel* Model() {
  static std::unique_ptr<model::DecoderModel> m = [] {
    const char* dir = std::getenv("MODEL_DIR");
    auto r = model::DecoderModel::Load(dir ? dir : "models/stories260K");
    if (!r.ok()) {
      std::fprintf(stderr, "decode_step_bench: %s\n", std::string(r.status().message()).c_str());
      std::exit(1);
    }
    return std::move(*r);
  }();
  return m.get();
}

// args: batch, context, threads
void BM_DecodeStep(benchmark::State& state) {
  const int batch = state.range(0), context = state.range(1);
  kernels::SetCpuThreads(state.range(2));
  const model::DecoderModel& m = *Model();
  const int block = 16, blocks_per_seq = (context + 1 + block - 1) / block;
  auto cache = model::KvCache::Create(m.config(), batch * blocks_per_seq, block, kernels::CpuBackend());
  model::ForwardBatch fb;
  std::vector<std::vector<int32_t>> tables(batch);
  const int32_t token = 5;
  for (int b = 0; b < batch; ++b) {
    for (int i = 0; i < blocks_per_seq; ++i) tables[b].push_back(b * blocks_per_seq + i);
    fb.AddSequence(std::span(&token, 1), context, tables[b], block, true);
  }
  if (!fb.Finalize().ok()) state.SkipWithError("bad batch");
  model::Workspace ws;
  std::vector<float> logits;
  for (auto _ : state) {
    if (!m.Forward(fb, **cache, ws, logits).ok()) state.SkipWithError("forward failed");
    benchmark::DoNotOptimize(logits.data());
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(batch) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
}
BENCHMARK(BM_DecodeStep)
    ->ArgNames({"batch", "ctx", "threads"})
    ->Args({1, 128, 1})
    ->Args({1, 128, 2})
    ->Args({8, 128, 1})
    ->Args({8, 128, 2})
    ->Args({1, 500, 1})
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
