// Worker registration, leases, and what happens to a lost worker's requests.
#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "core_impl.h"

namespace cleave::scheduler {
namespace {

absl::Status ValidateRegistration(const v1::RegisterWorkerRequest& reg) {
  switch (reg.role()) {
    case v1::WORKER_ROLE_PREFILL:
    case v1::WORKER_ROLE_DECODE:
    case v1::WORKER_ROLE_COLOCATED:
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown worker role ", reg.role()));
  }
  const std::pair<const char*, int> positive[] = {{"num_kv_blocks", reg.num_kv_blocks()},
                                                  {"block_size", reg.block_size()},
                                                  {"max_batch_tokens", reg.max_batch_tokens()},
                                                  {"max_running", reg.max_running()},
                                                  {"num_layers", reg.num_layers()},
                                                  {"vocab_size", reg.vocab_size()},
                                                  {"max_model_len", reg.max_model_len()}};
  for (const auto& [name, value] : positive) {
    if (value <= 0) {
      return absl::InvalidArgumentError(absl::StrCat(name, " must be > 0, got ", value));
    }
  }
  if (reg.role() == v1::WORKER_ROLE_DECODE && reg.kv_address().empty()) {
    return absl::InvalidArgumentError("a decode worker needs a kv_address");
  }
  return absl::OkStatus();
}

absl::Status CheckSameModel(const v1::RegisterWorkerRequest& have,
                            const v1::RegisterWorkerRequest& reg) {
  if (reg.model_id() != have.model_id()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model_id '", reg.model_id(), "' differs from the workers' '", have.model_id(), "'"));
  }
  const std::tuple<const char*, int, int> same[] = {
      {"block_size", reg.block_size(), have.block_size()},
      {"num_layers", reg.num_layers(), have.num_layers()},
      {"vocab_size", reg.vocab_size(), have.vocab_size()}};
  for (const auto& [name, got, want] : same) {
    if (got != want) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " ", got, " differs from the workers' ", want));
    }
  }
  return absl::OkStatus();
}

}  // namespace

void SchedulerCore::Impl::OnWorkerLost(Worker& worker, const std::string& why) {
  std::vector<RequestId> ids(worker.requests.begin(), worker.requests.end());
  std::sort(ids.begin(), ids.end());
  const std::string message =
      absl::StrCat("worker ", worker.reg.name(), " (id ", worker.id, ") lost: ", why);
  for (RequestId id : ids) {
    Request* r = FindRequest(id);
    if (r == nullptr) continue;
    const bool was_prefill = r->prefill.involved && r->prefill.worker == worker.id;
    // The worker is already out of `workers`: detaching its placement sends nothing, frees
    // nothing (its blocks are forgotten with it).
    if (was_prefill && r->state == RequestState::kDecoding) {
      Detach(*r, r->prefill, v1::REMOVE_REASON_FAILED);  // the KV is on the decode worker
      continue;
    }
    RerunOrFail(*r, kCodeUnavailable, message);
  }
}

absl::StatusOr<WorkerId> SchedulerCore::AddWorker(const v1::RegisterWorkerRequest& request,
                                                  Clock now) {
  CLEAVE_RETURN_IF_ERROR(ValidateRegistration(request));
  if (impl_->workers.empty()) {
    impl_->geometry = request;
  } else {
    CLEAVE_RETURN_IF_ERROR(CheckSameModel(*impl_->geometry, request));
  }
  const WorkerId id = impl_->next_worker_id++;
  impl_->workers.emplace(id, std::make_unique<Worker>(id, request, now));
  return id;
}

bool SchedulerCore::Heartbeat(WorkerId worker, Clock now) {
  Worker* w = impl_->FindWorker(worker);
  if (w == nullptr) return false;
  w->last_heartbeat = std::max(w->last_heartbeat, now);
  return true;
}

void SchedulerCore::RemoveWorker(WorkerId worker, const std::string& why) {
  auto it = impl_->workers.find(worker);
  if (it == impl_->workers.end()) return;
  std::unique_ptr<Worker> gone = std::move(it->second);
  impl_->workers.erase(it);
  impl_->OnWorkerLost(*gone, why);
}

std::vector<WorkerId> SchedulerCore::ExpireLeases(Clock now) {
  std::vector<WorkerId> lapsed;
  for (const auto& [id, w] : impl_->workers) {
    if (now - w->last_heartbeat > impl_->config.lease_ms) lapsed.push_back(id);
  }
  for (WorkerId id : lapsed) RemoveWorker(id, "lease expired");
  impl_->Count(&SchedulerMetrics::lease_expiries, lapsed.size());
  return lapsed;
}

}  // namespace cleave::scheduler
