// The YAML deployment config (configs/*.yaml) shared by `cleave serve` and the single-role
// commands: one file describes the scheduler, the worker groups and the frontend.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/common/tls.h"
#include "cleave/scheduler/service.h"
#include "cleave/worker/worker_process.h"

namespace cleave::cli {

struct WorkerGroup {
  worker::WorkerProcessOptions options;  // role, KV pool, budgets (scheduler/model filled in)
  int replicas = 1;
};

struct FrontendConfig {
  std::string http = "127.0.0.1:8000";  // HOST:PORT of the OpenAI-compatible HTTP API
  std::string grpc = "127.0.0.1:50051"; // HOST:PORT of the cleave.v1.Generation gRPC API
  int threads = 2;                      // HTTP I/O threads
  size_t max_body_bytes = 8u << 20;
  // SIGTERM: new generation requests get 503 at once; those in flight get this long to finish
  // before they are cancelled and the process exits.
  int drain_grace_s = 30;
  // Client API keys, one per line (api_keys.h); "" = none unless CLEAVE_API_KEYS names some.
  std::string api_keys_file;
  // HOST:PORT of an admin listener without API keys (/metrics, /health, /ready, /debug/kv), to be
  // bound to an internal address; "off" = none.
  std::string admin_http = "off";
};

struct ServeConfig {
  std::string model = "models/stories260K";
  scheduler::SchedulerServerOptions scheduler;
  std::vector<WorkerGroup> workers;
  FrontendConfig frontend;
  // Mutual TLS on internal gRPC for every role of the config (the top-level `tls:` section);
  // all empty = plaintext.
  tls::TlsFiles tls;
  // The KV transport's cluster secret (a file of >= 32 bytes); "" = unauthenticated transport.
  std::string kv_secret_file;
};

// Unknown keys are errors (a typo must not silently fall back to a default), and so are fixed
// ports that collide (see ValidatePorts) and a `tls:` section without all three files. Relative
// file paths (tls.*, kv_secret_file, frontend.api_keys_file) are resolved against the config
// file's directory; the files themselves are read by the process that uses them, at its start.
absl::StatusOr<ServeConfig> LoadServeConfig(const std::string& path);
// `path` made absolute: relative paths are relative to `base_dir` ("" = the working directory).
std::string ResolvePath(const std::string& path, const std::string& base_dir = "");
// Every address must be HOST:PORT ("off" where a port may be disabled), and no two fixed ports
// may coincide: the scheduler's two, the frontend's two, and each worker group's HTTP range
// [port, port + replicas) (replica r listens on port + r; port 0 = any free port, never checked).
// Hosts are not compared: `cleave serve` runs everything on one machine, where 127.0.0.1:P and
// 0.0.0.0:P collide too.
absl::Status ValidatePorts(const ServeConfig& config);
// The HTTP address of replica `replica` of a worker group: port + replica, port 0 and "off" as is.
absl::StatusOr<std::string> ReplicaHttpAddress(const std::string& group_http, int replica);
// "HOST:PORT" -> (host, port); InvalidArgument naming the address otherwise.
absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& address);
// "0,2,4" -> {0, 2, 4}; InvalidArgument naming `what` otherwise.
absl::StatusOr<std::vector<int>> ParseIntList(const std::string& text, const std::string& what);
// The argv of `cleave worker` that `cleave serve` adds for an attention or ffn group's replica r
// (--afd-group, --micro-batches, --ffn-shard r --ffn-shards replicas, ...); empty for other roles.
std::vector<std::string> AfdWorkerArgs(const WorkerGroup& group, int replica);
// The built-in default: scheduler, one prefill and one decode worker, frontend on :8000.
ServeConfig DefaultServeConfig();

}  // namespace cleave::cli
