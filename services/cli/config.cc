#include "config.h"

#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <set>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "cleave/common/status.h"

namespace cleave::cli {
namespace {

absl::Status CheckKeys(const YAML::Node& node, const std::string& where, const std::set<std::string>& allowed) {
  if (!node.IsMap()) return absl::InvalidArgumentError(absl::StrCat(where, " must be a mapping"));
  for (const auto& kv : node) {
    const std::string key = kv.first.as<std::string>();
    if (!allowed.contains(key)) {
      return absl::InvalidArgumentError(absl::StrCat("unknown key '", key, "' in ", where));
    }
  }
  return absl::OkStatus();
}

template <typename T>
void Read(const YAML::Node& node, const char* key, T& out) {
  if (node[key]) out = node[key].as<T>();
}

absl::StatusOr<ServeConfig> Parse(const YAML::Node& root, const std::string& base_dir) {
  ServeConfig c = DefaultServeConfig();
  if (auto s = CheckKeys(root, "the config", {"model", "scheduler", "workers", "frontend", "tls", "kv_secret_file"});
      !s.ok()) {
    return s;
  }
  Read(root, "model", c.model);
  if (YAML::Node t = root["tls"]) {
    if (auto st = CheckKeys(t, "tls", {"ca_file", "cert_file", "key_file"}); !st.ok()) return st;
    Read(t, "ca_file", c.tls.ca_file);
    Read(t, "cert_file", c.tls.cert_file);
    Read(t, "key_file", c.tls.key_file);
    if (absl::Status st = tls::ValidateTlsFiles(c.tls, "tls"); !st.ok()) return st;
    for (std::string* f : {&c.tls.ca_file, &c.tls.cert_file, &c.tls.key_file}) *f = ResolvePath(*f, base_dir);
  }
  Read(root, "kv_secret_file", c.kv_secret_file);
  c.kv_secret_file = ResolvePath(c.kv_secret_file, base_dir);
  if (YAML::Node s = root["scheduler"]) {
    if (auto st = CheckKeys(s, "scheduler", {"listen", "policy", "max_waiting", "max_waiting_tokens",
                                             "retry_after_s", "lease_ms", "heartbeat_ms", "prefix_cache",
                                             "decode_lookahead_tokens", "http"});
        !st.ok()) {
      return st;
    }
    auto& sc = c.scheduler.config;
    Read(s, "listen", c.scheduler.listen);
    Read(s, "http", c.scheduler.http);
    std::string policy = "fcfs";
    Read(s, "policy", policy);
    if (policy != "fcfs" && policy != "priority") {
      return absl::InvalidArgumentError(absl::StrCat("scheduler.policy must be fcfs or priority, got ", policy));
    }
    sc.policy = policy == "fcfs" ? scheduler::Policy::kFcfs : scheduler::Policy::kPriority;
    Read(s, "max_waiting", sc.max_waiting);
    Read(s, "max_waiting_tokens", sc.max_waiting_tokens);
    Read(s, "retry_after_s", sc.retry_after_s);
    Read(s, "lease_ms", sc.lease_ms);
    Read(s, "heartbeat_ms", sc.heartbeat_ms);
    Read(s, "prefix_cache", sc.enable_prefix_cache);
    Read(s, "decode_lookahead_tokens", sc.decode_lookahead_tokens);
  }
  if (YAML::Node ws = root["workers"]) {
    if (!ws.IsSequence()) return absl::InvalidArgumentError("workers must be a list");
    c.workers.clear();
    for (const YAML::Node& w : ws) {
      if (auto st = CheckKeys(w, "a worker group", {"role", "replicas", "kv_blocks", "kv_cache_mb", "block_size",
                                                   "max_batch_tokens", "max_running", "threads", "kv_listen_host", "http",
                                                   "drain_grace_s", "kv_advertise_host", "afd_group",
                                                   "micro_batches", "ffn_call_timeout_ms", "ffn_experts",
                                                   "ffn_shared_expert", "ffn_listen_host", "ffn_port", "device",
                                                   "weight_dtype", "kv_transport"});
          !st.ok()) {
        return st;
      }
      WorkerGroup g;
      std::string role;
      Read(w, "role", role);
      absl::StatusOr<v1::WorkerRole> r = worker::ParseWorkerRole(role);
      if (!r.ok()) return r.status();
      g.options.role = *r;
      Read(w, "replicas", g.replicas);
      Read(w, "kv_blocks", g.options.kv_blocks);
      Read(w, "kv_cache_mb", g.options.kv_cache_mb);
      Read(w, "block_size", g.options.block_size);
      Read(w, "max_batch_tokens", g.options.max_batch_tokens);
      Read(w, "max_running", g.options.max_running);
      Read(w, "threads", g.options.threads);
      Read(w, "kv_listen_host", g.options.kv_listen_host);
      Read(w, "kv_advertise_host", g.options.kv_advertise_host);
      Read(w, "http", g.options.http);
      Read(w, "drain_grace_s", g.options.drain_grace_s);
      Read(w, "afd_group", g.options.afd_group);
      Read(w, "micro_batches", g.options.micro_batches);
      Read(w, "ffn_call_timeout_ms", g.options.ffn_call_timeout_ms);
      Read(w, "ffn_experts", g.options.ffn_experts);
      Read(w, "ffn_shared_expert", g.options.ffn_shared_expert);
      Read(w, "ffn_listen_host", g.options.ffn_listen_host);
      Read(w, "ffn_port", g.options.ffn_port);
      Read(w, "device", g.options.device);
      Read(w, "weight_dtype", g.options.weight_dtype);
      Read(w, "kv_transport", g.options.kv_transport);
      const bool afd = g.options.role == v1::WORKER_ROLE_ATTENTION || g.options.role == v1::WORKER_ROLE_FFN;
      if (afd && g.options.afd_group.empty()) {
        return absl::InvalidArgumentError(absl::StrCat("workers[].afd_group is required for the ", role, " role"));
      }
      if (g.options.micro_batches < 1 || g.options.micro_batches > 8) {
        return absl::InvalidArgumentError("workers[].micro_batches must be in [1, 8]");
      }
      if ((!g.options.ffn_experts.empty() || g.options.ffn_shared_expert) && g.replicas != 1) {
        return absl::InvalidArgumentError(
            "workers[].ffn_experts names one FFN worker's experts: give each such group replicas: 1");
      }
      if (g.replicas < 1) return absl::InvalidArgumentError("workers[].replicas must be at least 1");
      if (g.options.drain_grace_s < 0) return absl::InvalidArgumentError("workers[].drain_grace_s must be >= 0");
      c.workers.push_back(g);
    }
  }
  if (YAML::Node f = root["frontend"]) {
    if (auto st = CheckKeys(f, "frontend", {"http", "grpc", "threads", "max_body_bytes", "drain_grace_s",
                                            "api_keys_file", "admin_http"});
        !st.ok()) {
      return st;
    }
    Read(f, "api_keys_file", c.frontend.api_keys_file);
    c.frontend.api_keys_file = ResolvePath(c.frontend.api_keys_file, base_dir);
    Read(f, "admin_http", c.frontend.admin_http);
    Read(f, "http", c.frontend.http);
    Read(f, "grpc", c.frontend.grpc);
    Read(f, "threads", c.frontend.threads);
    Read(f, "max_body_bytes", c.frontend.max_body_bytes);
    Read(f, "drain_grace_s", c.frontend.drain_grace_s);
    if (c.frontend.drain_grace_s < 0) return absl::InvalidArgumentError("frontend.drain_grace_s must be >= 0");
  }
  if (absl::Status st = ValidatePorts(c); !st.ok()) return st;
  return c;
}

// A fixed port range [first, first + count) claimed by `what`.
struct PortRange {
  std::string what;
  int first = 0;
  int count = 1;
};

// Appends the range of `address` unless it is "off" (when allowed) or port 0.
absl::Status Claim(std::vector<PortRange>& ranges, std::string what, const std::string& address, bool may_be_off,
                   int count = 1) {
  if (may_be_off && address == "off") return absl::OkStatus();
  absl::StatusOr<std::pair<std::string, int>> hp = SplitHostPort(address);
  if (!hp.ok()) return absl::InvalidArgumentError(absl::StrCat(what, ": ", hp.status().message()));
  if (hp->second == 0) return absl::OkStatus();
  if (hp->second + count - 1 > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ports ", hp->second, "..", hp->second + count - 1,
                                                   " run past 65535"));
  }
  ranges.push_back({std::move(what), hp->second, count});
  return absl::OkStatus();
}

