// The scheduler's recorded metrics: counters and histograms that SchedulerCore bumps as events
// happen (admission, ends, preemption, prefix matching, planning, request phases). Gauges of the
// current state (queue depth, per-worker requests and KV blocks) are not mirrored here: the
// service collects them from SchedulerCore::Stats() at scrape time, so a worker that leaves takes
// its series with it. Names and their vLLM / Dynamo equivalents: docs/metrics.md.
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "cleave/common/metrics.h"

namespace cleave::scheduler {

struct SchedulerMetrics {
  enum Rejection { kQueueFull, kTooLong, kNoCapacity, kInvalid, kNumRejections };
  enum Outcome { kFinished, kCancelled, kFailed, kNumOutcomes };
  // The order of PhaseTimings' fields and RequestTimes::phase_us.
  enum Phase { kQueue, kPrefill, kKvTransfer, kDecodeQueue, kFirstDecodeStep, kNumPhases };
  static const char* PhaseName(int phase);

  // Registers every family in `registry` (which must outlive the returned object).
  static absl::StatusOr<std::unique_ptr<SchedulerMetrics>> Create(metrics::Registry& registry);

  metrics::Counter* admitted = nullptr;
  metrics::Counter* rejected[kNumRejections] = {};
  metrics::Counter* ended[kNumOutcomes] = {};
  metrics::Counter* preemptions = nullptr;
  metrics::Counter* reruns = nullptr;
  metrics::Counter* prefix_queried_tokens = nullptr;
  metrics::Counter* prefix_hit_tokens = nullptr;
  metrics::Counter* lease_expiries = nullptr;
  metrics::Histogram* schedule_seconds = nullptr;
  metrics::Histogram* phase_seconds[kNumPhases] = {};
};

}  // namespace cleave::scheduler
