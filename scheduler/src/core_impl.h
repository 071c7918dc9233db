// SchedulerCore's state and the helpers its parts share. Private to cleave_scheduler. The parts:
//   core.cc            construction, Stats, outbox, the public forwarding methods
//   core_workers.cc    registration, leases, a lost worker's requests
//   core_frontend.cc   admission, cancellation
//   core_placement.cc  Schedule(): policy order, worker choice, allocation, placement preemption
//   core_results.cc    step results, KV notices, growth of decoding requests
//   core_lifecycle.cc  ending, preempting and re-running requests; releasing their blocks
//   core_afd.cc        attention-FFN disaggregation: AFD groups, their peers, a lost FFN worker
// Not thread-safe (see scheduler_core.h).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/scheduler_metrics.h"
#include "cleave/v1/control.pb.h"
#include "request.h"
#include "waiting_queue.h"
#include "worker.h"

namespace cleave::scheduler {

// google.rpc.Code values carried in RequestEvent.error_code.
enum RpcCode : int32_t {
  kCodeInvalidArgument = 3,
  kCodeResourceExhausted = 8,
  kCodeInternal = 13,
  kCodeUnavailable = 14,
};

struct SchedulerCore::Impl {
  explicit Impl(SchedulerConfig cfg);

  // --- lookups -----------------------------------------------------------------------------
  Request* FindRequest(RequestId id);
  Worker* FindWorker(WorkerId id);
  // A prefill worker and a decode target, neither draining.
  bool HasPdPair() const;
  bool HasColocated() const;
  // What a P/D placement may put the decode side on: a DECODE worker, or an ATTENTION worker
  // whose AFD group is complete. Draining is the callers' business, as for every role
  // (has_room(), HasPdPair()).
  static bool IsDecodeTarget(const Worker& w) {
    return w.role() == v1::WORKER_ROLE_DECODE ||
           (w.role() == v1::WORKER_ROLE_ATTENTION && w.afd_complete);
  }
  // The longest sequence any request may reach: min over the workers of the current mode.
  int64_t MaxModelLen() const;
  int block_size() const { return geometry ? geometry->block_size() : 0; }

  // --- outbox ------------------------------------------------------------------------------
  void SendAdd(const Worker& worker, const Request& r, int num_computed_tokens,
               const Placement& placement, const v1::KvTarget* kv_target);
  void SendRemove(WorkerId worker, const Request& r, v1::RemoveReason reason);
  void SendAppend(WorkerId worker, const Request& r, std::vector<int32_t>::const_iterator first,
                  std::vector<int32_t>::const_iterator last);
  void SendExpectKv(const Worker& decode, const Request& r, WorkerId source);
  v1::RequestEvent& StepEvent(Request& r);  // the request's event in the current step batch
  static void FillTimings(const Request& r, v1::PhaseTimings* out);

  // --- metrics (null-safe: unit tests run without) -------------------------------------------
  void Count(metrics::Counter* SchedulerMetrics::*counter, uint64_t n = 1) {
    if (metrics != nullptr) (metrics->*counter)->Inc(n);
  }
  void CountEnd(SchedulerMetrics::Outcome outcome) {
    if (metrics != nullptr) metrics->ended[outcome]->Inc();
  }
  // Stores a phase's duration in r.times and observes it.
  void RecordPhase(Request& r, SchedulerMetrics::Phase phase, int64_t us);
  // Timing events of a request's life (see RequestTimes).
  void OnPlaced(Request& r);
  void OnFirstToken(Request& r);        // the current attempt's first token, before it is appended
  void OnFirstDecodeToken(Request& r);  // P/D: the decode worker's first token
  void MarkAdmitted(Request& r);
  void MarkKvReady(Request& r);
  void MarkDecodeAdded(Request& r);
  void EmitError(const Request& r, int32_t code, const std::string& message);

  // --- lifecycle (core_lifecycle.cc) ---------------------------------------------------------
  // Enters the placement's computed full blocks in its worker's prefix cache.
  void CacheComputed(Request& r, Placement& p);
  void ReleaseBlocks(Request& r, Placement& p);
  // Takes the request off the placement's worker: RemoveRequest (unless the worker ended it or
  // is gone), computed blocks cached, blocks freed.
  void Detach(Request& r, Placement& p, v1::RemoveReason reason);
  void DetachAll(Request& r, v1::RemoveReason reason);
  void Erase(Request& r);
  void Finish(Request& r, bool by_length);
  void Fail(Request& r, int32_t code, const std::string& message);
  // Back to WAITING, front of its class, attempt + 1.
  void Requeue(Request& r, v1::RemoveReason reason);
  void Preempt(Request& r);
  // After a failure: re-run when nothing was streamed (and the re-run budget allows), else fail.
  void RerunOrFail(Request& r, int32_t code, const std::string& message);
  // The preemption victim among `worker`'s requests: lowest priority (PRIORITY policy), then the
  // latest arrival; only those with priority value > min_priority_value when given.
  Request* PickVictim(const Worker& worker, std::optional<int> min_priority_value,
                      bool prefill_side);

