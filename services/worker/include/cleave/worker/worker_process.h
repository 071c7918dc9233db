// The `cleave worker` role: loads the model, sizes its KV pool, registers with the scheduler,
// keeps its lease with heartbeats, and runs the engine on the deltas of one bidirectional
// stream. If the scheduler goes away it keeps retrying, and re-registers (as a new worker, its
// old requests forgotten) when the scheduler is back.
//
// Operations: an HTTP port (options.http) serves /metrics (the worker_metrics.h series), /health
// and /ready; its address goes to the scheduler (RegisterWorkerRequest.http_address) for
// Prometheus service discovery. /ready is 200 while the worker is registered with its stream up,
// the engine loop has iterated within the last 2 s and no shutdown was asked for; else 503 with
// the reason. Shutdown (SIGTERM/SIGINT) drains: the worker sends Drain on its stream, keeps
// serving until it holds no request and no unflushed or pending KV transfer (or drain_grace_s
// passes), then half-closes the stream and returns OK. With no stream up it returns at once.
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
  // HOST:PORT of the worker's HTTP port (/metrics, /health, /ready); port 0 = any free port (the
  // scheduler's /discovery/prometheus lists it); "off" = none.
  std::string http = "127.0.0.1:0";
  // SIGTERM: stop taking requests, finish the ones held for at most this long, then exit.
  int drain_grace_s = 30;
  // Security (see README "Deploy on Kubernetes"): the KV transport's cluster secret (file contents;
  // empty = off), the host decode peers dial for KV (empty = kv_listen_host), and mTLS files for
  // the scheduler channel (all empty = plaintext).
  std::string kv_secret;
  std::string kv_advertise_host;
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
};

absl::StatusOr<v1::WorkerRole> ParseWorkerRole(const std::string& role);

// Runs until `shutdown` is requested and the drain above is over. Errors only for what prevents
// starting (model, ports, a scheduler that refuses this worker).
absl::Status RunWorker(const WorkerProcessOptions& options, ShutdownLatch& shutdown);

}  // namespace cleave::worker
