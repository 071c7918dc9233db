// Request phase timing: when a request reached each point of its life, the phase durations
// derived from them (PhaseTimings in control.proto), and their histograms. This reads the real
// steady clock rather than the caller's `now`: it measures latency, it decides nothing.
#include <algorithm>
#include <chrono>

#include "core_impl.h"

namespace cleave::scheduler {
namespace {

int64_t MicrosNow() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

void SchedulerCore::Impl::FillTimings(const Request& r, v1::PhaseTimings* out) {
  const int64_t* us = r.times.phase_us;
  out->set_queue_us(us[SchedulerMetrics::kQueue]);
  out->set_prefill_us(us[SchedulerMetrics::kPrefill]);
  out->set_kv_transfer_us(us[SchedulerMetrics::kKvTransfer]);
  out->set_decode_queue_us(us[SchedulerMetrics::kDecodeQueue]);
  out->set_first_decode_step_us(us[SchedulerMetrics::kFirstDecodeStep]);
}

void SchedulerCore::Impl::RecordPhase(Request& r, SchedulerMetrics::Phase phase, int64_t us) {
  us = std::max<int64_t>(0, us);
  r.times.phase_us[phase] = us;
  if (metrics != nullptr) metrics->phase_seconds[phase]->Observe(static_cast<double>(us) * 1e-6);
}

void SchedulerCore::Impl::OnPlaced(Request& r) {
  RequestTimes& t = r.times;
  t.placed = MicrosNow();
  t.first_token = t.kv_ready = t.decode_added = -1;
}

void SchedulerCore::Impl::OnFirstToken(Request& r) {
  RequestTimes& t = r.times;
  t.first_token = MicrosNow();
  // Only the request's very first token is its time to first token; a later attempt's first
  // token (after a preemption) recomputes what was already streamed.
  if (r.generated() > 0 || t.phase_us[SchedulerMetrics::kQueue] >= 0) return;
  RecordPhase(r, SchedulerMetrics::kQueue, t.placed - t.admitted);
  RecordPhase(r, SchedulerMetrics::kPrefill, t.first_token - t.placed);
  FillTimings(r, StepEvent(r).mutable_timings());
}

void SchedulerCore::Impl::OnFirstDecodeToken(Request& r) {
  RequestTimes& t = r.times;
  if (t.phase_us[SchedulerMetrics::kKvTransfer] >= 0 || t.decode_added < 0 || t.first_token < 0) return;
  const int64_t now = MicrosNow();
  // The KV may land before the prefill worker's token comes back: then nothing waited on it.
  const int64_t both_in = std::max(t.first_token, t.kv_ready);
  RecordPhase(r, SchedulerMetrics::kKvTransfer, both_in - t.first_token);
  RecordPhase(r, SchedulerMetrics::kDecodeQueue, t.decode_added - both_in);
  RecordPhase(r, SchedulerMetrics::kFirstDecodeStep, now - t.decode_added);
}

void SchedulerCore::Impl::MarkKvReady(Request& r) { r.times.kv_ready = MicrosNow(); }
void SchedulerCore::Impl::MarkDecodeAdded(Request& r) { r.times.decode_added = MicrosNow(); }
void SchedulerCore::Impl::MarkAdmitted(Request& r) { r.times.admitted = MicrosNow(); }

}  // namespace cleave::scheduler
