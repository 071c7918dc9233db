// The `cleave worker` role: loads the model, sizes its KV pool, registers with the scheduler,
// keeps its lease with heartbeats, and runs the engine on the deltas of one bidirectional
// stream. If the scheduler goes away it keeps retrying, and re-registers (as a new worker, its
// old requests forgotten) when the scheduler is back.
#pragma once

#include <filesystem>
#include <string>

#include "absl/status/statusor.h"
#include "cleave/common/shutdown.h"
#include "cleave/v1/control.pb.h"

namespace cleave::worker {

struct WorkerProcessOptions {
  v1::WorkerRole role = v1::WORKER_ROLE_COLOCATED;
  std::filesystem::path model_dir;
  std::string scheduler;            // HOST:PORT
  std::string name;
  int kv_blocks = 0;                // 0: from kv_cache_mb
  int kv_cache_mb = 256;
  int block_size = 16;
  int max_batch_tokens = 512;
  int max_running = 256;
  int threads = 0;                  // kernel threads; 0 = hardware concurrency
  std::string kv_listen_host = "127.0.0.1";
  int kv_port = 0;                  // 0 = any free port (decode / colocated roles)
};

absl::StatusOr<v1::WorkerRole> ParseWorkerRole(const std::string& role);

// Runs until `shutdown` is requested. Errors only for what prevents starting (model, port).
absl::Status RunWorker(const WorkerProcessOptions& options, ShutdownLatch& shutdown);

}  // namespace cleave::worker
