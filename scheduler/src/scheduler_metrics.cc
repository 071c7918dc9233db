#include "cleave/scheduler/scheduler_metrics.h"

#include "cleave/common/status.h"

namespace cleave::scheduler {

const char* SchedulerMetrics::PhaseName(int phase) {
  static constexpr const char* kNames[kNumPhases] = {"queue", "prefill", "kv_transfer",
                                                     "decode_queue", "first_decode_step"};
  return phase >= 0 && phase < kNumPhases ? kNames[phase] : "other";
}

absl::StatusOr<std::unique_ptr<SchedulerMetrics>> SchedulerMetrics::Create(metrics::Registry& registry) {
  auto m = std::make_unique<SchedulerMetrics>();
  CLEAVE_ASSIGN_OR_RETURN(m->admitted, registry.AddCounter("cleave_scheduler_requests_admitted_total",
                                                           "Requests admitted to the waiting queue."));
  CLEAVE_ASSIGN_OR_RETURN(
      metrics::CounterFamily * rejected,
      registry.AddCounterFamily("cleave_scheduler_admission_rejections_total",
                                "Requests refused at admission, by reason (queue_full: 429; too_long, "
                                "invalid: 400; no_capacity: 503).",
                                {"reason"}));
  static constexpr const char* kReasons[kNumRejections] = {"queue_full", "too_long", "no_capacity", "invalid"};
  for (int i = 0; i < kNumRejections; ++i) {
    CLEAVE_ASSIGN_OR_RETURN(m->rejected[i], rejected->WithLabels({kReasons[i]}));
  }
  CLEAVE_ASSIGN_OR_RETURN(
      metrics::CounterFamily * ended,
      registry.AddCounterFamily("cleave_scheduler_requests_finished_total",
                                "Admitted requests that ended, by outcome (finished: stop or length; "
                                "cancelled: by the client or its frontend; failed: an error).",
                                {"outcome"}));
  static constexpr const char* kOutcomes[kNumOutcomes] = {"finished", "cancelled", "failed"};
  for (int i = 0; i < kNumOutcomes; ++i) {
    CLEAVE_ASSIGN_OR_RETURN(m->ended[i], ended->WithLabels({kOutcomes[i]}));
  }
  CLEAVE_ASSIGN_OR_RETURN(m->preemptions, registry.AddCounter("cleave_scheduler_preemptions_total",
                                                              "Requests preempted (to be recomputed later) "
                                                              "for lack of KV blocks or by priority."));
  CLEAVE_ASSIGN_OR_RETURN(m->reruns, registry.AddCounter("cleave_scheduler_reruns_total",
                                                         "Requests re-run after a worker failure or loss "
                                                         "before any token was streamed."));
  CLEAVE_ASSIGN_OR_RETURN(m->prefix_queried_tokens,
                          registry.AddCounter("cleave_scheduler_prefix_cache_queried_tokens_total",
                                              "Prompt tokens looked up in a worker's prefix cache at "
                                              "placement."));
  CLEAVE_ASSIGN_OR_RETURN(m->prefix_hit_tokens,
                          registry.AddCounter("cleave_scheduler_prefix_cache_hit_tokens_total",
                                              "Prompt tokens whose KV was found in the prefix cache "
                                              "(not recomputed)."));
  CLEAVE_ASSIGN_OR_RETURN(m->lease_expiries, registry.AddCounter("cleave_scheduler_lease_expiries_total",
                                                                 "Workers removed because their lease lapsed "
                                                                 "(no heartbeat in time)."));
  // Planning passes take microseconds: buckets from 10 us.
  CLEAVE_ASSIGN_OR_RETURN(std::vector<double> plan_buckets, metrics::ExponentialBuckets(10e-6, 2.5, 12));
  CLEAVE_ASSIGN_OR_RETURN(m->schedule_seconds,
                          registry.AddHistogram("cleave_scheduler_schedule_seconds",
                                                "Time of one scheduling pass (placing waiting requests).",
                                                plan_buckets));
  // Phases range from tens of microseconds (a decode queue) to seconds (a long queue).
  CLEAVE_ASSIGN_OR_RETURN(std::vector<double> phase_buckets, metrics::ExponentialBuckets(50e-6, 2.5, 16));
  CLEAVE_ASSIGN_OR_RETURN(
      metrics::HistogramFamily * phases,
      registry.AddHistogramFamily("cleave_scheduler_request_phase_seconds",
                                  "Where a request's time goes before its first token and, in P/D, "
                                  "its hand-off to decode: queue, prefill, kv_transfer, decode_queue, "
                                  "first_decode_step (queue + prefill = time to first token at the "
                                  "scheduler).",
                                  {"phase"}, phase_buckets));
  for (int i = 0; i < kNumPhases; ++i) {
    CLEAVE_ASSIGN_OR_RETURN(m->phase_seconds[i], phases->WithLabels({PhaseName(i)}));
  }
  return m;
}

}  // namespace cleave::scheduler
