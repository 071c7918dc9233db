// What the worker's Prometheus metrics cost on the hottest path: one Engine::Step of a decode
// worker with a full running batch (32 requests, one token each), metrics off vs on, in the same
// binary and run. "On" includes the per-step histograms and gauges, the expert-token counters
// and the sampled per-layer timing (one step in 64). MODEL_DIR picks the model (default
// models/stories260K, made by scripts/setup-model.sh): the smaller the model, the larger the
// metrics' share, so the default is the worst case.
//
//   build-w/bin/engine_metrics_bench --benchmark_repetitions=5
//       --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true
//   (one command line)
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "cleave/common/metrics.h"
#include "cleave/kernels/gemm.h"
#include "cleave/model/decoder.h"
#include "cleave/worker/engine.h"
#include "cleave/worker/worker_metrics.h"

namespace {

using namespace cleave;

constexpr int kBatch = 32;
constexpr int kContext = 64;        // tokens already computed per request when it joins
constexpr int kEpisodeSteps = 128;  // steps before the batch is replaced (contexts stay bounded)
constexpr int kBlockSize = 16;

const model::DecoderModel* Model() {
  static std::unique_ptr<model::DecoderModel> m = [] {
    const char* dir = std::getenv("MODEL_DIR");
    auto r = model::DecoderModel::Load(dir ? dir : "models/stories260K");
    if (!r.ok()) {
      std::fprintf(stderr, "engine_metrics_bench: %s\n", std::string(r.status().message()).c_str());
      std::exit(1);
    }
    return std::move(*r);
  }();
  return m.get();
}

v1::SchedulerMessage DecodeAdd(uint64_t id, uint32_t attempt, int blocks_per_seq, int first_block) {
  v1::SchedulerMessage msg;
  v1::AddRequest* a = msg.mutable_add();
  a->set_request_id(id);
  a->set_attempt(attempt);
  for (int i = 0; i <= kContext; ++i) a->add_token_ids(3 + (i * 7 + static_cast<int>(id)) % 200);
  a->set_num_prompt_tokens(kContext);
  a->set_num_computed_tokens(kContext);  // decode worker: the KV "arrived", one token pending
  for (int b = 0; b < blocks_per_seq; ++b) a->add_blocks(first_block + b);
  a->mutable_sampling()->set_temperature(0);
  a->mutable_sampling()->set_seed(1);
  a->set_max_new_tokens(1 << 20);  // never finishes within an episode
  a->set_state_slot(static_cast<int>(id));  // used by models with Mamba layers only
  return msg;
}

v1::SchedulerMessage Remove(uint64_t id, uint32_t attempt) {
  v1::SchedulerMessage msg;
  msg.mutable_remove()->set_request_id(id);
  msg.mutable_remove()->set_attempt(attempt);
  return msg;
}

// arg: metrics (0 off, 1 on)
void BM_EngineDecodeStep(benchmark::State& state) {
  const bool with_metrics = state.range(0) != 0;
  kernels::SetCpuThreads(1);
  const model::DecoderModel& m = *Model();
  const int blocks_per_seq = (kContext + kEpisodeSteps + 1 + kBlockSize - 1) / kBlockSize;
  const int slots = m.config().has_ssm_state() ? kBatch : 0;
  auto cache = model::KvCache::Create(m.config(), kBatch * blocks_per_seq, kBlockSize,
                                      kernels::CpuBackend(), slots);
  if (!cache.ok()) return state.SkipWithError("KV cache");
  metrics::Registry registry;
  std::unique_ptr<worker::WorkerMetrics> wm;
  if (with_metrics) {
    auto created = worker::WorkerMetrics::Create(
        registry, {v1::WORKER_ROLE_DECODE, "bench", "model", kBatch * blocks_per_seq, slots},
        m.config());
    if (!created.ok()) return state.SkipWithError("metrics");
    wm = *std::move(created);
  }
  worker::EngineOptions opts;
  opts.role = v1::WORKER_ROLE_DECODE;
  opts.max_batch_tokens = kBatch;
  opts.max_running = kBatch;
  opts.metrics = wm.get();
  worker::Engine engine(m, **cache, opts, nullptr, [](v1::WorkerMessage) {});

  uint32_t attempt = 0;
  auto refill = [&] {
    for (int r = 0; r < kBatch && attempt > 0; ++r) engine.Post(Remove(r, attempt));
    ++attempt;
    for (int r = 0; r < kBatch; ++r) engine.Post(DecodeAdd(r, attempt, blocks_per_seq, r * blocks_per_seq));
  };
  refill();
  engine.Step();  // applies the adds (and warms the workspace)
  int in_episode = 1;
  for (auto _ : state) {
    if (in_episode == kEpisodeSteps) {
      state.PauseTiming();
      refill();
      engine.Step();
      in_episode = 1;
      state.ResumeTiming();
    }
    if (!engine.Step()) state.SkipWithError("nothing ran");
    ++in_episode;
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(kBatch) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
}
BENCHMARK(BM_EngineDecodeStep)->ArgName("metrics")->Arg(0)->Arg(1)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
