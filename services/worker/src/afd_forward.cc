// AfdForward: one decode pass with every layer's FFN on the group's FFN workers (see afd.h).
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/worker/afd.h"

namespace cleave::worker {
namespace {

using Clock = std::chrono::steady_clock;

int64_t Micros(Clock::duration d) { return std::chrono::duration_cast<std::chrono::microseconds>(d).count(); }

}  // namespace

// One micro-batch's forward state, and its FFN calls of the layer in flight.
struct AfdForward::MicroBatch {
  const model::ForwardBatch* batch = nullptr;
  model::Workspace ws;
  model::HiddenState h;
  int layer = -1;  // whose FFN is in flight; -1 = none
  struct Call {
    FfnGroup::Peer* peer = nullptr;
    uint64_t ticket = 0;
    Clock::time_point sent;
    int64_t bytes_back = 0;
  };
  std::vector<Call> calls;
  // MoE dispatch, per owner (index into `owners`): its compact rows, assignments and answers,
  // and where each answer row goes in `combined` ([T*k slot rows | T shared-expert rows]).
  std::vector<FfnGroup::Peer*> owners;
  std::vector<std::vector<float>> rows, out;
  std::vector<std::vector<int32_t>> assign_rows, assign_experts, dest;
  std::vector<int32_t> token_row;  // [T] scratch: a token's compact row at the current owner
  std::vector<float> combined;
  std::vector<float> logits;
};

std::vector<int> SplitMicroBatches(std::span<const int> tokens, int m) {
  const int n = static_cast<int>(tokens.size());
  m = std::max(1, std::min(m, n));
  int64_t total = 0;
  for (int t : tokens) total += t;
  std::vector<int> starts{0};
  int64_t seen = 0;
  for (int i = 0; i < n && static_cast<int>(starts.size()) < m; ++i) {
    seen += tokens[i];
    // Close a run once it holds its share of the tokens, leaving a request for every later run.
    const int64_t share = total * static_cast<int64_t>(starts.size()) / m;
    if (seen >= share && n - (i + 1) >= m - static_cast<int>(starts.size())) starts.push_back(i + 1);
  }
  starts.push_back(n);
  return starts;
}

AfdForward::AfdForward(const model::DecoderModel& model, model::KvCache& cache, FfnGroup& group,
                       AfdOptions options)
    : model_(model), cache_(cache), group_(group), options_(options) {
  options_.micro_batches = std::clamp(options_.micro_batches, 1, 8);
  const int layers = model.config().num_hidden_layers;
  stats_.layer_round_trip_us.assign(layers, 0);
  stats_.layer_wait_us.assign(layers, 0);
  stats_.layer_calls.assign(layers, 0);
}

AfdForward::~AfdForward() { AbandonAll(); }

AfdStats AfdForward::TakeStats() {
  AfdStats out = stats_;
  const size_t layers = stats_.layer_calls.size();
  stats_ = AfdStats();
  stats_.layer_round_trip_us.assign(layers, 0);
  stats_.layer_wait_us.assign(layers, 0);
  stats_.layer_calls.assign(layers, 0);
  return out;
}

absl::Status AfdForward::Dispatch(MicroBatch& mb, int layer) {
  const model::FfnKind kind = model_.ffn_kind(layer);
  if (kind == model::FfnKind::kNone) return absl::OkStatus();  // a Mamba block: nothing to ship
  const int64_t d = model_.config().hidden_size;
  CLEAVE_ASSIGN_OR_RETURN(kernels::Tensor normed, model_.FfnInput(layer, mb.ws, mb.h));
  const int t = static_cast<int>(normed.dim(0));
  const float* x = normed.data_as<const float>();
  mb.layer = layer;
  mb.calls.clear();
  auto send = [&](FfnGroup::Peer* peer, const transport::FfnCall& call, int64_t bytes_back) -> absl::Status {
    MicroBatch::Call c{peer, 0, Clock::now(), bytes_back};
    absl::StatusOr<uint64_t> ticket = peer->conn->Send(call);
    if (!ticket.ok()) {
      return absl::UnavailableError(absl::StrCat("AFD: FFN worker ", peer->name, ": ", ticket.status().message()));
    }
    c.ticket = *ticket;
    mb.calls.push_back(c);
    stats_.bytes_sent += (static_cast<int64_t>(call.num_rows) * d) * 4 + int64_t{call.num_assign} * 8;
    return absl::OkStatus();
  };

  if (kind == model::FfnKind::kDense) {
    // Rows split in contiguous chunks over the dense-capable peers; answers land in h.delta.
    const std::vector<FfnGroup::Peer*>& peers = group_.dense_peers();
    const int n = std::min<int>(static_cast<int>(peers.size()), t);
    float* out = mb.h.delta.data_as<float>();
    for (int i = 0; i < n; ++i) {
      const int r0 = static_cast<int>(int64_t{t} * i / n), r1 = static_cast<int>(int64_t{t} * (i + 1) / n);
      transport::FfnCall call;
      call.op = transport::FfnOp::kDense;
      call.layer = layer;
      call.num_rows = r1 - r0;
      call.rows = x + r0 * d;
      call.out = out + r0 * d;
      CLEAVE_RETURN_IF_ERROR(send(peers[i], call, int64_t{r1 - r0} * d * 4));
    }
    return absl::OkStatus();
  }

  CLEAVE_RETURN_IF_ERROR(model_.RouteMoe(layer, normed, mb.ws));
  const kernels::MoeRouting& routing = mb.ws.routing;
  const int k = routing.top_k, experts = model_.config().moe.num_experts;
  const bool shared = model_.config().moe.shared_expert_intermediate_size > 0;
  mb.owners.clear();
  auto owner_index = [&](FfnGroup::Peer* p) {
    auto it = std::find(mb.owners.begin(), mb.owners.end(), p);
    if (it != mb.owners.end()) return static_cast<int>(it - mb.owners.begin());
    const size_t i = mb.owners.size();
    mb.owners.push_back(p);
    for (auto* v : {&mb.rows, &mb.out}) if (v->size() <= i) v->resize(i + 1);
    for (auto* v : {&mb.assign_rows, &mb.assign_experts, &mb.dest}) if (v->size() <= i) v->resize(i + 1);
    mb.rows[i].clear();
    mb.assign_rows[i].clear();
    mb.assign_experts[i].clear();
    mb.dest[i].clear();
    return static_cast<int>(i);
  };
  // Assign token by token, so that each owner's compact rows are in token order.
  std::vector<int32_t>& token_row = mb.token_row;
  auto assign = [&](int token, int expert, int32_t dest) {
    const int o = owner_index(group_.owner(expert));
    int32_t& row = token_row[static_cast<size_t>(o) * t + token];
    if (row < 0) {
      row = static_cast<int32_t>(mb.rows[o].size() / d);
      mb.rows[o].insert(mb.rows[o].end(), x + token * d, x + (token + 1) * d);
    }
    mb.assign_rows[o].push_back(row);
    mb.assign_experts[o].push_back(expert);
    mb.dest[o].push_back(dest);
  };
  // [owner][token]: there are at most experts + 1 owners (the shared expert's among them).
  token_row.assign(static_cast<size_t>(t) * (experts + 1), -1);
  for (int token = 0; token < t; ++token) {
    for (int j = 0; j < k; ++j) assign(token, routing.topk_ids[token * k + j], token * k + j);
    if (shared) assign(token, experts, t * k + token);
  }
  mb.combined.resize(static_cast<size_t>(t * k + (shared ? t : 0)) * d);
  for (size_t o = 0; o < mb.owners.size(); ++o) {
    const int n = static_cast<int>(mb.assign_rows[o].size());
    mb.out[o].resize(static_cast<size_t>(n) * d);
    transport::FfnCall call;
    call.op = transport::FfnOp::kExperts;
    call.layer = layer;
    call.num_rows = static_cast<int>(mb.rows[o].size() / d);
    call.rows = mb.rows[o].data();
    call.num_assign = n;
    call.assign_rows = mb.assign_rows[o].data();
    call.assign_experts = mb.assign_experts[o].data();
    call.out = mb.out[o].data();
    CLEAVE_RETURN_IF_ERROR(send(mb.owners[o], call, int64_t{n} * d * 4));
  }
  return absl::OkStatus();
}

absl::Status AfdForward::Finish(MicroBatch& mb) {
  if (mb.layer < 0) return absl::OkStatus();
  const int layer = mb.layer;
  mb.layer = -1;
  absl::Status first_error;
  const auto wait_start = Clock::now();
  for (const MicroBatch::Call& c : mb.calls) {
    transport::FfnTiming timing;
    absl::Status st = c.peer->conn->Wait(c.ticket, c.sent + std::chrono::milliseconds(options_.call_timeout_ms), &timing);
    if (!st.ok()) {
      if (first_error.ok()) {
        first_error = absl::Status(st.code(), absl::StrCat("AFD: FFN worker ", c.peer->name, ", layer ", layer, ": ",
                                                           st.message()));
      }
      continue;
    }
    ++stats_.calls;
    stats_.round_trip_us += timing.round_trip_us;
    stats_.compute_us += timing.compute_us;
    stats_.bytes_received += c.bytes_back;
    stats_.layer_round_trip_us[layer] += timing.round_trip_us;
    ++stats_.layer_calls[layer];
  }
  const auto answered = Clock::now();
  const int64_t waited = Micros(answered - wait_start);
  Clock::time_point first_sent = wait_start;
  for (const MicroBatch::Call& c : mb.calls) first_sent = std::min(first_sent, c.sent);
  ++stats_.exchanges;
  stats_.exchange_us += Micros(answered - first_sent);
  stats_.wait_us += waited;
  stats_.layer_wait_us[layer] += waited;
  mb.calls.clear();
  CLEAVE_RETURN_IF_ERROR(first_error);
  if (model_.ffn_kind(layer) != model::FfnKind::kMoe) return absl::OkStatus();

  // Combine: every answer row to its slot (or shared-expert row), then the weighted sum.
  const int64_t d = model_.config().hidden_size;
  const int64_t t = mb.h.delta.dim(0), k = mb.ws.routing.top_k;
  for (size_t o = 0; o < mb.owners.size(); ++o) {
    for (size_t i = 0; i < mb.dest[o].size(); ++i) {
      std::memcpy(mb.combined.data() + mb.dest[o][i] * d, mb.out[o].data() + i * d, d * sizeof(float));
    }
  }
  kernels::Tensor slots(mb.combined.data(), kernels::DType::kF32, {t * k, d});
  const bool shared = model_.config().moe.shared_expert_intermediate_size > 0;
  kernels::Tensor shared_out(mb.combined.data() + t * k * d, kernels::DType::kF32, {t, d});
  return model_.CombineMoe(layer, slots, shared ? &shared_out : nullptr, mb.ws, mb.h);
}

void AfdForward::AbandonAll() {
  for (auto& mb : mbs_) {
    for (const MicroBatch::Call& c : mb->calls) {
      if (c.peer->conn != nullptr) {
        (void)c.peer->conn->Wait(c.ticket, c.sent + std::chrono::milliseconds(options_.call_timeout_ms));
      }
    }
    mb->calls.clear();
    mb->layer = -1;
  }
}

absl::Status AfdForward::Run(std::span<const model::ForwardBatch> batches, std::vector<float>& logits) {
  const int m = static_cast<int>(batches.size());
  CLEAVE_CHECK_ARG(m >= 1, "AFD: no micro-batch");
  CLEAVE_RETURN_IF_ERROR(group_.Prepare(model_.config()));
  while (static_cast<int>(mbs_.size()) < m) mbs_.push_back(std::make_unique<MicroBatch>());
  ++stats_.steps;
  auto run = [&]() -> absl::Status {
    for (int i = 0; i < m; ++i) {
      MicroBatch& mb = *mbs_[i];
      mb.batch = &batches[i];
      mb.layer = -1;
      CLEAVE_ASSIGN_OR_RETURN(mb.h, model_.Embed(batches[i], mb.ws));
    }
    const int layers = model_.config().num_hidden_layers;
    for (int l = 0; l < layers; ++l) {
      for (int i = 0; i < m; ++i) {
        MicroBatch& mb = *mbs_[i];
        // The previous layer's FFN answer for this micro-batch was computed while the other
        // micro-batches ran their mixers.
        CLEAVE_RETURN_IF_ERROR(Finish(mb));
        CLEAVE_RETURN_IF_ERROR(model_.RunMixer(l, *mb.batch, cache_, mb.ws, mb.h));
        CLEAVE_RETURN_IF_ERROR(Dispatch(mb, l));
      }
    }
    logits.clear();
    for (int i = 0; i < m; ++i) {
      MicroBatch& mb = *mbs_[i];
      CLEAVE_RETURN_IF_ERROR(Finish(mb));
      CLEAVE_RETURN_IF_ERROR(model_.ComputeLogits(*mb.batch, mb.ws, mb.h, mb.logits));
      logits.insert(logits.end(), mb.logits.begin(), mb.logits.end());
    }
    return absl::OkStatus();
  };
  absl::Status status = run();
  // Router statistics of every micro-batch, for the expert metrics.
  for (int i = 0; i < m; ++i) {
    std::vector<std::vector<int64_t>>& counts = mbs_[i]->ws.expert_tokens;
    if (expert_tokens_.size() < counts.size()) expert_tokens_.resize(counts.size());
    for (size_t l = 0; l < counts.size(); ++l) {
      if (expert_tokens_[l].size() < counts[l].size()) expert_tokens_[l].resize(counts[l].size(), 0);
      for (size_t e = 0; e < counts[l].size(); ++e) expert_tokens_[l][e] += std::exchange(counts[l][e], 0);
    }
  }
  if (!status.ok()) AbandonAll();
  return status;
}

}  // namespace cleave::worker
