// What workers report: tokens (streamed on to the frontends), failures, KV notices; and the
// growth of decoding requests' block tables that follows their tokens.
#include <algorithm>
#include <string>

#include "absl/strings/str_cat.h"
#include "core_impl.h"

namespace cleave::scheduler {
namespace {

// Whether this token ends the request, and how. The worker's word first; then the scheduler's own
// count, so a request ends by length even if the worker did not say so.
bool EndsRequest(const Request& r, const v1::TokenResult& token, bool* by_length) {
  if (token.finished() || token.finished_by_length()) {
    *by_length = token.finished_by_length();
    return true;
  }
  const auto& stops = r.stop_token_ids;
  if (std::find(stops.begin(), stops.end(), token.token_id()) != stops.end()) {
    *by_length = false;
    return true;
  }
  *by_length = true;
  return r.generated() >= r.max_tokens;
}

bool WorkerEnded(const v1::TokenResult& token) {
  return token.finished() || token.finished_by_length();
}

}  // namespace

void SchedulerCore::Impl::OnStep(Worker& worker, const v1::StepResults& step) {
  ++event_stamp;
  touched.clear();
  // At most one event per token: no reallocation (and no moving of events) while streaming.
  const size_t need = outbox.to_frontends.size() + step.tokens_size();
  if (outbox.to_frontends.capacity() < need) {
    outbox.to_frontends.reserve(std::max(need, 2 * outbox.to_frontends.capacity()));
  }
  for (const v1::TokenResult& token : step.tokens()) OnToken(worker, token);
  for (const v1::RequestFailure& failure : step.failures()) OnFailure(worker, failure);
  // Growth comes after every token of the step, so one AppendBlocks covers them all.
  for (RequestId id : touched) {
    Request* r = FindRequest(id);
    if (r == nullptr || r->decode.worker != worker.id) continue;
    if (r->state == RequestState::kDecoding || r->state == RequestState::kRunning) Grow(*r, true);
  }
}

void SchedulerCore::Impl::AppendToken(Request& r, const v1::TokenResult& token) {
  r.tokens.push_back(token.token_id());
  v1::TokenEvent* out = StepEvent(r).add_tokens();
  out->set_token_id(token.token_id());
  out->set_logprob(token.logprob());
  if (token.top_token_ids_size() > 0) {
    out->mutable_top_token_ids()->CopyFrom(token.top_token_ids());
    out->mutable_top_logprobs()->CopyFrom(token.top_logprobs());
  }
}

void SchedulerCore::Impl::OnToken(Worker& worker, const v1::TokenResult& token) {
  Request* found = FindRequest(token.request_id());
  if (found == nullptr || token.attempt() != found->attempt) return;
  Request& r = *found;
  bool by_length = false;
  if (r.state == RequestState::kPrefilling) {
    // The prefill worker's one token: time to first token.
    if (worker.id != r.prefill.worker || r.first_token) return;
    r.first_token = true;
    OnFirstToken(r);
    worker.queued_prompt_tokens -= r.prefill_queued;
    r.prefill_queued = 0;
    r.prefill.computed_tokens = r.placed_tokens;
    CacheComputed(r, r.prefill);
    AppendToken(r, token);
    if (EndsRequest(r, token, &by_length)) {
      // With its token out and its KV flushed, the prefill worker is done with it either way.
      r.prefill.ended_by_worker = WorkerEnded(token) || r.kv_sent;
      return Finish(r, by_length);
    }
    if (r.kv_sent) {  // nothing left for the prefill worker to do
      worker.Release(r.id, r.prefill);
      r.prefill = Placement();
    }
    if (r.kv_ready) {
      StartDecode(r);
    } else {
      r.state = RequestState::kTransferring;
    }
    return;
  }
  if (r.state != RequestState::kDecoding && r.state != RequestState::kRunning) return;
  if (worker.id != r.decode.worker) return;
  if (r.event_stamp != event_stamp) touched.push_back(r.id);
  if (r.state == RequestState::kRunning) {
    if (r.times.first_token < 0) OnFirstToken(r);  // colocated: prefill's token
  } else {
    OnFirstDecodeToken(r);  // P/D: no-op after the first
  }
  AppendToken(r, token);
  // The KV of every token but the newest is in the blocks now.
  r.decode.computed_tokens = static_cast<int>(r.tokens.size()) - 1;
  CacheComputed(r, r.decode);
  if (EndsRequest(r, token, &by_length)) {
    r.decode.ended_by_worker = WorkerEnded(token);
    Finish(r, by_length);
  }
}

void SchedulerCore::Impl::OnFailure(Worker& worker, const v1::RequestFailure& failure) {
  Request* r = FindRequest(failure.request_id());
  if (r == nullptr || failure.attempt() != r->attempt) return;
  const bool from_prefill = r->prefill.involved && r->prefill.worker == worker.id;
  const bool from_decode = r->decode.involved && r->decode.worker == worker.id;
  if (!from_prefill && !from_decode) return;
  (from_prefill ? r->prefill : r->decode).ended_by_worker = true;
  if (from_prefill && r->state == RequestState::kDecoding) {
    Detach(*r, r->prefill, v1::REMOVE_REASON_FAILED);  // the KV already reached the decoder
    return;
  }
  RerunOrFail(*r, kCodeInternal,
              absl::StrCat("worker ", worker.reg.name(), ": ", failure.message()));
}

void SchedulerCore::Impl::OnKvReady(Worker& worker, const v1::KvReady& ready) {
  Request* r = FindRequest(ready.request_id());
  if (r == nullptr || ready.attempt() != r->attempt || r->kv_ready) return;
  if (r->state != RequestState::kPrefilling && r->state != RequestState::kTransferring) return;
  if (worker.id != r->decode.worker) return;
  r->kv_ready = true;
  MarkKvReady(*r);
  r->decode.computed_tokens = r->placed_tokens;
  CacheComputed(*r, r->decode);
  if (r->state == RequestState::kTransferring) StartDecode(*r);
}

void SchedulerCore::Impl::OnKvFailed(Worker& worker, const v1::KvFailed& failed) {
  Request* r = FindRequest(failed.request_id());
  if (r == nullptr || failed.attempt() != r->attempt || r->kv_ready) return;
  if (r->state != RequestState::kPrefilling && r->state != RequestState::kTransferring) return;
  if (worker.id != r->decode.worker) return;
  r->decode.ended_by_worker = true;  // it forgot the transfer
  RerunOrFail(*r, kCodeInternal,
              absl::StrCat("KV transfer to ", worker.reg.name(), " failed: ", failed.message()));
}

void SchedulerCore::Impl::OnKvSent(Worker& worker, const v1::KvSent& sent) {
  Request* r = FindRequest(sent.request_id());
  if (r == nullptr || sent.attempt() != r->attempt || r->kv_sent) return;
  if (!r->prefill.involved || worker.id != r->prefill.worker) return;
  r->kv_sent = true;
  worker.queued_prompt_tokens -= r->prefill_queued;  // its KV is computed: no longer queued
  r->prefill_queued = 0;
  r->prefill.computed_tokens = r->placed_tokens;
  ReleaseBlocks(*r, r->prefill);  // full blocks stay in the prefill worker's prefix cache
  if (r->first_token) {
    worker.Release(r->id, r->prefill);
    r->prefill = Placement();
  }
}

void SchedulerCore::Impl::StartDecode(Request& r) {
  Worker* d = FindWorker(r.decode.worker);
  if (d == nullptr) return;    // cannot happen: losing d takes r off it
  Grow(r, /*preempt=*/false);  // the AddRequest carries the whole table
  r.state = RequestState::kDecoding;
  MarkDecodeAdded(r);
  // All of this attempt's prompt has its KV there; the first token's does not yet.
  SendAdd(*d, r, r.placed_tokens, r.decode, nullptr);
}

void SchedulerCore::Impl::Grow(Request& r, bool preempt) {
  const int bs = block_size();
  const int64_t len = static_cast<int64_t>(r.tokens.size());
  const int64_t final_len = r.final_length();
  // The next step's token (and one more, for a worker running a step ahead) must have a slot.
  const int must = preempt ? CeilDiv(std::min<int64_t>(len + 1, final_len), bs) : 0;
  const int want = std::max(
      must, CeilDiv(std::min<int64_t>(len + config.decode_lookahead_tokens, final_len), bs));
  std::vector<int32_t>& table = r.decode.blocks;
  const size_t had = table.size();
  if (want <= static_cast<int>(had)) return;
  Worker* w = FindWorker(r.decode.worker);
  if (w == nullptr) return;
  BlockManager& blocks = w->blocks;
  auto take = [&] {
    const int n = std::min(want - static_cast<int>(table.size()), blocks.num_free());
    (void)blocks.Allocate({}, n, &table);
  };
  take();
  while (static_cast<int>(table.size()) < must) {
    Request* victim = PickVictim(*w, std::nullopt, /*prefill_side=*/false);
    if (victim == nullptr || victim == &r) {
      Preempt(r);  // r is the one to go: its new blocks go back with the rest
      return;
    }
    Preempt(*victim);
    take();
  }
  if (preempt && table.size() > had) SendAppend(w->id, r, table.begin() + had, table.end());
}

}  // namespace cleave::scheduler
