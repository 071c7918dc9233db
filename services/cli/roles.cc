// The single-role commands a cluster runs, one per pod: `cleave scheduler`, `cleave worker`,
// `cleave frontend`. Each reads its section of a --config file when given; flags override it.
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "cleave/common/shutdown.h"
#include "cleave/common/tls.h"
#include "commands.h"
#include "config.h"
#include "frontend_main.h"

namespace cleave::cli {
namespace {

absl::StatusOr<ServeConfig> ConfigOrDefault(const std::string& path) {
  if (path.empty()) return DefaultServeConfig();
  return LoadServeConfig(path);
}

// --tls-ca / --tls-cert / --tls-key: each overrides its own file of the config's `tls:`.
struct TlsArgs {
  std::string ca, cert, key;
};

void AddTlsFlags(CLI::App* cmd, TlsArgs& a) {
  cmd->add_option("--tls-ca", a.ca, "PEM CA for mutual TLS on internal gRPC (with --tls-cert and --tls-key)");
  cmd->add_option("--tls-cert", a.cert, "PEM certificate of this process, signed by the --tls-ca CA");
  cmd->add_option("--tls-key", a.key, "PEM private key of --tls-cert");
}

// The config's TLS files with the flags applied (paths made absolute); all three or none.
absl::StatusOr<tls::TlsFiles> ResolveTls(const ServeConfig& c, const TlsArgs& a) {
  tls::TlsFiles f = c.tls;
  if (!a.ca.empty()) f.ca_file = ResolvePath(a.ca);
  if (!a.cert.empty()) f.cert_file = ResolvePath(a.cert);
  if (!a.key.empty()) f.key_file = ResolvePath(a.key);
  if (absl::Status s = tls::ValidateTlsFiles(f, "TLS (config tls: and --tls-* flags)"); !s.ok()) return s;
  return f;
}

absl::Status CheckHttpFlag(const std::string& address) {
  if (address.empty() || address == "off") return absl::OkStatus();
  absl::StatusOr<std::pair<std::string, int>> hp = SplitHostPort(address);
  return hp.ok() ? absl::OkStatus() : hp.status();
}

}  // namespace

void RegisterScheduler(CLI::App& app) {
  struct Args {
    std::string config, listen, policy, http;
    TlsArgs tls;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("scheduler", "Run the scheduler (control plane) until SIGINT/SIGTERM");
  AddTlsFlags(cmd, args->tls);
  cmd->add_option("--config", args->config, "YAML config (its scheduler: section)");
  cmd->add_option("--listen", args->listen, "HOST:PORT to serve the control plane on (default 127.0.0.1:50151)");
  cmd->add_option("--policy", args->policy, "fcfs or priority");
  cmd->add_option("--http", args->http,
                  "HOST:PORT of the HTTP port: /metrics, /health, /ready, /discovery/prometheus "
                  "(default 127.0.0.1:8100; 'off' disables)");
  cmd->callback([args] {
    ShutdownLatch& shutdown = ShutdownLatch::InstallSignalHandlers();
    absl::StatusOr<ServeConfig> c = ConfigOrDefault(args->config);
    if (!c.ok()) return Fail(c.status());
    if (!args->listen.empty()) c->scheduler.listen = args->listen;
    if (!args->http.empty()) {
      if (absl::Status st = CheckHttpFlag(args->http); !st.ok()) return Fail(st);
      c->scheduler.http = args->http;
    }
    if (!args->policy.empty()) {
      if (args->policy != "fcfs" && args->policy != "priority") {
        return Fail(absl::InvalidArgumentError("--policy must be fcfs or priority"));
      }
      c->scheduler.config.policy = args->policy == "fcfs" ? scheduler::Policy::kFcfs : scheduler::Policy::kPriority;
    }
    absl::StatusOr<tls::TlsFiles> tls_files = ResolveTls(*c, args->tls);
    if (!tls_files.ok()) return Fail(tls_files.status());
    c->scheduler.tls_ca_file = tls_files->ca_file;
    c->scheduler.tls_cert_file = tls_files->cert_file;
    c->scheduler.tls_key_file = tls_files->key_file;
    if (absl::Status s = scheduler::RunScheduler(c->scheduler, shutdown); !s.ok()) Fail(s);
  });
}

void RegisterWorker(CLI::App& app) {
  struct Args {
    std::string config, role, scheduler, model, name, kv_host, http, kv_secret_file, kv_advertise_host;
    TlsArgs tls;
    int kv_blocks = -1, kv_cache_mb = -1, block_size = -1, max_batch_tokens = -1, max_running = -1;
    int threads = -1, kv_port = -1, drain_grace_s = -1;
    std::string afd_group, ffn_host, ffn_experts;
    int micro_batches = -1, ffn_call_timeout_ms = -1, ffn_shard = -1, ffn_shards = -1, ffn_port = -1;
    bool ffn_shared_expert = false;
    std::string device, weight_dtype, kv_transport;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("worker", "Run one worker (prefill, decode, colocated, attention or ffn)");
  cmd->add_option("--role", args->role, "prefill, decode, colocated, attention or ffn")->required();
  cmd->add_option("--scheduler", args->scheduler, "scheduler HOST:PORT (default: the config's)");
  cmd->add_option("--config", args->config, "YAML config (the first workers: group of this role)");
  cmd->add_option("--model", args->model, "model directory");
  cmd->add_option("--name", args->name, "name shown in scheduler stats and logs");
  cmd->add_option("--kv-blocks", args->kv_blocks, "KV cache blocks (default: from --kv-cache-mb)");
  cmd->add_option("--kv-cache-mb", args->kv_cache_mb, "KV cache size in MiB (default 256)");
  cmd->add_option("--block-size", args->block_size, "tokens per KV block (default 16)");
  cmd->add_option("--max-batch-tokens", args->max_batch_tokens, "tokens per iteration (default 512)");
  cmd->add_option("--max-running", args->max_running, "running requests at most (default 256)");
  cmd->add_option("--threads", args->threads, "kernel threads (default: all cores)");
  cmd->add_option("--kv-host", args->kv_host, "address the KV receiver listens on (decode and attention roles)");
  cmd->add_option("--kv-port", args->kv_port, "port of the KV receiver (default: any free port)");
  cmd->add_option("--http", args->http,
                  "HOST:PORT of the HTTP port: /metrics, /health, /ready (default 127.0.0.1:0, any free "
                  "port; 'off' disables)");
  cmd->add_option("--drain-grace-s", args->drain_grace_s,
                  "on SIGTERM, seconds the requests held get to finish before exit (default 30)");
  cmd->add_option("--kv-secret-file", args->kv_secret_file,
                  "file of >= 32 bytes: the cluster secret that authenticates KV transport connections "
                  "(default: the config's kv_secret_file; none = unauthenticated)");
  cmd->add_option("--kv-advertise-host", args->kv_advertise_host,
                  "host peers dial for this worker: prefill workers for its KV (decode, attention; default "
                  "--kv-host), attention workers for its activation listener (ffn; default --ffn-host)");
  cmd->add_option("--afd-group", args->afd_group, "attention / ffn roles: the AFD group (required for them)");
  cmd->add_option("--micro-batches", args->micro_batches,
                  "attention role: micro-batches per step, 1-8 (default 2: ping-pong; 1 = no overlap)");
  cmd->add_option("--ffn-call-timeout-ms", args->ffn_call_timeout_ms,
                  "attention role: an FFN answer later than this fails the step (default 5000)");
  cmd->add_option("--ffn-shard", args->ffn_shard, "ffn role: this worker's index in its group (default 0)");
  cmd->add_option("--ffn-shards", args->ffn_shards, "ffn role: FFN workers in the group (default 1)");
  cmd->add_option("--ffn-experts", args->ffn_experts,
                  "ffn role: the experts it owns, e.g. 0,2,4 (default: its share of the placement)");
  cmd->add_flag("--ffn-shared-expert", args->ffn_shared_expert, "ffn role, with --ffn-experts: own the shared expert");
  cmd->add_option("--ffn-host", args->ffn_host, "ffn role: address the activation listener binds (default 127.0.0.1)");
  cmd->add_option("--ffn-port", args->ffn_port, "ffn role: activation listener port (default: any free port)");
  cmd->add_option("--device", args->device,
                  "where the model runs: cpu (default), cuda or cuda:N (prefill, decode, colocated roles)");
  cmd->add_option("--weight-dtype", args->weight_dtype,
                  "on a GPU: the weight matrices' type, bf16 (default, converted at load) or as_stored");
  cmd->add_option("--kv-transport", args->kv_transport,
                  "decode role: how KV arrives, tcp (default), nccl or cuda-ipc (GPU caches)");
  AddTlsFlags(cmd, args->tls);
  cmd->callback([args] {
    ShutdownLatch& shutdown = ShutdownLatch::InstallSignalHandlers();
    absl::StatusOr<ServeConfig> c = ConfigOrDefault(args->config);
    if (!c.ok()) return Fail(c.status());
    absl::StatusOr<v1::WorkerRole> role = worker::ParseWorkerRole(args->role);
    if (!role.ok()) return Fail(role.status());
    worker::WorkerProcessOptions o;
    o.role = *role;
    int group_replicas = 1;
    for (const WorkerGroup& g : c->workers) {
      if (g.options.role == *role) {
        o = g.options;
        group_replicas = g.replicas;
        break;
      }
    }
    // An FFN worker of a config's group of N owns one of N expert shards: which one must be said,
    // or it would silently take every expert.
    if (*role == v1::WORKER_ROLE_FFN && o.ffn_experts.empty() && !o.ffn_shared_expert && group_replicas > 1) {
      o.ffn_shards = group_replicas;
      if (args->ffn_shard < 0) {
        return Fail(absl::InvalidArgumentError(absl::StrCat(
            "the config's ffn group has ", group_replicas, " replicas: pass --ffn-shard R (0..",
            group_replicas - 1, ") to say which share of the experts this worker owns")));
      }
    }
    o.model_dir = args->model.empty() ? c->model : args->model;
    o.scheduler = args->scheduler.empty() ? c->scheduler.listen : args->scheduler;
    o.name = args->name;
    if (args->kv_blocks >= 0) o.kv_blocks = args->kv_blocks;
    if (args->kv_cache_mb >= 0) o.kv_cache_mb = args->kv_cache_mb;
    if (args->block_size >= 0) o.block_size = args->block_size;
    if (args->max_batch_tokens >= 0) o.max_batch_tokens = args->max_batch_tokens;
    if (args->max_running >= 0) o.max_running = args->max_running;
    if (args->threads >= 0) o.threads = args->threads;
    if (!args->kv_host.empty()) o.kv_listen_host = args->kv_host;
    if (args->kv_port >= 0) o.kv_port = args->kv_port;
    if (!args->http.empty()) {
      if (absl::Status st = CheckHttpFlag(args->http); !st.ok()) return Fail(st);
      o.http = args->http;
    }
    if (args->drain_grace_s >= 0) o.drain_grace_s = args->drain_grace_s;
    if (!args->kv_advertise_host.empty()) o.kv_advertise_host = args->kv_advertise_host;
    if (!args->afd_group.empty()) o.afd_group = args->afd_group;
    if (args->micro_batches >= 0) o.micro_batches = args->micro_batches;
    if (args->ffn_call_timeout_ms >= 0) o.ffn_call_timeout_ms = args->ffn_call_timeout_ms;
    if (args->ffn_shard >= 0) o.ffn_shard = args->ffn_shard;
    if (args->ffn_shards >= 0) o.ffn_shards = args->ffn_shards;
    if (!args->ffn_experts.empty()) {
      absl::StatusOr<std::vector<int>> experts = ParseIntList(args->ffn_experts, "--ffn-experts");
      if (!experts.ok()) return Fail(experts.status());
      o.ffn_experts = *experts;
    }
    if (args->ffn_shared_expert) o.ffn_shared_expert = true;
    if (!args->ffn_host.empty()) o.ffn_listen_host = args->ffn_host;
    if (args->ffn_port >= 0) o.ffn_port = args->ffn_port;
    if (!args->device.empty()) o.device = args->device;
    if (!args->weight_dtype.empty()) o.weight_dtype = args->weight_dtype;
    if (!args->kv_transport.empty()) o.kv_transport = args->kv_transport;
    const std::string secret_file =
        args->kv_secret_file.empty() ? c->kv_secret_file : ResolvePath(args->kv_secret_file);
    if (!secret_file.empty()) {
      absl::StatusOr<std::string> secret = tls::LoadSecretFile(secret_file);
      if (!secret.ok()) return Fail(secret.status());
      o.kv_secret = *std::move(secret);
    }
    absl::StatusOr<tls::TlsFiles> tls_files = ResolveTls(*c, args->tls);
    if (!tls_files.ok()) return Fail(tls_files.status());
    o.tls_ca_file = tls_files->ca_file;
    o.tls_cert_file = tls_files->cert_file;
    o.tls_key_file = tls_files->key_file;
    if (absl::Status s = worker::RunWorker(o, shutdown); !s.ok()) Fail(s);
  });
}

void RegisterFrontend(CLI::App& app) {
  struct Args {
    std::string config, scheduler, model, http, grpc, api_keys_file, admin_http;
    TlsArgs tls;
    int threads = -1, drain_grace_s = -1;
  };
  auto args = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand("frontend", "Run the OpenAI-compatible HTTP + gRPC frontend");
  cmd->add_option("--scheduler", args->scheduler, "scheduler HOST:PORT (default: the config's)");
  cmd->add_option("--config", args->config, "YAML config (its frontend: section)");
  cmd->add_option("--model", args->model, "model directory (tokenizer, chat template, limits)");
  cmd->add_option("--http", args->http, "HOST:PORT of the HTTP API (default 127.0.0.1:8000)");
  cmd->add_option("--grpc", args->grpc, "HOST:PORT of the gRPC API (default 127.0.0.1:50051; 'off' disables)");
  cmd->add_option("--threads", args->threads, "HTTP I/O threads (default 2)");
  cmd->add_option("--drain-grace-s", args->drain_grace_s,
                  "on SIGTERM, seconds the requests in flight get to finish before exit (default 30)");
  cmd->add_option("--api-keys-file", args->api_keys_file,
                  "client API keys, one per line; with any key (here or in CLEAVE_API_KEYS, comma-separated) "
                  "every route but /health needs 'Authorization: Bearer <key>'");
  cmd->add_option("--admin-http", args->admin_http,
                  "HOST:PORT of an admin listener without API keys: /metrics, /health, /ready, /debug/kv "
                  "(default off; bind it to an internal address)");
  AddTlsFlags(cmd, args->tls);
  cmd->callback([args] {
    ShutdownLatch& shutdown = ShutdownLatch::InstallSignalHandlers();
    absl::StatusOr<ServeConfig> c = ConfigOrDefault(args->config);
    if (!c.ok()) return Fail(c.status());
    FrontendRunOptions o;
    o.frontend = c->frontend;
    o.model_dir = args->model.empty() ? c->model : args->model;
    o.scheduler = args->scheduler.empty() ? c->scheduler.listen : args->scheduler;
    if (!args->http.empty()) o.frontend.http = args->http;
    if (!args->grpc.empty()) o.frontend.grpc = args->grpc;
    if (args->threads > 0) o.frontend.threads = args->threads;
    if (args->drain_grace_s >= 0) o.frontend.drain_grace_s = args->drain_grace_s;
    if (!args->api_keys_file.empty()) o.frontend.api_keys_file = ResolvePath(args->api_keys_file);
    if (!args->admin_http.empty()) {
      if (absl::Status st = CheckHttpFlag(args->admin_http); !st.ok()) return Fail(st);
      o.frontend.admin_http = args->admin_http;
    }
    absl::StatusOr<tls::TlsFiles> tls_files = ResolveTls(*c, args->tls);
    if (!tls_files.ok()) return Fail(tls_files.status());
    o.tls = *tls_files;
    if (absl::Status s = RunFrontend(o, shutdown); !s.ok()) Fail(s);
  });
}

}  // namespace cleave::cli
