// The scheduler's logic, free of threads and sockets: events in (worker registrations, step
// results, KV notices, submissions, cancellations, time), messages out (batch deltas to workers,
// token events to frontends). The gRPC service (service.h) holds one mutex around a SchedulerCore
// and ships its outbox; unit tests and the micro-benchmark drive it directly.
//
// A request's life (P/D):   WAITING -> PREFILLING (prefill worker P, decode blocks reserved on D)
//                           -> TRANSFERRING (first token out; waiting for D's KvReady)
//                           -> DECODING (in D's running batch) -> finished / cancelled / failed
//          (colocated):     WAITING -> RUNNING (one worker, both phases) -> ...
// Preemption by recompute returns a request to WAITING with its generated tokens appended to the
// prompt it will recompute; the next placement uses attempt + 1 so late results of the old
// attempt are recognised and dropped.
//
// What workers can rely on (the implementation is in src/core_*.cc; request.h draws the states):
//  - Attempts start at 0. Every placement after a preemption or re-run has a higher attempt; all
//    messages of one placement (ExpectKv, AddRequest to P and D, AppendBlocks, RemoveRequest)
//    carry the same one.
//  - P/D placement: ExpectKv goes to D before AddRequest goes to P (in outbox order; the two
//    streams are independent, so D must accept ExpectKv promptly).
//  - A worker gets RemoveRequest for a request it holds unless it ended the request itself
//    (finished / finished_by_length on a token, RequestFailure, KvFailed). Messages cross, so a
//    worker must treat RemoveRequest / AppendBlocks for an unknown (request, attempt) as a no-op.
//  - A prefill worker is done with a request once it has reported its token and KvSent; it gets
//    no RemoveRequest after that. If its token ends the request (finished, a stop id, the last
//    allowed token), the scheduler frees its blocks at once: it must not read them afterwards
//    (the KV transfer is moot; D was told RemoveRequest and must refuse late frames).
//  - AppendBlocks extends a running request's table towards len(tokens) +
//    decode_lookahead_tokens. When free blocks run short the table may cover less (at least
//    len(tokens) + 1); only then is a request preempted. A worker with no slot for a step waits.
//  - Re-runs (a failure or a lost worker with nothing streamed yet) send PREEMPTED to the
//    workers that still hold the request; a failed request sends FAILED.
//  - The scheduler ends a request by length when max_tokens are streamed, and on a stop id, even
//    if the worker did not flag it (then the worker gets RemoveRequest FINISHED).
//
// Attention-FFN disaggregation (AFD): an ATTENTION worker is a decode target exactly like a
// DECODE worker while its AFD group (RegisterWorkerRequest.afd_group) is complete
// (afd_group.h: its non-draining FFN workers own every expert exactly once, and so on). FFN
// workers hold no KV and are never placed on. Attention workers get AfdPeers (the group's FFN
// workers, draining ones included, and whether the group is complete) right after they register
// and whenever an FFN worker of the group registers, drains or leaves. When an FFN worker is
// lost (or a drained one leaves a group that is incomplete without it), every request on the
// group's attention workers fails with UNAVAILABLE naming the group and the worker (no re-run:
// the group cannot serve it). New requests meet an incomplete group's reason in their error.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/v1/control.pb.h"

namespace cleave::scheduler {

using WorkerId = uint64_t;
using FrontendId = uint64_t;
using Clock = int64_t;  // milliseconds on a monotonic clock, supplied by the caller

enum class Policy { kFcfs, kPriority };

struct SchedulerConfig {
  Policy policy = Policy::kFcfs;
  // Admission control, decided before any KV is allocated: RESOURCE_EXHAUSTED with retry_after_s.
  int max_waiting = 1024;                 // requests waiting for placement
  int64_t max_waiting_tokens = 1 << 20;   // prompt tokens waiting for placement
  int retry_after_s = 1;
  int lease_ms = 3000;
  int heartbeat_ms = 500;
  bool enable_prefix_cache = true;
  // A decoding request is kept this many free slots ahead of its length, so the worker rarely
  // waits for an AppendBlocks delta.
  int decode_lookahead_tokens = 16;
  // Requests whose tokens were already streamed when their worker was lost fail with
  // UNAVAILABLE; those with nothing streamed yet are re-run elsewhere.

