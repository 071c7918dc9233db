// The scheduler's HTTP port (admin::AdminServer): /metrics (the recorded SchedulerMetrics plus
// gauges collected from a Stats() snapshot at each scrape), /health, /ready (the control plane:
// not while draining), /ready/serving (also not while SchedulerCore::NotReadyReason() says why
// requests cannot run, e.g. an incomplete AFD group),
// /discovery/prometheus (Prometheus HTTP service discovery: every registered worker's HTTP port,
// labelled with its role and name), /debug/stats (the Stats() snapshot as JSON). Private to
// cleave_scheduler.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "absl/status/statusor.h"
#include "cleave/admin/admin_server.h"
#include "cleave/common/metrics.h"
#include "cleave/scheduler/scheduler_metrics.h"
#include "cleave/v1/control.pb.h"

namespace cleave::scheduler {

class SchedulerHttp {
 public:
  // `stats` returns the scheduler's current Stats(), `not_ready` (may be empty) why it cannot serve
  // ("" when it can); both are called from the HTTP thread and take the service's lock themselves.
  static absl::StatusOr<std::unique_ptr<SchedulerHttp>> Create(std::function<v1::StatsResponse()> stats,
                                                               std::function<std::string()> not_ready = {});

  SchedulerMetrics* metrics() { return metrics_.get(); }
  // Starts the port. The object must outlive the returned server.
  absl::StatusOr<std::unique_ptr<admin::AdminServer>> Serve(const admin::AdminServerOptions& options);
  void SetDraining() { draining_.store(true, std::memory_order_relaxed); }
  std::string Render();  // what /metrics answers (fresh snapshot)

 private:
  SchedulerHttp(std::function<v1::StatsResponse()> stats, std::function<std::string()> not_ready)
      : stats_(std::move(stats)), not_ready_(std::move(not_ready)) {}
  absl::Status RegisterGauges();
  v1::StatsResponse Snapshot() const;

  const std::function<v1::StatsResponse()> stats_;
  const std::function<std::string()> not_ready_;
  metrics::Registry registry_;
  std::unique_ptr<SchedulerMetrics> metrics_;
  std::atomic<bool> draining_{false};
  // The snapshot every collector of one scrape reads (one lock of the scheduler per scrape).
  mutable std::mutex snapshot_mu_;
  v1::StatsResponse snapshot_;
};

}  // namespace cleave::scheduler
