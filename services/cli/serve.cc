// `cleave serve`: every role of a config on this machine, each its own process (scheduler, the
// worker groups, the frontend), supervised: prints the URL once the frontend is ready, stops
// them all on Ctrl-C / SIGTERM or when the scheduler or frontend dies. A worker that dies is
// logged and left dead — the scheduler fails over to the remaining workers, as it would in a
// cluster.
//
// Stopping goes from the clients inwards, each stage SIGTERM then SIGKILL after its bound:
//   1. the frontend: it drains (new requests 503, those in flight finish) and exits;
//      bound frontend.drain_grace_s + 10 s;
//   2. the workers: they drain what they still hold (nothing, normally) and exit;
//      bound the largest workers[].drain_grace_s + 10 s;
//   3. the scheduler; bound 10 s.
// The scheduler stays up until the workers are gone, so requests in flight can finish. Serve
// exits 0 when every process still running at the stop exited with status 0.
#include <arpa/inet.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <optional>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "cleave/common/shutdown.h"
#include "cleave/common/tls.h"
#include "cleave/frontend/api_keys.h"
#include "cleave/v1/worker_role.h"
#include "commands.h"
#include "config.h"

namespace cleave::cli {
namespace {

// The stop stages, in order.
enum class Stage { kFrontend = 0, kWorkers = 1, kScheduler = 2 };

struct Child {
  std::string name;
  pid_t pid = -1;
  Stage stage = Stage::kScheduler;
  bool critical = false;
  bool exited = false;
};

// Slack past a process's own drain grace for it to close its streams and exit.
constexpr std::chrono::seconds kExitSlack{10};

std::string SelfExe() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  return n > 0 ? std::string(buf, n) : "cleave";
}

absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv) {
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) return absl::InternalError(absl::StrCat("fork: ", strerror(errno)));
  if (pid == 0) {
    // The child must not inherit serve's blocked SIGINT/SIGTERM, and dies with serve.
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
    // Its own process group: a Ctrl-C in the terminal reaches serve alone, which then stops the
    // children in order (a scheduler that got the SIGINT too would go before the frontend drained).
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    std::vector<char*> args;
    for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execv(args[0], args.data());
    _exit(127);
  }
  return pid;
}

// GET /ready on the frontend: true on a 200. `api_key` ("" = none) goes in as a Bearer token.
bool FrontendReady(const std::string& host, int port, const std::string& api_key) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return false;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  inet_pton(AF_INET, host == "0.0.0.0" ? "127.0.0.1" : host.c_str(), &addr.sin_addr);
  timeval tv{1, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  bool ok = false;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string auth = api_key.empty() ? "" : absl::StrCat("Authorization: Bearer ", api_key, "\r\n");
    const std::string req =
        absl::StrCat("GET /ready HTTP/1.1\r\nHost: localhost\r\n", auth, "Connection: close\r\n\r\n");
    if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size())) {
      char buf[64] = {};
      const ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);
      ok = n > 12 && std::strncmp(buf + 9, "200", 3) == 0;
    }
  }
  close(fd);
  return ok;
}

