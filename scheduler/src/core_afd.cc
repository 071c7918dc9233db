// Attention-FFN disaggregation (AFD): an ATTENTION worker is a decode target like a DECODE worker,
// but it runs every layer's FFN on the FFN workers of its AFD group. So the group decides whether
// its attention workers may take requests (complete: AfdGroupComplete over the non-draining FFN
// members), the attention workers are told the group's FFN members (AfdPeers) whenever they may
// change, and a lost FFN worker ends the requests its group's attention workers were running.
#include <algorithm>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cleave/common/logging.h"
#include "cleave/scheduler/afd_group.h"
#include "core_impl.h"

namespace cleave::scheduler {
namespace {

bool InGroup(const Worker& w, const std::string& group, v1::WorkerRole role) {
  return w.role() == role && w.reg.afd_group() == group;
}

}  // namespace

void SchedulerCore::Impl::RefreshAfdGroup(const std::string& group) {
  std::vector<const v1::FfnShard*> serving;
  bool any = false;
  for (const auto& [id, w] : workers) {
    if (InGroup(*w, group, v1::WORKER_ROLE_FFN)) {
      any = true;
      // A draining FFN worker still answers the calls of requests in flight, but the group must
      // not count on it for new ones.
      if (!w->draining) serving.push_back(&w->reg.ffn());
    } else {
      any |= InGroup(*w, group, v1::WORKER_ROLE_ATTENTION);
    }
  }
  if (!any) {
    afd_groups.erase(group);
    return;
  }
  AfdGroup& g = afd_groups[group];
  g.why.clear();
  g.complete = AfdGroupComplete(serving, &g.why);
  for (auto& [id, w] : workers) {
    if (InGroup(*w, group, v1::WORKER_ROLE_ATTENTION)) w->afd_complete = g.complete;
  }
}

void SchedulerCore::Impl::SendAfdPeers(const std::string& group, WorkerId only) {
  v1::SchedulerMessage msg;
  v1::AfdPeers* peers = msg.mutable_afd_peers();
  for (const auto& [id, w] : workers) {
    if (!InGroup(*w, group, v1::WORKER_ROLE_FFN)) continue;
    v1::AfdPeer* peer = peers->add_peers();
    peer->set_worker_id(id);
    peer->set_name(w->reg.name());
    *peer->mutable_shard() = w->reg.ffn();
  }
  auto g = afd_groups.find(group);
  peers->set_complete(g != afd_groups.end() && g->second.complete);
  for (const auto& [id, w] : workers) {
    if (!InGroup(*w, group, v1::WORKER_ROLE_ATTENTION) || (only != 0 && id != only)) continue;
    outbox.to_workers.emplace_back(id, msg);
  }
}

void SchedulerCore::Impl::OnAfdWorkerAdded(const Worker& worker) {
  const std::string& group = worker.reg.afd_group();
  if (worker.role() == v1::WORKER_ROLE_ATTENTION) {
    RefreshAfdGroup(group);
    // The other attention workers' peers did not change.
    SendAfdPeers(group, worker.id);
  } else if (worker.role() == v1::WORKER_ROLE_FFN) {
    RefreshAfdGroup(group);
    SendAfdPeers(group);
  }
}

void SchedulerCore::Impl::OnAfdWorkerDraining(const Worker& worker) {
  // A draining attention worker only stops taking requests (has_room()); its peers stay.
  if (worker.role() != v1::WORKER_ROLE_FFN) return;
  RefreshAfdGroup(worker.reg.afd_group());
  SendAfdPeers(worker.reg.afd_group());
}

void SchedulerCore::Impl::OnAfdWorkerLost(const Worker& worker, const std::string& why) {
  const std::string& group = worker.reg.afd_group();
  if (worker.role() == v1::WORKER_ROLE_ATTENTION) {
    RefreshAfdGroup(group);  // forgets the group if it was the last member
    return;
  }
  if (worker.role() != v1::WORKER_ROLE_FFN) return;
  RefreshAfdGroup(group);
  SendAfdPeers(group);
  auto g = afd_groups.find(group);
  const bool complete = g != afd_groups.end() && g->second.complete;
  // A drained member leaving a group that runs without it took nothing in flight with it. Any
  // other loss leaves the attention workers' running requests without (part of) their FFN: fail
  // them now rather than count on the attention workers to notice; a re-run is not worth it when
  // the group cannot serve, and the client learns at once why.
  if (worker.draining && complete) return;
  for (const auto& [id, w] : workers) {
    if (!InGroup(*w, group, v1::WORKER_ROLE_ATTENTION) || w->requests.empty()) continue;
    std::vector<RequestId> ids(w->requests.begin(), w->requests.end());
    std::sort(ids.begin(), ids.end());
    const std::string message =
        absl::StrCat("AFD group ", group, " lost FFN worker ", worker.reg.name(), " (", why,
                     "); the request was running on ", w->reg.name());
    CLEAVE_LOG(Warning) << message << " (" << ids.size() << " requests fail)";
    for (RequestId rid : ids) {
      if (Request* r = FindRequest(rid)) Fail(*r, kCodeUnavailable, message);
    }
  }
}

std::string SchedulerCore::Impl::AfdBlocker(int num_blocks) const {
  std::set<std::string> blocked;
  for (const auto& [id, w] : workers) {
    if (w->draining || w->blocks.num_blocks() < num_blocks) continue;
    if (IsDecodeTarget(*w)) return "";
    if (w->role() == v1::WORKER_ROLE_ATTENTION) blocked.insert(w->reg.afd_group());
  }
  if (blocked.empty()) return "";
  std::vector<std::string> reasons;
  for (const std::string& group : blocked) {
    auto g = afd_groups.find(group);
    reasons.push_back(absl::StrCat("AFD group ", group, " is incomplete: ",
                                   g == afd_groups.end() ? "unknown group" : g->second.why));
  }
  return absl::StrCat("no decode capacity: ", absl::StrJoin(reasons, "; "));
}

std::string SchedulerCore::Impl::NoCapacityReason() const {
  std::string afd = AfdBlocker();
  if (afd.empty()) {
    return "no serving capacity registered (no prefill + decode pair, no colocated worker)";
  }
  const bool prefill = std::any_of(workers.begin(), workers.end(), [](const auto& entry) {
    return !entry.second->draining && entry.second->role() == v1::WORKER_ROLE_PREFILL;
  });
  return prefill ? afd : absl::StrCat(afd, " (and no prefill worker either)");
}

std::string SchedulerCore::NotReadyReason() const {
  if (HasServingCapacity() || impl_->AfdBlocker().empty()) return "";
  return impl_->NoCapacityReason();
}

}  // namespace cleave::scheduler
