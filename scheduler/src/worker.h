// A registered worker as the scheduler tracks it: its registration, lease, the block manager that
// is the one source of truth for its KV pool, and the requests it holds. Private to
// cleave_scheduler; owned by SchedulerCore::Impl.
#pragma once

#include <algorithm>
#include <cstdint>

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
        blocks(registration.num_kv_blocks(), registration.block_size()) {}

  v1::WorkerRole role() const { return reg.role(); }
  int num_running() const { return static_cast<int>(requests.size()); }
  bool has_room() const { return num_running() < reg.max_running(); }
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
};

}  // namespace cleave::scheduler
