// FfnGroup: the attention worker's view of its AFD group's FFN workers (see afd.h).
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cleave/common/logging.h"
#include "cleave/worker/afd.h"

namespace cleave::worker {
namespace {

// A broken or unreachable FFN worker is re-dialled at most this often, so that a dead peer does
// not cost every step a connect timeout.
constexpr std::chrono::seconds kRedialEvery{1};

std::string DescribeShard(const v1::AfdPeer& p) {
  std::string what = p.shard().dense() ? "dense" : "";
  if (p.shard().experts_size() > 0) {
    absl::StrAppend(&what, what.empty() ? "" : ", ", "experts ", absl::StrJoin(p.shard().experts(), ","));
  }
  if (p.shard().shared_expert()) absl::StrAppend(&what, what.empty() ? "" : ", ", "shared expert");
  return absl::StrCat(p.name(), "@", p.shard().address(), " (", what, ")");
}

}  // namespace

FfnGroup::FfnGroup(transport::ActivationOptions options) : options_(std::move(options)) {}

FfnGroup::~FfnGroup() = default;

void FfnGroup::SetPeers(const v1::AfdPeers& peers) {
  std::vector<std::string> parts;
  for (const v1::AfdPeer& p : peers.peers()) parts.push_back(DescribeShard(p));
  std::lock_guard lock(mu_);
  pending_ = peers;
  pending_valid_ = true;
  complete_ = peers.complete();
  describe_ = parts.empty() ? "no FFN workers" : absl::StrJoin(parts, "; ");
}

void FfnGroup::Clear() {
  std::lock_guard lock(mu_);
  pending_.Clear();
  pending_valid_ = true;
  complete_ = false;
  describe_ = "no FFN workers";
}

bool FfnGroup::complete() const {
  std::lock_guard lock(mu_);
  return complete_;
}

std::string FfnGroup::describe() const {
  std::lock_guard lock(mu_);
  return describe_;
}

absl::Status FfnGroup::Prepare(const model::ModelConfig& config) {
  {
    std::lock_guard lock(mu_);
    if (pending_valid_) {
      // Keep the connections of peers that stay (same worker id and address); drop the others.
      std::vector<std::unique_ptr<Peer>> next;
      for (const v1::AfdPeer& p : pending_.peers()) {
        auto it = std::find_if(peers_.begin(), peers_.end(), [&](const std::unique_ptr<Peer>& have) {
          return have && have->worker_id == p.worker_id() && have->shard.address() == p.shard().address();
        });
        std::unique_ptr<Peer> peer;
        if (it != peers_.end()) {
          peer = std::move(*it);
        } else {
          peer = std::make_unique<Peer>();
          peer->worker_id = p.worker_id();
          peer->name = p.name();
        }
        peer->shard = p.shard();
        next.push_back(std::move(peer));
      }
      peers_ = std::move(next);
      pending_valid_ = false;
    }
  }
  const auto now = std::chrono::steady_clock::now();
  for (auto& peer : peers_) {
    if (peer->conn != nullptr && peer->conn->broken().ok()) continue;
    if (peer->conn != nullptr) {
      peer->last_error = peer->conn->broken();
      peer->conn.reset();
    }
    if (peer->last_dial != std::chrono::steady_clock::time_point{} && now - peer->last_dial < kRedialEvery) continue;
    peer->last_dial = now;
    absl::StatusOr<std::unique_ptr<transport::FfnConnection>> conn =
        transport::FfnConnection::Connect(peer->shard.address(), options_);
    if (conn.ok()) {
      peer->conn = std::move(*conn);
      peer->last_error = absl::OkStatus();
      CLEAVE_LOG(Info) << "connected to FFN worker " << peer->name << " at " << peer->shard.address();
    } else {
      peer->last_error = conn.status();
      CLEAVE_LOG(Warning) << "cannot reach FFN worker " << peer->name << ": " << conn.status();
    }
  }
  const auto usable = [](const Peer* p) { return p->conn != nullptr; };
  const auto why = [](const Peer* p) {
    return p->last_error.ok() ? std::string("not connected yet") : std::string(p->last_error.message());
  };
  dense_.clear();
  for (auto& peer : peers_) {
    if (peer->shard.dense() && usable(peer.get())) dense_.push_back(peer.get());
  }
  const int experts = config.moe.num_experts;
  const bool shared = config.moe.shared_expert_intermediate_size > 0;
  owners_.assign(experts + 1, nullptr);
  std::vector<Peer*> listed(experts + 1, nullptr);  // an owner, reachable or not, for the message
  for (auto& peer : peers_) {
    for (int e : peer->shard.experts()) {
      if (e < 0 || e >= experts) continue;
      listed[e] = peer.get();
      if (usable(peer.get()) && owners_[e] == nullptr) owners_[e] = peer.get();
    }
    if (peer->shard.shared_expert() && shared) {
      listed[experts] = peer.get();
      if (usable(peer.get()) && owners_[experts] == nullptr) owners_[experts] = peer.get();
    }
  }
  if (peers_.empty()) return absl::UnavailableError("AFD: this attention worker's group has no FFN worker");
  const bool any_dense = std::any_of(config.layer_ffn.begin(), config.layer_ffn.end(),
                                     [](model::FfnKind k) { return k == model::FfnKind::kDense; });
  if (any_dense && dense_.empty()) {
    std::vector<std::string> reasons;
    for (auto& peer : peers_) reasons.push_back(absl::StrCat(peer->name, ": ", why(peer.get())));
    return absl::UnavailableError(absl::StrCat("AFD: no reachable FFN worker runs the dense layers (",
                                               absl::StrJoin(reasons, "; "), ")"));
  }
  for (int e = 0; e < experts + (shared ? 1 : 0); ++e) {
    if (owners_[e] != nullptr) continue;
    const std::string what = e == experts ? std::string("the shared expert") : absl::StrCat("expert ", e);
    if (listed[e] == nullptr) return absl::UnavailableError(absl::StrCat("AFD: no FFN worker owns ", what));
    return absl::UnavailableError(absl::StrCat("AFD: FFN worker ", listed[e]->name, " (owner of ", what,
                                               ") is unreachable: ", why(listed[e])));
  }
  return absl::OkStatus();
}

}  // namespace cleave::worker
