// A registered worker as the scheduler tracks it: its registration, lease, the block manager that
// is the one source of truth for its KV pool, and the requests it holds. Private to
// cleave_scheduler; owned by SchedulerCore::Impl.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "cleave/scheduler/block_manager.h"
#include "cleave/scheduler/scheduler_core.h"
#include "cleave/v1/control.pb.h"
#include "request.h"

namespace cleave::scheduler {

struct Worker {
  Worker(WorkerId worker_id, const v1::RegisterWorkerRequest& registration, Clock now)
      : id(worker_id),
        reg(registration),
        last_heartbeat(now),
        // An FFN worker (AFD) holds no KV and no state, whatever its registration says.
        blocks(registration.role() == v1::WORKER_ROLE_FFN ? 0 : registration.num_kv_blocks(),
               registration.block_size()) {
    if (role() == v1::WORKER_ROLE_FFN) return;
    // Lowest slot on top, so a fresh worker hands out 0, 1, 2, ...
    for (int32_t s = registration.num_state_slots() - 1; s >= 0; --s) free_slots.push_back(s);
  }

  v1::WorkerRole role() const { return reg.role(); }
  int num_running() const { return static_cast<int>(requests.size()); }
  // A request placed here needs a running slot and, for Mamba models, a state slot.
  bool has_room() const {
    return !draining && num_running() < reg.max_running() && (!has_state() || !free_slots.empty());
  }
  // The model carries recurrent (Mamba) state per request: no prefix reuse here, since a cached
  // KV prefix without the SSM state at that position cannot resume a sequence.
  bool has_state() const { return reg.num_state_slots() > 0; }

  // Takes `id` onto this worker: records it and gives its placement a state slot (Mamba models).
  // Callers check has_room() first.
  void Attach(RequestId id, Placement& p) {
    requests.insert(id);
    p.involved = true;
    if (has_state() && p.state_slot < 0) {
      p.state_slot = free_slots.back();
      free_slots.pop_back();
    }
  }
  // Drops `id` from this worker and returns its state slot.
  void Release(RequestId id, Placement& p) {
    requests.erase(id);
    if (p.state_slot >= 0) free_slots.push_back(p.state_slot);
    p.state_slot = -1;
  }
  // Longest sequence (tokens) a request can reach here: its max_model_len, and its whole pool.
  int64_t max_length() const {
    return std::min<int64_t>(reg.max_model_len(),
                             static_cast<int64_t>(reg.num_kv_blocks()) * reg.block_size());
  }

  const WorkerId id;
  const v1::RegisterWorkerRequest reg;
  Clock last_heartbeat;
  BlockManager blocks;
  // Requests this worker holds: prefilling (P), expecting KV or decoding (D), running (colocated).
  absl::flat_hash_set<RequestId> requests;
  // Prefill workers: prompt tokens placed here whose first token has not come back yet.
  int64_t queued_prompt_tokens = 0;
  std::vector<int32_t> free_slots;  // state slots no request holds (a stack)
  int reported_waiting = 0;         // StepResults.num_waiting of its last step
  uint64_t num_preempted = 0;       // requests preempted off it
  bool draining = false;            // it sent Drain: no new placements
  bool afd_complete = false;        // ATTENTION: its AFD group can run (a decode target then)
};

}  // namespace cleave::scheduler