  // A prefill worker is given at most this many times its max_batch_tokens of prompt tokens still
  // to prefill (one prompt always fits an idle worker); the rest wait, so that later placements
  // can go to other prefill workers.
  int prefill_queue_factor = 4;
  // Re-runs after failures or lost workers (not preemptions) before the request fails (with the
  // last cause's code): a request that keeps killing workers must not cycle forever.
  int max_reruns = 3;
  // Waiting requests fail with UNAVAILABLE once no serving capacity has been registered for this
  // long (measured at Schedule()); 0 fails them at the first Schedule() without capacity.
  int no_capacity_timeout_ms = 30000;
  // Seeds the RNG that draws sampling seeds for requests that came without one.
  uint64_t seed = 0x5eed5eed5eed5eedULL;
};

struct SchedulerMetrics;

struct Outbox {
  std::vector<std::pair<WorkerId, v1::SchedulerMessage>> to_workers;
  std::vector<std::pair<FrontendId, v1::RequestEvent>> to_frontends;
  bool empty() const { return to_workers.empty() && to_frontends.empty(); }
};

class SchedulerCore {
 public:
  explicit SchedulerCore(SchedulerConfig config);
  ~SchedulerCore();

  const SchedulerConfig& config() const;
  // Records into `metrics` from now on (null: stop). It must outlive the core or the next call.
  void SetMetrics(SchedulerMetrics* metrics);

  // --- workers -------------------------------------------------------------------------------
  // InvalidArgument for an unusable registration (no blocks, block_size <= 0, unknown role,
  // prefill/decode without kv_address where needed, a model or geometry different from the
  // workers already registered; AFD: an attention or FFN worker without afd_group, an FFN worker
  // without ffn.address or with experts outside [0, num_experts) or listed twice). An FFN worker
  // has no KV pool: its num_kv_blocks, block_size, max_batch_tokens, max_running may be 0 and
  // its block_size is not compared. Attention workers of the group get AfdPeers (see below).
  absl::StatusOr<WorkerId> AddWorker(const v1::RegisterWorkerRequest& request, Clock now);
  // Lease renewal; false when the worker is unknown (lapsed or never registered).
  bool Heartbeat(WorkerId worker, Clock now);
  // A worker is gone (stream broke, lease lapsed, it deregistered): its blocks are forgotten;
  // its requests with no tokens streamed yet go back to WAITING (front of the queue), the others
  // fail with UNAVAILABLE naming the worker. Requests it was prefilling for a live decode worker
  // are re-run; transfers it was receiving are told to their prefill worker via RemoveRequest.
  void RemoveWorker(WorkerId worker, const std::string& why);
  // Removes every worker whose lease lapsed at `now`; returns them.
  std::vector<WorkerId> ExpireLeases(Clock now);
  // Step results, KV notices. Messages about unknown or stale (request, attempt) are ignored.
  void OnWorkerMessage(WorkerId worker, const v1::WorkerMessage& message, Clock now);

  // --- frontends ------------------------------------------------------------------------------
  // Admits (event with accepted = true) or rejects (event with error_code RESOURCE_EXHAUSTED and
  // retry_after_s, or INVALID_ARGUMENT for a request no worker could ever run, e.g. longer than
  // max_model_len) at once. No KV is allocated here; placement happens in Schedule().
  void Submit(FrontendId frontend, const v1::SubmitRequest& request, Clock now);
  // Ends the request wherever it is, frees its blocks at once (RemoveRequest to its workers).
  // `finished` = the frontend ended it (stop string): no further event is sent for it.
  void Cancel(FrontendId frontend, const v1::CancelRequest& cancel);
  // The frontend's stream closed: all its requests are cancelled.
  void RemoveFrontend(FrontendId frontend);

  // Places waiting requests (policy order) on workers while blocks and budgets allow, allocating
  // their blocks (prefix cache first), preempting lower-priority requests when the policy allows.
  void Schedule(Clock now);

  // Everything to send since the last call, in order.
  Outbox TakeOutbox();

  v1::StatsResponse Stats() const;
  // True when at least one prefill worker and one decode target (a decode worker, or an attention
  // worker whose AFD group is complete), or one colocated worker, is registered and not draining.
  bool HasServingCapacity() const;
  // Why the scheduler cannot serve although workers are there, for readiness probes: without
  // serving capacity while attention workers are registered, their incomplete AFD groups ("no
  // decode capacity: AFD group g0 is incomplete: expert 3 has no FFN worker"). "" otherwise
  // (also with no workers at all: an empty cluster is not the scheduler's fault).
  std::string NotReadyReason() const;

 private:
  void ScheduleImpl(Clock now);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace cleave::scheduler
