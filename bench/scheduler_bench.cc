// SchedulerCore's cost per decode iteration: one decode worker with N running requests reports a
// step (one token each); the scheduler streams them on, grows block tables, caches full blocks,
// and runs a Schedule() pass with nothing waiting. One benchmark iteration =
//   OnWorkerMessage(StepResults with N TokenResults) + Schedule() + TakeOutbox()
// (the outbox destroyed inside the iteration). Goal: < 50 us at N = 256.
//
//   build-sched/bin/scheduler_bench --benchmark_filter=Decode
#include <benchmark/benchmark.h>

#include <memory>
#include <vector>

#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/testing/fake_messages.h"

namespace cleave::scheduler {
namespace {

using testing::MakeSubmit;
using testing::Registration;
using testing::WorkerSpec;

constexpr int kPromptTokens = 128;
constexpr int kBlockSize = 16;
// Requests grow one token per iteration; the cluster is rebuilt (untimed) this often so the
// pool never fills.
constexpr int kIterationsPerCluster = 2000;

// N requests decoding on one decode worker of a P/D pair.
struct DecodeCluster {
  DecodeCluster(int num_requests, int top_logprobs) : core(Config()) {
    WorkerSpec spec;
    spec.block_size = kBlockSize;
    spec.max_model_len = 1 << 20;
    spec.max_running = 4096;
    spec.max_batch_tokens = 1 << 16;
    spec.role = v1::WORKER_ROLE_PREFILL;
    spec.num_kv_blocks = num_requests * kPromptTokens / kBlockSize + 64;
    spec.name = "prefill-0";
    prefill = *core.AddWorker(Registration(spec), 0);
    spec.role = v1::WORKER_ROLE_DECODE;
    spec.num_kv_blocks =
        num_requests * (kPromptTokens + kIterationsPerCluster + 64) / kBlockSize + 64;
    spec.name = "decode-0";
    decode = *core.AddWorker(Registration(spec), 0);
    for (int i = 0; i < num_requests; ++i) {
      std::vector<int32_t> prompt(kPromptTokens);
      for (int j = 0; j < kPromptTokens; ++j) prompt[j] = (i * 131 + j * 7) % 30000;
      core.Submit(1, MakeSubmit(i, prompt, 1 << 19), 0);
    }
    core.Schedule(0);
    std::vector<uint64_t> ids;
    for (const auto& [w, m] : core.TakeOutbox().to_workers) {
      if (m.has_add()) ids.push_back(m.add().request_id());
    }
    for (uint64_t id : ids) {
      core.OnWorkerMessage(prefill, testing::TokenMsg(id, 0, 7), 0);
      core.OnWorkerMessage(prefill, testing::KvSentMsg(id, 0), 0);
      core.OnWorkerMessage(decode, testing::KvReadyMsg(id, 0), 0);
    }
    (void)core.TakeOutbox();
    v1::StepResults* s = step.mutable_step();
    for (uint64_t id : ids) {
      v1::TokenResult* t = s->add_tokens();
      t->set_request_id(id);
      t->set_token_id(1000 + static_cast<int>(id % 7));
      t->set_logprob(-0.25f);
      for (int k = 0; k < top_logprobs; ++k) {
        t->add_top_token_ids(1000 + k);
        t->add_top_logprobs(-0.25f - k);
      }
    }
    s->set_num_running(num_requests);
  }
  static SchedulerConfig Config() {
    SchedulerConfig config;
    config.max_waiting_tokens = 1 << 30;
    config.max_waiting = 1 << 20;
    return config;
  }

  SchedulerCore core;
  WorkerId prefill = 0;
  WorkerId decode = 0;
  v1::WorkerMessage step;
};

void BM_DecodeIteration(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  const int top = static_cast<int>(state.range(1));
  auto cluster = std::make_unique<DecodeCluster>(n, top);
  int64_t since_rebuild = 0;
  Clock now = 0;
  for (auto _ : state) {
    cluster->core.OnWorkerMessage(cluster->decode, cluster->step, now);
    cluster->core.Schedule(now);
    Outbox out = cluster->core.TakeOutbox();
    benchmark::DoNotOptimize(out);
    if (out.to_frontends.size() != static_cast<size_t>(n)) {
      state.SkipWithError("a request stopped streaming");
      break;
    }
    if (++since_rebuild == kIterationsPerCluster) {
      state.PauseTiming();
      cluster = std::make_unique<DecodeCluster>(n, top);
      since_rebuild = 0;
      state.ResumeTiming();
    }
    ++now;
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * n, benchmark::Counter::kIsRate);
  state.counters["ns/token"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * n,
                         benchmark::Counter::kIsRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_DecodeIteration)
    ->ArgNames({"running", "top_logprobs"})
    ->Args({256, 0})
    ->Args({256, 5})
    ->Args({64, 0})
    ->Args({1024, 0})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace cleave::scheduler

BENCHMARK_MAIN();
