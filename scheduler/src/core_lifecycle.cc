// Ending, preempting and re-running requests, and releasing what they hold on their workers.
#include <algorithm>
#include <string>

#include "cleave/common/logging.h"
#include "core_impl.h"

namespace cleave::scheduler {

void SchedulerCore::Impl::CacheComputed(Request& r, Placement& p) {
  if (!config.enable_prefix_cache || p.blocks.empty()) return;
  // Placements on Mamba-model workers never match (MatchPrefix), so they are not cached either.
  if (p.state_slot >= 0) return;
  // Called for every decoded token: the common "no new full block" case returns early.
  const int n = std::min<int>(p.computed_tokens / block_size(), static_cast<int>(p.blocks.size()));
  if (n <= p.cached_blocks) return;
  Worker* w = FindWorker(p.worker);
  if (w == nullptr) return;
  const std::vector<uint64_t>& hashes = BlockHashes(r, n);
  w->blocks.Cache(hashes, r.tokens, p.blocks, p.cached_blocks, n);
  p.cached_blocks = n;
}

void SchedulerCore::Impl::ReleaseBlocks(Request& r, Placement& p) {
  if (p.blocks.empty()) return;
  if (Worker* w = FindWorker(p.worker)) {
    CacheComputed(r, p);
    w->blocks.Free(p.blocks);
  }
  p.blocks.clear();
}

void SchedulerCore::Impl::Detach(Request& r, Placement& p, v1::RemoveReason reason) {
  if (p.involved) {
    if (Worker* w = FindWorker(p.worker)) {
      if (!p.ended_by_worker) SendRemove(w->id, r, reason);
      ReleaseBlocks(r, p);
      w->Release(r.id, p);
      if (&p == &r.prefill) w->queued_prompt_tokens -= r.prefill_queued;
    }
  }
  if (&p == &r.prefill) r.prefill_queued = 0;
  p = Placement();
}

void SchedulerCore::Impl::DetachAll(Request& r, v1::RemoveReason reason) {
  Detach(r, r.prefill, reason);
  Detach(r, r.decode, reason);
}

void SchedulerCore::Impl::Erase(Request& r) {
  by_client.erase({r.frontend, r.client_id});
  requests.erase(r.id);  // destroys r
}

void SchedulerCore::Impl::Finish(Request& r, bool by_length) {
  v1::RequestEvent& event = StepEvent(r);
  event.set_finished(true);
  event.set_finished_by_length(by_length);
  FillTimings(r, event.mutable_timings());
  DetachAll(r, v1::REMOVE_REASON_FINISHED);
  ++num_finished;
  CountEnd(SchedulerMetrics::kFinished);
  Erase(r);
}

void SchedulerCore::Impl::Fail(Request& r, int32_t code, const std::string& message) {
  if (r.state == RequestState::kWaiting) {
    Dequeue(r);
  } else {
    DetachAll(r, v1::REMOVE_REASON_FAILED);
  }
  CLEAVE_LOG(Warning) << "request " << r.trace_id << " (#" << r.id << ") failed: " << message;
  EmitError(r, code, message);
  CountEnd(SchedulerMetrics::kFailed);
  Erase(r);
}

void SchedulerCore::Impl::Requeue(Request& r, v1::RemoveReason reason) {
  DetachAll(r, reason);
  ++r.attempt;
  r.state = RequestState::kWaiting;
  r.placed_tokens = 0;
  r.first_token = r.kv_ready = r.kv_sent = false;
  waiting.PushFront(r);
  ++num_waiting;
  waiting_tokens += static_cast<int64_t>(r.tokens.size());
}

void SchedulerCore::Impl::Preempt(Request& r) {
  // Charged to the worker whose pool or priority forced it: the decode side unless only the
  // prefill side holds it.
  const Placement& where = r.decode.involved ? r.decode : r.prefill;
  if (Worker* w = FindWorker(where.worker)) ++w->num_preempted;
  CLEAVE_LOG(Debug) << "request " << r.trace_id << " (#" << r.id << ") preempted";
  Requeue(r, v1::REMOVE_REASON_PREEMPTED);
  ++num_preempted;
  Count(&SchedulerMetrics::preemptions);
}

void SchedulerCore::Impl::RerunOrFail(Request& r, int32_t code, const std::string& message) {
  if (r.generated() == 0 && r.num_reruns < config.max_reruns) {
    ++r.num_reruns;
    Count(&SchedulerMetrics::reruns);
    CLEAVE_LOG(Warning) << "request " << r.trace_id << " (#" << r.id << ") re-run: " << message;
    // To the workers that still hold it, a re-run is a preemption: it may come back.
    Requeue(r, v1::REMOVE_REASON_PREEMPTED);
    return;
  }
  Fail(r, code, message);
}

Request* SchedulerCore::Impl::PickVictim(const Worker& worker,
                                         std::optional<int> min_priority_value, bool prefill_side) {
  Request* best = nullptr;
  for (RequestId id : worker.requests) {
    Request* r = FindRequest(id);
    if (r == nullptr) continue;
    // A prefill worker lets go of a request with its first token out soon anyway (KvSent).
    if (prefill_side && (r->first_token || r->prefill.blocks.empty())) continue;
    if (min_priority_value && r->priority <= *min_priority_value) continue;
    if (best == nullptr) {
      best = r;
      continue;
    }
    const int rp = config.policy == Policy::kPriority ? r->priority : 0;
    const int bp = config.policy == Policy::kPriority ? best->priority : 0;
    if (rp > bp || (rp == bp && r->arrival > best->arrival)) best = r;
  }
  return best;
}

}  // namespace cleave::scheduler
