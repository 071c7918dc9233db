#include "scheduler_http.h"

#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/v1/worker_role.h"
#include "nlohmann/json.hpp"

namespace cleave::scheduler {
namespace {

// One per-worker gauge or counter: its name, help, type and how to read it from WorkerStats.
struct WorkerSeries {
  const char* name;
  const char* help;
  metrics::MetricType type;
  double (*read)(const v1::WorkerStats&);
};

constexpr WorkerSeries kWorkerSeries[] = {
    {"cleave_scheduler_worker_running_requests", "Requests a worker holds (prefilling, transferring or decoding).",
     metrics::MetricType::kGauge, [](const v1::WorkerStats& w) { return double(w.num_running()); }},
    {"cleave_scheduler_worker_waiting_requests",
     "Requests a worker reported stalled or queued in its last step (waiting for a prefill slot or blocks).",
     metrics::MetricType::kGauge, [](const v1::WorkerStats& w) { return double(w.num_waiting()); }},
    {"cleave_scheduler_worker_kv_blocks", "KV blocks in a worker's pool.", metrics::MetricType::kGauge,
     [](const v1::WorkerStats& w) { return double(w.num_kv_blocks()); }},
    {"cleave_scheduler_worker_kv_blocks_used", "KV blocks of a worker held by requests.",
     metrics::MetricType::kGauge, [](const v1::WorkerStats& w) { return double(w.used_blocks()); }},
    {"cleave_scheduler_worker_kv_blocks_cached",
     "KV blocks of a worker in its prefix cache (with or without users).", metrics::MetricType::kGauge,
     [](const v1::WorkerStats& w) { return double(w.cached_blocks()); }},
    {"cleave_scheduler_worker_state_slots", "Mamba state slots of a worker (0: no recurrent layers).",
     metrics::MetricType::kGauge, [](const v1::WorkerStats& w) { return double(w.num_state_slots()); }},
    {"cleave_scheduler_worker_state_slots_used", "Mamba state slots of a worker held by requests.",
     metrics::MetricType::kGauge,
     [](const v1::WorkerStats& w) { return double(w.num_state_slots() - w.free_state_slots()); }},
    {"cleave_scheduler_worker_draining", "1 while a worker drains (nothing new is placed on it).",
     metrics::MetricType::kGauge, [](const v1::WorkerStats& w) { return w.draining() ? 1.0 : 0.0; }},
    {"cleave_scheduler_worker_preemptions_total", "Requests preempted off a worker since it registered.",
     metrics::MetricType::kCounter, [](const v1::WorkerStats& w) { return double(w.num_preempted()); }},
};

}  // namespace

absl::StatusOr<std::unique_ptr<SchedulerHttp>> SchedulerHttp::Create(std::function<v1::StatsResponse()> stats,
                                                                     std::function<std::string()> not_ready) {
  std::unique_ptr<SchedulerHttp> http(new SchedulerHttp(std::move(stats), std::move(not_ready)));
  CLEAVE_ASSIGN_OR_RETURN(http->metrics_, SchedulerMetrics::Create(http->registry_));
  CLEAVE_RETURN_IF_ERROR(http->RegisterGauges());
  return http;
}

v1::StatsResponse SchedulerHttp::Snapshot() const {
  std::lock_guard lock(snapshot_mu_);
  return snapshot_;
}

absl::Status SchedulerHttp::RegisterGauges() {
  auto global = [this](const char* name, const char* help, double (*read)(const v1::StatsResponse&)) {
    return registry_.AddGaugeCallback(name, help, {}, [this, read] {
      std::lock_guard lock(snapshot_mu_);
      return read(snapshot_);
    });
  };
  CLEAVE_RETURN_IF_ERROR(global("cleave_scheduler_queue_requests", "Admitted requests waiting for placement.",
                                [](const v1::StatsResponse& s) { return double(s.num_waiting()); }));
  CLEAVE_RETURN_IF_ERROR(global("cleave_scheduler_queue_prompt_tokens",
                                "Prompt tokens of the requests waiting for placement.",
                                [](const v1::StatsResponse& s) { return double(s.num_waiting_tokens()); }));
  CLEAVE_RETURN_IF_ERROR(global("cleave_scheduler_running_requests", "Requests placed on workers.",
                                [](const v1::StatsResponse& s) { return double(s.num_running()); }));
  CLEAVE_RETURN_IF_ERROR(registry_.AddGaugeCallback(
      "cleave_scheduler_draining", "1 while the scheduler shuts down.", {},
      [this] { return draining_.load(std::memory_order_relaxed) ? 1.0 : 0.0; }));
  CLEAVE_RETURN_IF_ERROR(registry_.AddCollectedFamily(
      "cleave_scheduler_workers", "Registered workers, by role.", metrics::MetricType::kGauge, {"role"}, [this] {
        const v1::StatsResponse s = Snapshot();
        std::vector<metrics::Sample> out;
        for (v1::WorkerRole role : {v1::WORKER_ROLE_PREFILL, v1::WORKER_ROLE_DECODE, v1::WORKER_ROLE_COLOCATED,
                                    v1::WORKER_ROLE_ATTENTION, v1::WORKER_ROLE_FFN}) {
          double n = 0;
          for (const v1::WorkerStats& w : s.workers()) n += w.role() == role ? 1 : 0;
          out.push_back({{v1::WorkerRoleName(role)}, n});
        }
        return out;
      }));
  for (const WorkerSeries& series : kWorkerSeries) {
    // Label values are worker names: set by operators at registration, one per worker, never by
    // clients; the series leave with their worker.
    CLEAVE_RETURN_IF_ERROR(registry_.AddCollectedFamily(
        series.name, series.help, series.type, {"worker", "role"}, [this, read = series.read] {
          const v1::StatsResponse s = Snapshot();
          std::vector<metrics::Sample> out;
          out.reserve(s.workers_size());
          for (const v1::WorkerStats& w : s.workers()) out.push_back({{w.name(), v1::WorkerRoleName(w.role())}, read(w)});
          return out;
        }));
  }
  return absl::OkStatus();
}

std::string SchedulerHttp::Render() {
  v1::StatsResponse fresh = stats_();
  {
    std::lock_guard lock(snapshot_mu_);
    snapshot_ = std::move(fresh);
  }
  return registry_.Render();
}

absl::StatusOr<std::unique_ptr<admin::AdminServer>> SchedulerHttp::Serve(const admin::AdminServerOptions& options) {
  // /ready is the control plane's: workers must be able to reach a scheduler whose decode capacity
  // is gone (a Kubernetes Service gated on it would keep out the FFN worker that completes an AFD
  // group). /ready/serving adds whether requests can run now, with the reason when not.
  std::map<std::string, admin::AdminHandler> routes = admin::StandardRoutes(
      registry_, [this]() -> std::string { return draining_.load() ? "draining" : std::string(); });
  std::map<std::string, admin::AdminHandler> serving = admin::StandardRoutes(
      registry_, [this]() -> std::string {
        if (draining_.load()) return "draining";
        return not_ready_ ? not_ready_() : std::string();
      });
  routes["/ready/serving"] = serving["/ready"];
  // Fresh snapshot per scrape: the standard route renders the registry only.
  routes["/metrics"] = [this] {
    return admin::AdminResponse{200, std::string(metrics::kContentType), Render()};
  };
  routes["/discovery/prometheus"] = [this] {
    nlohmann::json groups = nlohmann::json::array();
    const v1::StatsResponse s = stats_();
    for (const v1::WorkerStats& w : s.workers()) {
      if (w.http_address().empty()) continue;
      groups.push_back({{"targets", {w.http_address()}},
                        {"labels", {{"role", v1::WorkerRoleName(w.role())}, {"worker", w.name()}}}});
    }
    return admin::AdminResponse{200, "application/json", groups.dump()};
  };
  routes["/debug/stats"] = [this] {
    nlohmann::json workers = nlohmann::json::array();
    const v1::StatsResponse s = stats_();
    for (const v1::WorkerStats& w : s.workers()) {
      workers.push_back({{"id", w.worker_id()},
                         {"name", w.name()},
                         {"role", v1::WorkerRoleName(w.role())},
                         {"running", w.num_running()},
                         {"waiting", w.num_waiting()},
                         {"kv_blocks", w.num_kv_blocks()},
                         {"used_blocks", w.used_blocks()},
                         {"free_blocks", w.free_blocks()},
                         {"cached_blocks", w.cached_blocks()},
                         {"draining", w.draining()},
                         {"http_address", w.http_address()}});
      if (!w.afd_group().empty()) workers.back()["afd_group"] = w.afd_group();
      if (w.role() == v1::WORKER_ROLE_ATTENTION) workers.back()["afd_complete"] = w.afd_complete();
    }
    nlohmann::json body = {{"waiting", s.num_waiting()}, {"running", s.num_running()},
                           {"finished", s.num_finished()}, {"workers", workers}};
    return admin::AdminResponse{200, "application/json", body.dump()};
  };
  return admin::AdminServer::Start(options, std::move(routes));
}

}  // namespace cleave::scheduler
