// Cost of recording a metric on a hot path, against a plain (non-atomic) increment in the same run.
//   *_1t:       one thread.
//   threads:2   two threads recording to the SAME series (true sharing: the cache line bounces,
//               which is the worst case a serving loop can hit).
//   Distinct:   two threads, each on its OWN series of one family (checks that series padding
//               keeps them off each other's cache line; should cost about the single-thread time).
// Time is wall-clock over all operations of all threads (aggregate throughput; items_per_second
// is its inverse); with threads:2, CPU is per thread, i.e. roughly what one operation costs its
// caller. Run with e.g. --benchmark_min_time=0.3.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <string>

#include "cleave/common/metrics.h"

namespace cleave::metrics {
namespace {

// One registry shared by every benchmark thread, built once (setup is not what is measured).
struct Fixture {
  Registry registry;
  Counter* counter = nullptr;
  Gauge* gauge = nullptr;
  Histogram* histogram = nullptr;
  Counter* per_thread[2] = {nullptr, nullptr};

  Fixture() {
    counter = registry.AddCounter("bench_total", "Bench counter.").value();
    gauge = registry.AddGauge("bench_gauge", "Bench gauge.").value();
    histogram =
        registry.AddHistogram("bench_seconds", "Bench histogram.", LatencyBucketsSeconds()).value();
    CounterFamily* family =
        registry.AddCounterFamily("bench_per_thread_total", "Bench counters.", {"t"}).value();
    for (int t = 0; t < 2; ++t) per_thread[t] = family->WithLabels({std::to_string(t)}).value();
  }
};

Fixture& Shared() {
  static Fixture* fixture = new Fixture();
  return *fixture;
}

void BM_PlainIncrement(benchmark::State& state) {
  uint64_t x = 0;
  for (auto _ : state) {
    ++x;
    benchmark::DoNotOptimize(x);  // keeps x in memory and the loop from folding away
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_PlainIncrement);

void BM_CounterInc(benchmark::State& state) {
  Counter* c = Shared().counter;
  for (auto _ : state) c->Inc();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_CounterInc)->UseRealTime();
BENCHMARK(BM_CounterInc)->Threads(2)->UseRealTime();

void BM_CounterIncDouble(benchmark::State& state) {
  Counter* c = Shared().counter;
  for (auto _ : state) c->Inc(0.5);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_CounterIncDouble)->UseRealTime();
BENCHMARK(BM_CounterIncDouble)->Threads(2)->UseRealTime();

void BM_CounterIncDistinct(benchmark::State& state) {
  Counter* c = Shared().per_thread[state.thread_index() % 2];
  for (auto _ : state) c->Inc();
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_CounterIncDistinct)->Threads(2)->UseRealTime();

void BM_GaugeSet(benchmark::State& state) {
  Gauge* g = Shared().gauge;
  double v = 0;
  for (auto _ : state) {
    g->Set(v);
    v += 1;
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_GaugeSet)->UseRealTime();
BENCHMARK(BM_GaugeSet)->Threads(2)->UseRealTime();

void BM_GaugeAdd(benchmark::State& state) {
  Gauge* g = Shared().gauge;
  for (auto _ : state) g->Add(1);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_GaugeAdd)->UseRealTime();
BENCHMARK(BM_GaugeAdd)->Threads(2)->UseRealTime();

// Values spread over the 15 latency buckets, so the bucket search is not always the same branch.
void BM_HistogramObserve(benchmark::State& state) {
  Histogram* h = Shared().histogram;
  constexpr double kValues[8] = {0.0007, 0.004, 0.03, 0.2, 0.7, 3, 20, 90};
  size_t i = 0;
  for (auto _ : state) h->Observe(kValues[i++ & 7]);
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_HistogramObserve)->UseRealTime();
BENCHMARK(BM_HistogramObserve)->Threads(2)->UseRealTime();

// The scrape side, for scale: a registry of a few series.
void BM_Render(benchmark::State& state) {
  Fixture& f = Shared();
  for (auto _ : state) benchmark::DoNotOptimize(f.registry.Render());
}
BENCHMARK(BM_Render);

}  // namespace
}  // namespace cleave::metrics

BENCHMARK_MAIN();
