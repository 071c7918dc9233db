// Schedule(): waiting requests in policy order are placed on workers (the router: prefix-cache
// hits, free blocks, load), their blocks allocated, and placement preemption under PRIORITY.
#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/scheduler/block_hash.h"
#include "core_impl.h"

namespace cleave::scheduler {
namespace {

// A candidate worker for one request, with what placing it there would take.
struct Choice {
  Worker* worker = nullptr;
  std::vector<int32_t> hit;  // prefix-cache blocks it would share
  int headroom = 0;          // free blocks left after the allocation (< 0: does not fit)
};

// Whether a worker that `serves` (draining or not) has a pool of at least num_blocks.
template <typename Pred>
bool AnyWorkerHolds(const std::map<WorkerId, std::unique_ptr<Worker>>& workers, Pred serves,
                    int num_blocks) {
  return std::any_of(workers.begin(), workers.end(), [&](const auto& entry) {
    return serves(*entry.second) && entry.second->blocks.num_blocks() >= num_blocks;
  });
}

// A placement whose first hit_blocks blocks come, computed, from the worker's prefix cache.
Placement NewPlacement(WorkerId worker, int hit_blocks, int block_size) {
  Placement p;
  p.worker = worker;
  p.hit_blocks = p.cached_blocks = hit_blocks;
  p.computed_tokens = hit_blocks * block_size;
  p.involved = true;
  return p;
}

}  // namespace

const std::vector<uint64_t>& SchedulerCore::Impl::BlockHashes(Request& r, int num_blocks) {
  const int bs = block_size();
  if (r.hashes_block_size != bs) {
    r.block_hashes.clear();
    r.hashes_block_size = bs;
  }
  ExtendBlockHashes(r.tokens, bs, num_blocks, &r.block_hashes);
  return r.block_hashes;
}

void SchedulerCore::Impl::CountPrefixLookup(const Worker& worker, int tokens, int hit_tokens) {
  prefix_cache_hit_tokens += static_cast<uint64_t>(hit_tokens);
  // Like vLLM's prefix_cache_queries: only placements that could have hit count as queries.
  if (!config.enable_prefix_cache || worker.has_state()) return;
  Count(&SchedulerMetrics::prefix_queried_tokens, static_cast<uint64_t>(tokens));
  Count(&SchedulerMetrics::prefix_hit_tokens, static_cast<uint64_t>(hit_tokens));
}

int SchedulerCore::Impl::MatchPrefix(Worker& worker, Request& r, int max_blocks,
                                     std::vector<int32_t>* hit) {
  hit->clear();
  if (!config.enable_prefix_cache || max_blocks <= 0 || worker.has_state()) return 0;
  const std::vector<uint64_t>& hashes = BlockHashes(r, max_blocks);
  return worker.blocks.MatchPrefix(hashes, r.tokens, max_blocks, hit);
}

SchedulerCore::Impl::PlaceResult SchedulerCore::Impl::PlacePd(Request& r) {
  const int bs = block_size();
  const int len = static_cast<int>(r.tokens.size());
  const int need_d = CeilDiv(len + 1, bs);
  const int need_p = CeilDiv(len, bs);
  const int max_hit = (len - 1) / bs;  // at least one prompt token is always computed
  const bool decode_holds = AnyWorkerHolds(workers, IsDecodeTarget, need_d);
  if (!decode_holds ||
      !AnyWorkerHolds(
          workers, [](const Worker& w) { return w.role() == v1::WORKER_ROLE_PREFILL; }, need_p)) {
    // It would fit an attention worker whose AFD group cannot run: say so, not "does not fit".
    if (std::string afd = decode_holds ? "" : AfdBlocker(need_d); !afd.empty()) {
      Fail(r, kCodeUnavailable, afd);
      return PlaceResult::kDropped;
    }
    Fail(r, kCodeInvalidArgument,
         absl::StrCat(len, " tokens do not fit the KV pool of any registered worker"));
    return PlaceResult::kDropped;
  }
  Choice d;
  Choice p;
  std::vector<int32_t> hit;
  for (;;) {
    // Decode worker: the most free blocks once this request is in, then the fewest running.
    d = Choice();
    for (auto& [id, w] : workers) {
      if (!IsDecodeTarget(*w) || !w->has_room()) continue;
      MatchPrefix(*w, r, max_hit, &hit);
      const int headroom = w->blocks.HeadroomAfter(hit, need_d);
      if (d.worker == nullptr || headroom > d.headroom ||
          (headroom == d.headroom && w->num_running() < d.worker->num_running())) {
        d = Choice{w.get(), hit, headroom};
      }
    }
    // Prefill worker: one that fits, then the longest hit, then the least queued.
    p = Choice();
    int64_t p_queued = 0;
    for (auto& [id, w] : workers) {
      if (w->role() != v1::WORKER_ROLE_PREFILL || !w->has_room()) continue;
      const int hit_blocks = MatchPrefix(*w, r, max_hit, &hit);
      const int64_t queued = w->queued_prompt_tokens;
      const int64_t cap =
          static_cast<int64_t>(config.prefill_queue_factor) * w->reg.max_batch_tokens();
      if (queued > 0 && queued + (len - hit_blocks * bs) > cap) continue;
      const int headroom = w->blocks.HeadroomAfter(hit, need_p);
      const bool fits = headroom >= 0;
      const bool best_fits = p.worker != nullptr && p.headroom >= 0;
      const int best_hit = static_cast<int>(p.hit.size());
      if (p.worker == nullptr || (fits && !best_fits) ||
          (fits == best_fits &&
           (hit_blocks > best_hit || (hit_blocks == best_hit && queued < p_queued)))) {
        p = Choice{w.get(), hit, headroom};
        p_queued = queued;
      }
    }
    if (d.worker == nullptr || p.worker == nullptr) return PlaceResult::kBlocked;
    if (d.headroom >= 0 && p.headroom >= 0) break;
    if (config.policy != Policy::kPriority) return PlaceResult::kBlocked;  // head of line waits
    Request* victim = d.headroom < 0 ? PickVictim(*d.worker, r.priority, /*prefill_side=*/false)
                                     : PickVictim(*p.worker, r.priority, /*prefill_side=*/true);
    if (victim == nullptr) return PlaceResult::kBlocked;
    Preempt(*victim);
  }

  const int hit_d = static_cast<int>(d.hit.size());
  const int hit_p = static_cast<int>(p.hit.size());
  Dequeue(r);
  r.state = RequestState::kPrefilling;
  r.placed_tokens = len;
  r.decode = NewPlacement(d.worker->id, hit_d, bs);
  r.prefill = NewPlacement(p.worker->id, hit_p, bs);
  // Headroom was checked on both: these cannot fail.
  (void)d.worker->blocks.Allocate(d.hit, need_d - hit_d, &r.decode.blocks);
  (void)p.worker->blocks.Allocate(p.hit, need_p - hit_p, &r.prefill.blocks);
  d.worker->Attach(r.id, r.decode);
  p.worker->Attach(r.id, r.prefill);
  r.prefill_queued = len - hit_p * bs;
  p.worker->queued_prompt_tokens += r.prefill_queued;
  CountPrefixLookup(*p.worker, len, hit_p * bs);
  OnPlaced(r);

  // The decode worker hears first, so it expects the KV before the prefill worker can send it.
  SendExpectKv(*d.worker, r, p.worker->id);
  v1::KvTarget target;
  target.set_worker_id(d.worker->id);
  target.set_address(d.worker->reg.kv_address());
  target.mutable_blocks()->Add(r.decode.blocks.begin(), r.decode.blocks.end());
  target.set_first_block(hit_d);
  target.set_state_slot(r.decode.state_slot);
  SendAdd(*p.worker, r, hit_p * bs, r.prefill, &target);
  return PlaceResult::kPlaced;
}

SchedulerCore::Impl::PlaceResult SchedulerCore::Impl::PlaceColocated(Request& r) {
  const int bs = block_size();
  const int len = static_cast<int>(r.tokens.size());
  const int need = CeilDiv(len + 1, bs);
  if (!AnyWorkerHolds(
          workers, [](const Worker& w) { return w.role() == v1::WORKER_ROLE_COLOCATED; }, need)) {
    Fail(r, kCodeInvalidArgument,
         absl::StrCat(len, " tokens do not fit the KV pool of any registered worker"));
    return PlaceResult::kDropped;
  }
  Choice c;
  std::vector<int32_t> hit;
  for (;;) {
    c = Choice();
    for (auto& [id, w] : workers) {
      if (w->role() != v1::WORKER_ROLE_COLOCATED || !w->has_room()) continue;
      MatchPrefix(*w, r, (len - 1) / bs, &hit);
      const int headroom = w->blocks.HeadroomAfter(hit, need);
      if (c.worker == nullptr || headroom > c.headroom ||
          (headroom == c.headroom && w->num_running() < c.worker->num_running())) {
        c = Choice{w.get(), hit, headroom};
      }
    }
    if (c.worker == nullptr) return PlaceResult::kBlocked;
    if (c.headroom >= 0) break;
    if (config.policy != Policy::kPriority) return PlaceResult::kBlocked;
    Request* victim = PickVictim(*c.worker, r.priority, /*prefill_side=*/false);
    if (victim == nullptr) return PlaceResult::kBlocked;
    Preempt(*victim);
  }

  const int hit_blocks = static_cast<int>(c.hit.size());
  Dequeue(r);
  r.state = RequestState::kRunning;
  r.placed_tokens = len;
  r.decode = NewPlacement(c.worker->id, hit_blocks, bs);
  (void)c.worker->blocks.Allocate(c.hit, need - hit_blocks, &r.decode.blocks);
  c.worker->Attach(r.id, r.decode);
  CountPrefixLookup(*c.worker, len, hit_blocks * bs);
  OnPlaced(r);
  SendAdd(*c.worker, r, hit_blocks * bs, r.decode, nullptr);
  return PlaceResult::kPlaced;
}

void SchedulerCore::Impl::FailWaitingWithoutCapacity(Clock now) {
  if (HasPdPair() || HasColocated() || num_waiting == 0) {
    no_capacity_since.reset();
    return;
  }
  if (!no_capacity_since) no_capacity_since = now;
  if (now - *no_capacity_since < config.no_capacity_timeout_ms) return;
  std::vector<RequestId> ids;
  for (const auto& [id, r] : requests) {
    if (r->state == RequestState::kWaiting) ids.push_back(id);
  }
  std::sort(ids.begin(), ids.end());
  // With attention workers registered, the likely cause is an incomplete AFD group: name it.
  const std::string afd = AfdBlocker();
  const std::string message =
      absl::StrCat("no serving capacity registered for ", now - *no_capacity_since, " ms",
                   afd.empty() ? "" : ": ", afd);
  for (RequestId id : ids) Fail(*FindRequest(id), kCodeUnavailable, message);
  no_capacity_since.reset();
}

void SchedulerCore::Schedule(Clock now) {
  Impl& s = *impl_;
  const auto started = std::chrono::steady_clock::now();
  ScheduleImpl(now);
  if (s.metrics != nullptr) {
    s.metrics->schedule_seconds->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  }
}

void SchedulerCore::ScheduleImpl(Clock now) {
  Impl& s = *impl_;
  s.FailWaitingWithoutCapacity(now);
  const bool pd = s.HasPdPair();
  if (!pd && !s.HasColocated()) return;
  const WaitingQueue::IsLive is_live = [&s](const WaitingQueue::Entry& e) {
    const Request* r = s.FindRequest(e.id);
    return r != nullptr && r->state == RequestState::kWaiting && r->queue_ticket == e.ticket;
  };
  // A placed request's entry goes stale (state changes), so Front() moves on by itself.
  while (const WaitingQueue::Entry* entry = s.waiting.Front(is_live)) {
    Request& r = *s.FindRequest(entry->id);
    const Impl::PlaceResult result = pd ? s.PlacePd(r) : s.PlaceColocated(r);
    if (result == Impl::PlaceResult::kBlocked) break;
  }
  s.waiting.MaybeCompact(s.num_waiting, is_live);
}

}  // namespace cleave::scheduler