  // --- placement (core_placement.cc) ---------------------------------------------------------
  // Hashes of r's first num_blocks full blocks, for the current block size.
  const std::vector<uint64_t>& BlockHashes(Request& r, int num_blocks);
  int MatchPrefix(Worker& worker, Request& r, int max_blocks, std::vector<int32_t>* hit);
  // A placement looked up `tokens` prompt tokens on `worker` and found `hit_tokens` cached.
  void CountPrefixLookup(const Worker& worker, int tokens, int hit_tokens);
  enum class PlaceResult { kPlaced, kBlocked, kDropped };
  PlaceResult PlacePd(Request& r);
  PlaceResult PlaceColocated(Request& r);
  void FailWaitingWithoutCapacity(Clock now);
  void Dequeue(Request& r);  // waiting counters only; the queue entry goes stale

  // --- results (core_results.cc) -------------------------------------------------------------
  void OnStep(Worker& worker, const v1::StepResults& step);
  void OnToken(Worker& worker, const v1::TokenResult& token);
  void OnFailure(Worker& worker, const v1::RequestFailure& failure);
  void OnKvReady(Worker& worker, const v1::KvReady& ready);
  void OnKvFailed(Worker& worker, const v1::KvFailed& failed);
  void OnKvSent(Worker& worker, const v1::KvSent& sent);
  void AppendToken(Request& r, const v1::TokenResult& token);
  void StartDecode(Request& r);
  // Extends r's decode table towards len(tokens) + lookahead; with `preempt`, preempts requests
  // (possibly r) until it covers at least len(tokens) + 1, and sends AppendBlocks.
  void Grow(Request& r, bool preempt);

  // --- workers (core_workers.cc) -------------------------------------------------------------
  void OnWorkerLost(Worker& worker, const std::string& why);

  // --- AFD (core_afd.cc) ---------------------------------------------------------------------
  // An AFD group's state as of its last membership change.
  struct AfdGroup {
    bool complete = false;
    std::string why;  // AfdGroupComplete's reason while incomplete
  };
  // Recomputes `group`'s completeness from its non-draining FFN members and sets afd_complete
  // on its attention members; forgets a group without members.
  void RefreshAfdGroup(const std::string& group);
  // AfdPeers (the group's FFN members, draining ones included, and its completeness) to every
  // attention member of `group`, or only to `only` when it is not 0.
  void SendAfdPeers(const std::string& group, WorkerId only = 0);
  void OnAfdWorkerAdded(const Worker& worker);
  void OnAfdWorkerDraining(const Worker& worker);  // it was not draining before
  // `worker` (already out of `workers`) left. An FFN worker: its group's peers change, and the
  // requests on the group's attention workers fail unless it was draining and the group still
  // runs without it.
  void OnAfdWorkerLost(const Worker& worker, const std::string& why);
  // Why no decode target can take a request needing `num_blocks` decode blocks although an
  // attention worker of an incomplete AFD group could ("no decode capacity: AFD group g0 is
  // incomplete: expert 3 has no FFN worker"); "" when a non-draining decode target could, or no
  // non-draining attention worker could either.
  std::string AfdBlocker(int num_blocks = 0) const;
  // Why HasServingCapacity() is false, for errors and readiness.
  std::string NoCapacityReason() const;

  SchedulerConfig config;
  SchedulerMetrics* metrics = nullptr;
  Outbox outbox;
  std::map<WorkerId, std::unique_ptr<Worker>> workers;  // ordered: ties go to the lowest id
  // The model and geometry every worker must match (the first live worker's registration).
  // An FFN registration (no KV pool) stands in only while no KV-holding worker is registered.
  std::optional<v1::RegisterWorkerRequest> geometry;
  std::map<std::string, AfdGroup> afd_groups;  // by name; ordered for stable messages
  absl::flat_hash_map<RequestId, std::unique_ptr<Request>> requests;
  absl::flat_hash_map<std::pair<FrontendId, uint64_t>, RequestId> by_client;
  WaitingQueue waiting;
  int num_waiting = 0;
  int64_t waiting_tokens = 0;
  std::optional<Clock> no_capacity_since;

  WorkerId next_worker_id = 1;
  RequestId next_request_id = 1;
  uint64_t next_arrival = 0;
  uint64_t event_stamp = 0;
  std::mt19937_64 rng;

  uint64_t num_finished = 0;
  uint64_t num_rejected = 0;
  uint64_t num_preempted = 0;
  uint64_t prefix_cache_hit_tokens = 0;

  std::vector<RequestId> touched;  // scratch: requests that got tokens in the current step
};

inline int CeilDiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace cleave::scheduler
