// The mixture-of-experts FFN of Mixtral, Qwen2-MoE and Jamba: router logits, top-k routing, the
// routed experts as one grouped pass, and Qwen2-MoE's sigmoid-gated shared expert.
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/moe.h"
#include "cleave/model/decoder.h"
#include "decoder_internal.h"

namespace cleave::model {

using kernels::Tensor;

// Expert names: Mixtral block_sparse_moe.{gate, experts.E.w1 (gate) / w3 (up) / w2 (down)};
// Qwen2-MoE mlp.{gate, experts.E.*_proj, shared_expert.*_proj, shared_expert_gate};
// Jamba feed_forward.{router, experts.E.*_proj}.
absl::Status DecoderModel::BindMoe(const std::string& p, MoeWeights& w) {
  const ModelConfig& c = config_;
  const MoeConfig& moe = c.moe;
  const int64_t d = c.hidden_size, e = moe.num_experts, f = moe.expert_intermediate_size;
  const bool mixtral = c.architecture == Architecture::kMixtral;
  const char* router = c.architecture == Architecture::kJamba ? "router.weight" : "gate.weight";
  // The router and the shared expert's gate go with the attention side (it routes), the experts
  // with their owners.
  if (binds_mixers()) {
    CLEAVE_ASSIGN_OR_RETURN(w.router, weights_->Get(p + router, {e, d}));
  }
  w.experts = {};
  for (int64_t x = 0; x < e; ++x) {
    DenseFfnWeights expert;
    if (owns_expert(static_cast<int>(x))) {
      const std::string ep = absl::StrCat(p, "experts.", x, ".");
      CLEAVE_RETURN_IF_ERROR(mixtral ? BindDense(ep, "w1", "w3", "w2", f, expert)
                                     : BindDense(ep, "gate_proj", "up_proj", "down_proj", f, expert));
    }
    w.experts.gate.push_back(expert.w_gate);
    w.experts.up.push_back(expert.w_up);
    w.experts.down.push_back(expert.w_down);
  }
  if (moe.shared_expert_intermediate_size > 0) {
    if (owns_expert(static_cast<int>(e))) {
      CLEAVE_RETURN_IF_ERROR(BindDense(p + "shared_expert.", "gate_proj", "up_proj", "down_proj",
                                       moe.shared_expert_intermediate_size, w.shared));
    }
    if (binds_mixers()) {
      CLEAVE_ASSIGN_OR_RETURN(w.shared_gate, weights_->Get(p + "shared_expert_gate.weight", {1, d}));
    }
  }
  return absl::OkStatus();
}

absl::Status DecoderModel::RouteMoe(int layer, const Tensor& normed, Workspace& ws) const {
  CLEAVE_CHECK_ARG(layer >= 0 && layer < config_.num_hidden_layers, "layer out of range");
  const Layer& L = layers_[layer];
  CLEAVE_CHECK_ARG(L.ffn == FfnKind::kMoe, "RouteMoe on a layer without experts");
  CLEAVE_CHECK_ARG(binds_mixers(), "this model instance holds no router weights");
  const MoeConfig& moe = config_.moe;
  const MoeWeights& W = L.moe;
  const int64_t t = normed.dim(0);
  CLEAVE_ASSIGN_OR_RETURN(Tensor logits, Scratch(ws, ws.router_logits, t, moe.num_experts));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, W.router, nullptr, logits));
  CLEAVE_RETURN_IF_ERROR(kernels::MoeRoute(logits, moe.top_k, moe.renormalize, ws.routing));

  if (ws.expert_tokens.size() != layers_.size()) ws.expert_tokens.resize(layers_.size());
  std::vector<int64_t>& counts = ws.expert_tokens[layer];
  counts.resize(moe.num_experts, 0);
  for (int x = 0; x < moe.num_experts; ++x) counts[x] += ws.routing.tokens_for_expert(x);

  if (W.shared_gate.empty()) return absl::OkStatus();
  CLEAVE_ASSIGN_OR_RETURN(Tensor gate, Scratch(ws, ws.shared_gate, t, 1));
  return kernels::Linear(normed, W.shared_gate, nullptr, gate);
}

absl::Status DecoderModel::RunMoe(const Layer& layer_weights, int layer, Workspace& ws,
                                  const Tensor& normed, HiddenState& h) const {
  const MoeWeights& W = layer_weights.moe;
  const int64_t t = normed.dim(0), d = config_.hidden_size;
  CLEAVE_RETURN_IF_ERROR(RouteMoe(layer, normed, ws));
  CLEAVE_RETURN_IF_ERROR(kernels::MoeExperts(normed, ws.routing, W.experts, ws.moe, h.delta));
  if (W.shared_gate.empty()) return absl::OkStatus();
  // Qwen2-MoE: out += sigmoid(x · shared_expert_gate) * shared_expert(x).
  CLEAVE_ASSIGN_OR_RETURN(Tensor shared, Scratch(ws, ws.moe_out, t, d));
  CLEAVE_RETURN_IF_ERROR(RunDense(W.shared, config_.moe.shared_expert_intermediate_size, ws, normed, shared));
  CLEAVE_ASSIGN_OR_RETURN(Tensor gate, Scratch(ws, ws.shared_gate, t, 1));
  return kernels::SigmoidGatedAdd(gate, shared, h.delta);
}

}  // namespace cleave::model
