// The `cleave worker` role: loads the model, sizes its KV pool, registers with the scheduler,
// keeps its lease with heartbeats, and runs the engine on the deltas of one bidirectional
// stream. If the scheduler goes away it keeps retrying, and re-registers (as a new worker, its
// old requests forgotten) when the scheduler is back.
//
// Operations: an HTTP port (options.http) serves /metrics (the worker_metrics.h series), /health
// and /ready; its address goes to the scheduler (RegisterWorkerRequest.http_address) for
// Prometheus service discovery. /ready is 200 while the worker is registered with its stream up,
// the engine loop has iterated within the last 2 s and no shutdown was asked for; else 503 with
// the reason. Roles attention and ffn (AFD): an attention worker is a decode worker whose layers'
// FFNs run on its group's FFN workers (afd.h), which the scheduler names in AfdPeers; it is ready
// only while the scheduler reports its group complete. An ffn worker loads only the dense FFNs
// and its experts, serves them on its activation listener, registers with the scheduler (which
// tells the group's attention workers) and holds no KV. Shutdown (SIGTERM/SIGINT) drains: the worker sends Drain on its stream, keeps
// serving until it holds no request and no unflushed or pending KV transfer (or drain_grace_s
// passes), then half-closes the stream and returns OK. With no stream up it returns at once.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

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
  // Where the model runs: "cpu", or "cuda" / "cuda:N" (weights, KV cache and every kernel on that
  // GPU). weight_dtype: the device's weight matrices, "bf16" (converted at load) or "as_stored".
  // kv_transport: how a decode worker receives KV, "tcp" (host memory), "nccl" or "cuda-ipc"
  // (device memory; one of these is required when prefill and decode run on GPUs).
  std::string device = "cpu";
  std::string weight_dtype = "bf16";
  std::string kv_transport = "tcp";
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

  // Attention-FFN disaggregation (roles attention and ffn; see docs/afd.md).
  std::string afd_group;            // the AFD group; required for both roles
  int micro_batches = 2;            // attention: m micro-batches per step (1, 2 or 3: ping-pong)
  int ffn_call_timeout_ms = 5000;   // attention: an FFN answer later than this fails the step
  // ffn: this worker's index in its group and the group's FFN worker count; the experts it owns
  // follow from the model (expert_placement.h), unless ffn_experts lists them explicitly.
  int ffn_shard = 0;
  int ffn_shards = 1;
  std::vector<int> ffn_experts;
  bool ffn_shared_expert = false;   // with ffn_experts: it owns the shared expert too
  std::string ffn_listen_host = "127.0.0.1";
  int ffn_port = 0;                 // activation listener; 0 = any free port
};

absl::StatusOr<v1::WorkerRole> ParseWorkerRole(const std::string& role);

// Runs until `shutdown` is requested and the drain above is over. Errors only for what prevents
// starting (model, ports, a scheduler that refuses this worker).
absl::Status RunWorker(const WorkerProcessOptions& options, ShutdownLatch& shutdown);

}  // namespace cleave::worker
