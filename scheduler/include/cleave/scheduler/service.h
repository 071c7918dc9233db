// The scheduler process: SchedulerCore behind the cleave.v1.Scheduler gRPC service.
//
// Threads: gRPC handler threads read worker / frontend streams and call into the core under one
// mutex; every outgoing message is appended, still under that mutex, to the destination
// connection's queue (so each peer sees messages in the core's order) and written by that
// connection's own writer thread (so a slow peer never blocks the core). A ticker expires
// leases. The scheduler is off the per-token path: workers step on their own and report.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cleave/common/shutdown.h"
#include "cleave/scheduler/scheduler_core.h"

namespace cleave::scheduler {

struct SchedulerServerOptions {
  std::string listen = "127.0.0.1:50151";  // port 0 = any free port
  // HOST:PORT of the HTTP port (/metrics, /health, /ready, /discovery/prometheus); "off" = none.
  std::string http = "127.0.0.1:0";
  SchedulerConfig config;
  // Mutual TLS on the control plane (PEM paths; all empty = plaintext, else all three): clients
  // (workers, frontends) must present a certificate signed by this CA. Start() reads the files
  // and fails naming one that is missing or unreadable.
  std::string tls_ca_file;
  std::string tls_cert_file;
  std::string tls_key_file;
};

class SchedulerServer {
 public:
  static absl::StatusOr<std::unique_ptr<SchedulerServer>> Start(const SchedulerServerOptions& options);
  ~SchedulerServer();
  int port() const;
  int http_port() const;  // 0 when the HTTP port is off
  // Health NOT_SERVING and /ready 503 from now on; the service keeps running until Shutdown().
  void Drain();
  void Shutdown();

 private:
  struct Impl;
  explicit SchedulerServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// `cleave scheduler`: serves until SIGINT/SIGTERM.
absl::Status RunScheduler(const SchedulerServerOptions& options, ShutdownLatch& shutdown);

}  // namespace cleave::scheduler
