// Worker registration, leases, and what happens to a lost worker's requests (AFD groups:
// core_afd.cc).
#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/scheduler/afd_group.h"
#include "core_impl.h"

namespace cleave::scheduler {
namespace {

absl::Status ValidateRegistration(const v1::RegisterWorkerRequest& reg) {
  switch (reg.role()) {
    case v1::WORKER_ROLE_PREFILL:
    case v1::WORKER_ROLE_DECODE:
    case v1::WORKER_ROLE_COLOCATED:
    case v1::WORKER_ROLE_ATTENTION:
    case v1::WORKER_ROLE_FFN:
      break;
    default:
      return absl::InvalidArgumentError(absl::StrCat("unknown worker role ", reg.role()));
  }
  // An FFN worker (AFD) has no KV pool and runs no batch of its own: only the model's shape must
  // be there.
  const bool ffn = reg.role() == v1::WORKER_ROLE_FFN;
  const std::tuple<const char*, int, bool> sizes[] = {
      {"num_kv_blocks", reg.num_kv_blocks(), !ffn},
      {"block_size", reg.block_size(), !ffn},
      {"max_batch_tokens", reg.max_batch_tokens(), !ffn},
      {"max_running", reg.max_running(), !ffn},
      {"num_layers", reg.num_layers(), true},
      {"vocab_size", reg.vocab_size(), true},
      {"max_model_len", reg.max_model_len(), true}};
  for (const auto& [name, value, positive] : sizes) {
    if (positive ? value <= 0 : value < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, positive ? " must be > 0, got " : " must be >= 0, got ", value));
    }
  }
  if (reg.role() == v1::WORKER_ROLE_DECODE && reg.kv_address().empty()) {
    return absl::InvalidArgumentError("a decode worker needs a kv_address");
  }
  if (reg.role() == v1::WORKER_ROLE_ATTENTION && reg.kv_address().empty()) {
    return absl::InvalidArgumentError("an attention worker needs a kv_address");
  }
  if ((reg.role() == v1::WORKER_ROLE_ATTENTION || ffn) && reg.afd_group().empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(ffn ? "an FFN" : "an attention", " worker needs an afd_group"));
  }
  if (ffn) {
    if (reg.ffn().address().empty()) {
      return absl::InvalidArgumentError("an FFN worker needs ffn.address");
    }
    CLEAVE_RETURN_IF_ERROR(ValidateFfnShard(reg.ffn()));
  }
  return absl::OkStatus();
}

// `compare_block_size` is false for FFN registrations (no KV pool) and against an FFN one.
absl::Status CheckSameModel(const v1::RegisterWorkerRequest& have,
                            const v1::RegisterWorkerRequest& reg, bool compare_block_size) {
  if (reg.model_id() != have.model_id()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model_id '", reg.model_id(), "' differs from the workers' '", have.model_id(), "'"));
  }
  const std::tuple<const char*, int, int, bool> same[] = {
      {"block_size", reg.block_size(), have.block_size(), compare_block_size},
      {"num_layers", reg.num_layers(), have.num_layers(), true},
      {"vocab_size", reg.vocab_size(), have.vocab_size(), true}};
  for (const auto& [name, got, want, compare] : same) {
    if (compare && got != want) {
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
  OnAfdWorkerLost(worker, why);
}

absl::StatusOr<WorkerId> SchedulerCore::AddWorker(const v1::RegisterWorkerRequest& request,
                                                  Clock now) {
  CLEAVE_RETURN_IF_ERROR(ValidateRegistration(request));
  Impl& s = *impl_;
  // The geometry is the first live worker's, except that an FFN worker's (no KV pool, no block
  // size) gives way to the first worker with KV: block sizes are compared among those only.
  const bool holds_kv = request.role() != v1::WORKER_ROLE_FFN;
  const bool kv_live = std::any_of(s.workers.begin(), s.workers.end(), [](const auto& entry) {
    return entry.second->role() != v1::WORKER_ROLE_FFN;
  });
  if (!s.workers.empty()) {
    CLEAVE_RETURN_IF_ERROR(CheckSameModel(*s.geometry, request, holds_kv && kv_live));
  }
  if (s.workers.empty() || (holds_kv && !kv_live)) s.geometry = request;
  const WorkerId id = s.next_worker_id++;
  const Worker& added = *s.workers.emplace(id, std::make_unique<Worker>(id, request, now))
                             .first->second;
  s.OnAfdWorkerAdded(added);
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
