// SchedulerCore: construction, lookups, the outbox, Stats, and the public methods (which forward
// to the parts listed in core_impl.h).
#include <algorithm>
#include <limits>
#include <utility>

#include "core_impl.h"

namespace cleave::scheduler {

SchedulerCore::Impl::Impl(SchedulerConfig cfg)
    : config(std::move(cfg)), waiting(config.policy), rng(config.seed) {}

Request* SchedulerCore::Impl::FindRequest(RequestId id) {
  auto it = requests.find(id);
  return it == requests.end() ? nullptr : it->second.get();
}

Worker* SchedulerCore::Impl::FindWorker(WorkerId id) {
  auto it = workers.find(id);
  return it == workers.end() ? nullptr : it->second.get();
}

bool SchedulerCore::Impl::HasPdPair() const {
  bool prefill = false;
  bool decode = false;
  for (const auto& [id, w] : workers) {
    if (w->draining) continue;
    prefill |= w->role() == v1::WORKER_ROLE_PREFILL;
    decode |= IsDecodeTarget(*w);
  }
  return prefill && decode;
}

bool SchedulerCore::Impl::HasColocated() const {
  return std::any_of(workers.begin(), workers.end(), [](const auto& entry) {
    return !entry.second->draining && entry.second->role() == v1::WORKER_ROLE_COLOCATED;
  });
}

int64_t SchedulerCore::Impl::MaxModelLen() const {
  const bool pd = HasPdPair();
  int64_t len = std::numeric_limits<int64_t>::max();
  bool any = false;
  for (const auto& [id, w] : workers) {
    // FFN workers (no KV) and attention workers of incomplete AFD groups take no requests.
    const bool serves = pd ? w->role() == v1::WORKER_ROLE_PREFILL || IsDecodeTarget(*w)
                           : w->role() == v1::WORKER_ROLE_COLOCATED;
    if (!serves) continue;
    len = std::min(len, w->max_length());
    any = true;
  }
  return any ? len : 0;
}

// --- outbox -------------------------------------------------------------------------------------

void SchedulerCore::Impl::SendAdd(const Worker& worker, const Request& r, int num_computed_tokens,
                                  const Placement& placement,
                                  const v1::KvTarget* kv_target) {
  const std::vector<int32_t>& blocks = placement.blocks;
  v1::SchedulerMessage msg;
  v1::AddRequest* add = msg.mutable_add();
  add->set_request_id(r.id);
  add->set_attempt(r.attempt);
  add->mutable_token_ids()->Add(r.tokens.begin(), r.tokens.end());
  add->set_num_prompt_tokens(r.num_prompt_tokens);
  add->set_num_computed_tokens(num_computed_tokens);
  add->mutable_blocks()->Add(blocks.begin(), blocks.end());
  *add->mutable_sampling() = r.sampling;
  add->set_max_new_tokens(r.remaining());
  add->mutable_stop_token_ids()->Add(r.stop_token_ids.begin(), r.stop_token_ids.end());
  if (kv_target != nullptr) *add->mutable_kv_target() = *kv_target;
  add->set_rng_skip(static_cast<uint32_t>(r.generated()));
  add->set_state_slot(placement.state_slot);
  add->set_trace_id(r.trace_id);
  outbox.to_workers.emplace_back(worker.id, std::move(msg));
}

void SchedulerCore::Impl::SendRemove(WorkerId worker, const Request& r, v1::RemoveReason reason) {
  v1::SchedulerMessage msg;
  v1::RemoveRequest* remove = msg.mutable_remove();
  remove->set_request_id(r.id);
  remove->set_attempt(r.attempt);
  remove->set_reason(reason);
  outbox.to_workers.emplace_back(worker, std::move(msg));
}

void SchedulerCore::Impl::SendAppend(WorkerId worker, const Request& r,
                                     std::vector<int32_t>::const_iterator first,
                                     std::vector<int32_t>::const_iterator last) {
  v1::SchedulerMessage msg;
  v1::AppendBlocks* append = msg.mutable_append();
  append->set_request_id(r.id);
  append->set_attempt(r.attempt);
  append->mutable_blocks()->Add(first, last);
  outbox.to_workers.emplace_back(worker, std::move(msg));
}

void SchedulerCore::Impl::SendExpectKv(const Worker& decode, const Request& r, WorkerId source) {
  v1::SchedulerMessage msg;
  v1::ExpectKv* expect = msg.mutable_expect_kv();
  expect->set_request_id(r.id);
  expect->set_attempt(r.attempt);
  // Only the blocks the prompt's KV fills: the decode table's last block may exist just for
  // the first generated token, which the decode worker computes itself.
  const size_t filled = std::min(r.decode.blocks.size(),
                                 static_cast<size_t>(CeilDiv(r.placed_tokens, block_size())));
  if (static_cast<size_t>(r.decode.hit_blocks) < filled) {
    expect->mutable_blocks()->Add(r.decode.blocks.begin() + r.decode.hit_blocks,
                                  r.decode.blocks.begin() + filled);
  }
  expect->set_source_worker_id(source);
  expect->set_state_slot(r.decode.state_slot);
  expect->set_trace_id(r.trace_id);
  outbox.to_workers.emplace_back(decode.id, std::move(msg));
}

v1::RequestEvent& SchedulerCore::Impl::StepEvent(Request& r) {
  if (r.event_stamp != event_stamp || r.event_index >= outbox.to_frontends.size()) {
    r.event_stamp = event_stamp;
    r.event_index = outbox.to_frontends.size();
    auto& [frontend, event] = outbox.to_frontends.emplace_back();
    frontend = r.frontend;
    event.set_client_id(r.client_id);
  }
  return outbox.to_frontends[r.event_index].second;
}

void SchedulerCore::Impl::EmitError(const Request& r, int32_t code, const std::string& message) {
  v1::RequestEvent event;
  event.set_client_id(r.client_id);
  event.set_error_code(code);
  event.set_error_message(message);
  FillTimings(r, event.mutable_timings());
  outbox.to_frontends.emplace_back(r.frontend, std::move(event));
}

// --- public ---------------------------------------------------------------------------------

SchedulerCore::SchedulerCore(SchedulerConfig config)
    : impl_(std::make_unique<Impl>(std::move(config))) {}

SchedulerCore::~SchedulerCore() = default;

const SchedulerConfig& SchedulerCore::config() const { return impl_->config; }

void SchedulerCore::SetMetrics(SchedulerMetrics* metrics) { impl_->metrics = metrics; }

void SchedulerCore::OnWorkerMessage(WorkerId worker, const v1::WorkerMessage& message, Clock now) {
  Worker* w = impl_->FindWorker(worker);
  if (w == nullptr) return;
  switch (message.kind_case()) {
    case v1::WorkerMessage::kStep:
      w->reported_waiting = message.step().num_waiting();
      impl_->OnStep(*w, message.step());
      break;
    case v1::WorkerMessage::kKvReady:
      impl_->OnKvReady(*w, message.kv_ready());
      break;
    case v1::WorkerMessage::kKvFailed:
      impl_->OnKvFailed(*w, message.kv_failed());
      break;
    case v1::WorkerMessage::kKvSent:
      impl_->OnKvSent(*w, message.kv_sent());
      break;
    case v1::WorkerMessage::kDrain:
      // Nothing new goes there; what it holds runs to its end (the worker leaves when idle).
      if (!w->draining) {
        w->draining = true;
        impl_->OnAfdWorkerDraining(*w);
      }
      break;
    default:  // hello_worker_id is the service's business; nothing else is known
      break;
  }
}

Outbox SchedulerCore::TakeOutbox() {
  // A new step batch must not append to events already handed out.
  ++impl_->event_stamp;
  Outbox out = std::exchange(impl_->outbox, Outbox());
  // Room for as much as this time, taken now, before the caller frees `out`'s small blocks: the
  // next step then fills reserved vectors (a large allocation among many small frees makes
  // glibc consolidate its fast bins: a measurable share of a decode iteration).
  impl_->outbox.to_frontends.reserve(out.to_frontends.size());
  impl_->outbox.to_workers.reserve(out.to_workers.size());
  return out;
}

bool SchedulerCore::HasServingCapacity() const {
  return impl_->HasPdPair() || impl_->HasColocated();
}

v1::StatsResponse SchedulerCore::Stats() const {
  v1::StatsResponse stats;
  for (const auto& [id, w] : impl_->workers) {
    v1::WorkerStats* ws = stats.add_workers();
    ws->set_worker_id(id);
    ws->set_name(w->reg.name());
    ws->set_role(w->role());
    ws->set_num_kv_blocks(w->blocks.num_blocks());
    ws->set_free_blocks(w->blocks.num_free());
    ws->set_cached_blocks(w->blocks.num_cached());
    ws->set_used_blocks(w->blocks.num_used());
    ws->set_num_running(w->num_running());
    ws->set_kv_address(w->reg.kv_address());
    ws->set_num_state_slots(w->reg.num_state_slots());
    ws->set_free_state_slots(static_cast<int32_t>(w->free_slots.size()));
    ws->set_num_waiting(w->reported_waiting);
    ws->set_num_preempted(w->num_preempted);
    ws->set_draining(w->draining);
    ws->set_http_address(w->reg.http_address());
    if (w->role() == v1::WORKER_ROLE_ATTENTION || w->role() == v1::WORKER_ROLE_FFN) {
      ws->set_afd_group(w->reg.afd_group());
    }
    if (w->role() == v1::WORKER_ROLE_ATTENTION) ws->set_afd_complete(w->afd_complete);
  }
  stats.set_num_waiting(impl_->num_waiting);
  stats.set_num_waiting_tokens(impl_->waiting_tokens);
  stats.set_num_running(static_cast<int32_t>(impl_->requests.size()) - impl_->num_waiting);
  stats.set_num_finished(impl_->num_finished);
  stats.set_num_rejected(impl_->num_rejected);
  stats.set_num_preempted(impl_->num_preempted);
  stats.set_prefix_cache_hit_tokens(impl_->prefix_cache_hit_tokens);
  return stats;
}

}  // namespace cleave::scheduler