std::string Describe(const PortRange& r) {
  return r.count == 1 ? absl::StrCat(r.what, " (port ", r.first, ")")
                      : absl::StrCat(r.what, " (ports ", r.first, "..", r.first + r.count - 1, ")");
}

}  // namespace

absl::StatusOr<std::pair<std::string, int>> SplitHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("address '", address, "' is not HOST:PORT"));
  }
  const std::string port = address.substr(colon + 1);
  char* end = nullptr;
  const long p = std::strtol(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || p < 0 || p > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("bad port in '", address, "'"));
  }
  return std::make_pair(address.substr(0, colon), static_cast<int>(p));
}

absl::Status ValidatePorts(const ServeConfig& c) {
  std::vector<PortRange> ranges;
  CLEAVE_RETURN_IF_ERROR(Claim(ranges, "scheduler.listen", c.scheduler.listen, false));
  CLEAVE_RETURN_IF_ERROR(Claim(ranges, "scheduler.http", c.scheduler.http, true));
  CLEAVE_RETURN_IF_ERROR(Claim(ranges, "frontend.http", c.frontend.http, false));
  CLEAVE_RETURN_IF_ERROR(Claim(ranges, "frontend.grpc", c.frontend.grpc, true));
  CLEAVE_RETURN_IF_ERROR(Claim(ranges, "frontend.admin_http", c.frontend.admin_http, true));
  for (size_t i = 0; i < c.workers.size(); ++i) {
    CLEAVE_RETURN_IF_ERROR(Claim(ranges, absl::StrCat("workers[", i, "].http"), c.workers[i].options.http, true,
                                 c.workers[i].replicas));
    const worker::WorkerProcessOptions& o = c.workers[i].options;
    if (o.role == v1::WORKER_ROLE_FFN && o.ffn_port != 0) {
      CLEAVE_RETURN_IF_ERROR(Claim(ranges, absl::StrCat("workers[", i, "].ffn_port"),
                                   absl::StrCat(o.ffn_listen_host, ":", o.ffn_port), false, c.workers[i].replicas));
    }
  }
  for (size_t i = 0; i < ranges.size(); ++i) {
    for (size_t j = i + 1; j < ranges.size(); ++j) {
      const PortRange& a = ranges[i];
      const PortRange& b = ranges[j];
      if (a.first < b.first + b.count && b.first < a.first + a.count) {
        return absl::InvalidArgumentError(absl::StrCat("port conflict: ", Describe(a), " overlaps ", Describe(b)));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReplicaHttpAddress(const std::string& group_http, int replica) {
  if (group_http == "off") return group_http;
  absl::StatusOr<std::pair<std::string, int>> hp = SplitHostPort(group_http);
  if (!hp.ok()) return hp.status();
  if (hp->second == 0) return group_http;
  return absl::StrCat(hp->first, ":", hp->second + replica);
}

absl::StatusOr<std::vector<int>> ParseIntList(const std::string& text, const std::string& what) {
  std::vector<int> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": '", std::string(part), "' is not an integer"));
    }
    out.push_back(v);
  }
  return out;
}