// SIGTERM to the children of one stage still running, then waits for them up to `bound`
// (SIGKILL after). False when one of them did not exit with status 0.
bool StopStage(std::vector<Child>& children, Stage stage, std::chrono::seconds bound) {
  bool clean = true;
  for (const Child& c : children) {
    if (c.stage == stage && !c.exited) kill(c.pid, SIGTERM);
  }
  const auto deadline = std::chrono::steady_clock::now() + bound;
  for (Child& c : children) {
    if (c.stage != stage) continue;
    while (!c.exited) {
      int status = 0;
      const pid_t r = waitpid(c.pid, &status, WNOHANG);
      if (r == c.pid || r < 0) {
        c.exited = true;
        if (r < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
          clean = false;
          CLEAVE_LOG(Warning) << c.name << " (pid " << c.pid << ") "
                              << (r < 0                 ? std::string("could not be waited for")
                                  : WIFSIGNALED(status) ? absl::StrCat("was killed by signal ", WTERMSIG(status))
                                                        : absl::StrCat("exited with status ", WEXITSTATUS(status)));
        }
        break;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        CLEAVE_LOG(Warning) << c.name << " did not stop in " << bound.count() << " s; killing it";
        kill(c.pid, SIGKILL);
        waitpid(c.pid, &status, 0);
        c.exited = true;
        clean = false;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  return clean;
}

// Frontend, then workers, then scheduler (see the file comment).
bool StopAll(std::vector<Child>& children, const ServeConfig& config) {
  int worker_grace_s = 0;
  for (const WorkerGroup& g : config.workers) worker_grace_s = std::max(worker_grace_s, g.options.drain_grace_s);
  bool clean = StopStage(children, Stage::kFrontend, std::chrono::seconds(config.frontend.drain_grace_s) + kExitSlack);
  clean &= StopStage(children, Stage::kWorkers, std::chrono::seconds(worker_grace_s) + kExitSlack);
  clean &= StopStage(children, Stage::kScheduler, kExitSlack);
  return clean;
}

// The security options every child gets as flags (paths absolute), checked here first so that a
// bad file stops serve before anything starts. Secrets never go on a command line: only paths.
struct SecurityArgs {
  std::vector<std::string> tls;        // --tls-ca/--tls-cert/--tls-key, or none
  std::vector<std::string> worker;     // + --kv-secret-file
  std::vector<std::string> frontend;   // + --api-keys-file, --admin-http
  std::string probe_key;               // an API key for serve's own /ready probe ("" = none)
};

absl::StatusOr<SecurityArgs> CheckSecurity(const ServeConfig& c) {
  SecurityArgs a;
  absl::StatusOr<std::optional<tls::TlsPem>> pem = tls::LoadTlsPem(c.tls);
  if (!pem.ok()) return pem.status();
  if (c.tls.enabled()) a.tls = {"--tls-ca", c.tls.ca_file, "--tls-cert", c.tls.cert_file, "--tls-key", c.tls.key_file};
  a.worker = a.tls;
  if (!c.kv_secret_file.empty()) {
    if (absl::StatusOr<std::string> secret = tls::LoadSecretFile(c.kv_secret_file); !secret.ok()) {
      return secret.status();
    }
    a.worker.insert(a.worker.end(), {"--kv-secret-file", c.kv_secret_file});
  }
  const char* env_keys = std::getenv("CLEAVE_API_KEYS");
  absl::StatusOr<frontend::ApiKeys> keys =
      frontend::ApiKeys::Load(c.frontend.api_keys_file, env_keys != nullptr ? env_keys : "");
  if (!keys.ok()) return keys.status();
  if (keys->enabled()) a.probe_key = keys->keys().front();
  a.frontend = a.tls;
  if (!c.frontend.api_keys_file.empty()) a.frontend.insert(a.frontend.end(), {"--api-keys-file", c.frontend.api_keys_file});
  a.frontend.insert(a.frontend.end(), {"--admin-http", c.frontend.admin_http});
  return a;
}

absl::Status RunServe(const std::string& config_path) {
  ShutdownLatch& shutdown = ShutdownLatch::InstallSignalHandlers();
  absl::StatusOr<ServeConfig> config = config_path.empty() ? DefaultServeConfig() : LoadServeConfig(config_path);
  if (!config.ok()) return config.status();
  absl::StatusOr<SecurityArgs> security = CheckSecurity(*config);
  if (!security.ok()) return security.status();
  absl::StatusOr<std::pair<std::string, int>> http = SplitHostPort(config->frontend.http);
  if (!http.ok()) return http.status();
  const auto& [host, port] = *http;
  const std::string exe = SelfExe();
  const std::string sched_addr = config->scheduler.listen;
  std::vector<Child> children;
  auto start = [&](std::string name, std::vector<std::string> argv, Stage stage) -> absl::Status {
    argv.insert(argv.begin(), exe);
    absl::StatusOr<pid_t> pid = Spawn(argv);
    if (!pid.ok()) return pid.status();
    children.push_back({std::move(name), *pid, stage, /*critical=*/stage != Stage::kWorkers, false});
    return absl::OkStatus();
  };
  std::vector<std::string> with_config;
  if (!config_path.empty()) with_config = {"--config", config_path};

  auto add = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  absl::Status s =
      start("scheduler",
            add(add({"scheduler", "--listen", sched_addr, "--http", config->scheduler.http}, with_config), security->tls),
            Stage::kScheduler);
  int index = 0;
  for (const WorkerGroup& g : config->workers) {
    const std::string role = v1::WorkerRoleName(g.options.role);
    for (int r = 0; s.ok() && r < g.replicas; ++r, ++index) {
      const std::string name = absl::StrCat(role, "-", r);
      absl::StatusOr<std::string> worker_http = ReplicaHttpAddress(g.options.http, r);
      if (!worker_http.ok()) {
        s = worker_http.status();
        break;
      }
      std::vector<std::string> argv = {"worker", "--role", role, "--scheduler", sched_addr, "--model",
                                       config->model, "--name", name};
      argv.insert(argv.end(), {"--kv-blocks", std::to_string(g.options.kv_blocks), "--kv-cache-mb",
                               std::to_string(g.options.kv_cache_mb), "--block-size",
                               std::to_string(g.options.block_size), "--max-batch-tokens",
                               std::to_string(g.options.max_batch_tokens), "--max-running",
                               std::to_string(g.options.max_running), "--threads",
                               std::to_string(g.options.threads), "--kv-host", g.options.kv_listen_host,
                               "--http", *worker_http, "--drain-grace-s", std::to_string(g.options.drain_grace_s),
                               "--device", g.options.device, "--weight-dtype", g.options.weight_dtype,
                               "--kv-transport", g.options.kv_transport});
      if (!g.options.kv_advertise_host.empty()) {
        argv.insert(argv.end(), {"--kv-advertise-host", g.options.kv_advertise_host});
      }
      const std::vector<std::string> afd = AfdWorkerArgs(g, r);
      argv.insert(argv.end(), afd.begin(), afd.end());
      s = start(name, add(argv, security->worker), Stage::kWorkers);
    }
  }
  if (s.ok()) {
    s = start("frontend", add({"frontend", "--scheduler", sched_addr, "--model", config->model, "--http",
                                config->frontend.http, "--grpc", config->frontend.grpc, "--drain-grace-s",
                                std::to_string(config->frontend.drain_grace_s)},
                               add(with_config, security->frontend)), Stage::kFrontend);
  }
  if (!s.ok()) {
    StopAll(children, *config);
    return s;
  }

  bool announced = false;
  const auto started = std::chrono::steady_clock::now();
  int exit_status = 0;
  while (!shutdown.WaitFor(std::chrono::milliseconds(100))) {
    bool critical_died = false;
    for (Child& c : children) {
      int status = 0;
      if (c.exited || waitpid(c.pid, &status, WNOHANG) != c.pid) continue;
      c.exited = true;
      const std::string how = WIFSIGNALED(status) ? absl::StrCat("killed by signal ", WTERMSIG(status))
                                                  : absl::StrCat("exited with status ", WEXITSTATUS(status));
      CLEAVE_LOG(Warning) << c.name << " (pid " << c.pid << ") " << how;
      if (c.critical) critical_died = true;
    }
    if (critical_died) {
      exit_status = 1;
      break;
    }
    if (!announced && FrontendReady(host, port, security->probe_key)) {
      announced = true;
      std::printf("cleave: serving %s at http://%s:%d/v1 (OpenAI API), gRPC on %s; Ctrl-C stops\n",
                  config->model.c_str(), host.c_str(), port, config->frontend.grpc.c_str());
      std::fflush(stdout);
    }
    if (!announced && std::chrono::steady_clock::now() - started > std::chrono::seconds(60)) {
      CLEAVE_LOG(Warning) << "the frontend is not ready after 60 s; still waiting";
      announced = true;
    }
  }
  CLEAVE_LOG(Info) << "stopping " << children.size() << " processes: frontend, workers, scheduler";
  const bool clean = StopAll(children, *config);
  if (exit_status != 0) return absl::InternalError("a critical process (scheduler or frontend) died");
  if (!clean) return absl::InternalError("not every process stopped cleanly");
  CLEAVE_LOG(Info) << "all processes stopped";
  return absl::OkStatus();
}

}  // namespace

void RegisterServe(CLI::App& app) {
  auto config = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand("serve", "Run scheduler, workers and frontend on this machine");
  cmd->add_option("--config", *config, "YAML config (default: 1 prefill + 1 decode worker on loopback)");
  cmd->callback([config] {
    if (absl::Status s = RunServe(*config); !s.ok()) Fail(s);
  });
}

}  // namespace cleave::cli
