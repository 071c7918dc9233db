#include "config.h"

#include <yaml-cpp/yaml.h>

#include <set>

#include "absl/strings/str_cat.h"

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

absl::StatusOr<ServeConfig> Parse(const YAML::Node& root) {
  ServeConfig c = DefaultServeConfig();
  if (auto s = CheckKeys(root, "the config", {"model", "scheduler", "workers", "frontend"}); !s.ok()) return s;
  Read(root, "model", c.model);
  if (YAML::Node s = root["scheduler"]) {
    if (auto st = CheckKeys(s, "scheduler", {"listen", "policy", "max_waiting", "max_waiting_tokens",
                                             "retry_after_s", "lease_ms", "heartbeat_ms", "prefix_cache",
                                             "decode_lookahead_tokens"});
        !st.ok()) {
      return st;
    }
    auto& sc = c.scheduler.config;
    Read(s, "listen", c.scheduler.listen);
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
                                                   "max_batch_tokens", "max_running", "threads", "kv_listen_host"});
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
      if (g.replicas < 1) return absl::InvalidArgumentError("workers[].replicas must be at least 1");
      c.workers.push_back(g);
    }
  }
  if (YAML::Node f = root["frontend"]) {
    if (auto st = CheckKeys(f, "frontend", {"http", "grpc", "threads", "max_body_bytes"}); !st.ok()) return st;
    Read(f, "http", c.frontend.http);
    Read(f, "grpc", c.frontend.grpc);
    Read(f, "threads", c.frontend.threads);
    Read(f, "max_body_bytes", c.frontend.max_body_bytes);
  }
  return c;
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

ServeConfig DefaultServeConfig() {
  ServeConfig c;
  WorkerGroup prefill, decode;
  prefill.options.role = v1::WORKER_ROLE_PREFILL;
  decode.options.role = v1::WORKER_ROLE_DECODE;
  c.workers = {prefill, decode};
  return c;
}

absl::StatusOr<ServeConfig> LoadServeConfig(const std::string& path) {
  try {
    return Parse(YAML::LoadFile(path));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config ", path, ": ", e.what()));
  }
}

}  // namespace cleave::cli