std::vector<std::string> AfdWorkerArgs(const WorkerGroup& g, int replica) {
  const worker::WorkerProcessOptions& o = g.options;
  std::vector<std::string> argv;
  if (o.role == v1::WORKER_ROLE_ATTENTION) {
    argv = {"--afd-group", o.afd_group, "--micro-batches", std::to_string(o.micro_batches),
            "--ffn-call-timeout-ms", std::to_string(o.ffn_call_timeout_ms)};
  } else if (o.role == v1::WORKER_ROLE_FFN) {
    argv = {"--afd-group", o.afd_group, "--ffn-host", o.ffn_listen_host, "--ffn-port",
            std::to_string(o.ffn_port == 0 ? 0 : o.ffn_port + replica)};
    if (!o.ffn_experts.empty()) argv.insert(argv.end(), {"--ffn-experts", absl::StrJoin(o.ffn_experts, ",")});
    if (o.ffn_shared_expert) argv.push_back("--ffn-shared-expert");
    if (o.ffn_experts.empty() && !o.ffn_shared_expert) {
      argv.insert(argv.end(), {"--ffn-shard", std::to_string(replica), "--ffn-shards", std::to_string(g.replicas)});
    }
  }
  return argv;
}

ServeConfig DefaultServeConfig() {
  ServeConfig c;
  // The header's default is port 0 for embedders and tests; a deployment gets a fixed, documented
  // port so that Prometheus can be pointed at the scheduler before anything else is known.
  c.scheduler.http = "127.0.0.1:8100";
  WorkerGroup prefill, decode;
  prefill.options.role = v1::WORKER_ROLE_PREFILL;
  decode.options.role = v1::WORKER_ROLE_DECODE;
  c.workers = {prefill, decode};
  return c;
}

std::string ResolvePath(const std::string& path, const std::string& base_dir) {
  if (path.empty()) return path;
  std::filesystem::path p(path);
  if (p.is_relative()) p = base_dir.empty() ? std::filesystem::absolute(p) : std::filesystem::path(base_dir) / p;
  return p.lexically_normal().string();
}

absl::StatusOr<ServeConfig> LoadServeConfig(const std::string& path) {
  try {
    return Parse(YAML::LoadFile(path), std::filesystem::absolute(path).parent_path().string());
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config ", path, ": ", e.what()));
  }
}

}  // namespace cleave::cli
