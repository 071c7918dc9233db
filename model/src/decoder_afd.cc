// The FFN half of a layer split at the wire for attention-FFN disaggregation. Every call here is
// a piece of RunFfn / RunMoe with the same kernels in the same order, so that the disaggregated
// pass computes exactly what the colocated one does (the kernels are batch-invariant: a row's
// result does not depend on which other rows share its call).
#include <algorithm>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/moe.h"
#include "cleave/kernels/norm.h"
#include "cleave/model/decoder.h"
#include "decoder_internal.h"

namespace cleave::model {

using internal::F32;
using internal::Grow;
using kernels::Tensor;

absl::StatusOr<Tensor> DecoderModel::FfnInput(int layer, Workspace& ws, HiddenState& h) const {
  const ModelConfig& c = config_;
  CLEAVE_CHECK_ARG(layer >= 0 && layer < c.num_hidden_layers, "layer out of range");
  const Layer& L = layers_[layer];
  CLEAVE_CHECK_ARG(L.ffn != FfnKind::kNone, "FfnInput on a layer without an FFN");
  CLEAVE_CHECK_ARG(binds_mixers(), "this model instance holds no FFN norms");
  const int64_t t = h.residual.dim(0);
  CLEAVE_ASSIGN_OR_RETURN(Tensor normed, Scratch(ws, ws.normed, t, c.hidden_size));
  CLEAVE_RETURN_IF_ERROR(kernels::AddRmsNorm(h.delta, h.residual, L.post_norm, c.rms_norm_eps, normed));
  return normed;
}

absl::Status DecoderModel::CombineMoe(int layer, const Tensor& slot_out, const Tensor* shared_out,
                                      Workspace& ws, HiddenState& h) const {
  CLEAVE_CHECK_ARG(layer >= 0 && layer < config_.num_hidden_layers, "layer out of range");
  const MoeWeights& W = layers_[layer].moe;
  CLEAVE_RETURN_IF_ERROR(kernels::MoeCombine(slot_out, ws.routing, h.delta));
  if (W.shared_gate.empty()) {
    CLEAVE_CHECK_ARG(shared_out == nullptr, "the model has no shared expert");
    return absl::OkStatus();
  }
  CLEAVE_CHECK_ARG(shared_out != nullptr, "the model's shared expert output is missing");
  Tensor gate = F32(ws.shared_gate, h.delta.dim(0), 1);
  return kernels::SigmoidGatedAdd(gate, *shared_out, h.delta);
}

absl::Status DecoderModel::FfnDense(int layer, const Tensor& x, Tensor& out, Workspace& ws) const {
  const ModelConfig& c = config_;
  CLEAVE_CHECK_ARG(layer >= 0 && layer < c.num_hidden_layers, "layer out of range");
  const Layer& L = layers_[layer];
  CLEAVE_CHECK_ARG(L.ffn == FfnKind::kDense, absl::StrCat("layer ", layer, " has no dense FFN"));
  CLEAVE_CHECK_ARG(binds_ffn(), "this model instance holds no FFN weights");
  const size_t t = x.dim(0), f = c.intermediate_size;
  Grow(ws.gate_up, t * 2 * f);
  Grow(ws.act, t * f);
  return RunDense(L.mlp, c.intermediate_size, ws, x, out);
}

absl::Status DecoderModel::FfnExperts(int layer, const Tensor& x, std::span<const int32_t> rows,
                                      std::span<const int32_t> experts, Tensor& out,
                                      Workspace& ws) const {
  const ModelConfig& c = config_;
  const MoeConfig& moe = c.moe;
  CLEAVE_CHECK_ARG(layer >= 0 && layer < c.num_hidden_layers, "layer out of range");
  const Layer& L = layers_[layer];
  CLEAVE_CHECK_ARG(L.ffn == FfnKind::kMoe, absl::StrCat("layer ", layer, " has no experts"));
  const int64_t n = static_cast<int64_t>(rows.size()), t = x.dim(0), d = c.hidden_size;
  CLEAVE_CHECK_ARG(experts.size() == rows.size(), "one expert per assigned row");
  CLEAVE_CHECK_ARG(x.dim(1) == d && out.dim(0) == n && out.dim(1) == d, "FfnExperts: shapes");
  for (int64_t i = 0; i < n; ++i) {
    CLEAVE_CHECK_ARG(rows[i] >= 0 && rows[i] < t, absl::StrCat("assigned row ", rows[i], " of ", t));
    CLEAVE_CHECK_ARG(owns_expert(experts[i]),
                     absl::StrCat("expert ", experts[i], " of layer ", layer, " is not on this FFN worker"));
  }
  // Assignments grouped by expert (stable, so rows keep their order within an expert, as
  // MoeExperts' permutation does), each expert's rows gathered, run as one SwiGLU, scattered.
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return experts[a] < experts[b]; });
  const size_t f = std::max(moe.expert_intermediate_size, moe.shared_expert_intermediate_size);
  Grow(ws.moe.permuted_x, n * d);
  Grow(ws.moe.expert_out, n * d);
  Grow(ws.gate_up, n * 2 * f);
  Grow(ws.act, n * f);
  const float* src = x.data_as<const float>();
  float* dst = out.data_as<float>();
  for (int64_t begin = 0; begin < n;) {
    const int e = experts[order[begin]];
    int64_t end = begin;
    while (end < n && experts[order[end]] == e) ++end;
    const int64_t m = end - begin;
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(src + rows[order[begin + i]] * d, d, ws.moe.permuted_x.data() + i * d);
    }
    Tensor xe = F32(ws.moe.permuted_x, m, d), ye = F32(ws.moe.expert_out, m, d);
    if (e == moe.num_experts) {
      CLEAVE_RETURN_IF_ERROR(RunDense(L.moe.shared, moe.shared_expert_intermediate_size, ws, xe, ye));
    } else {
      const DenseFfnWeights w{L.moe.experts.gate[e], L.moe.experts.up[e], L.moe.experts.down[e]};
      CLEAVE_RETURN_IF_ERROR(RunDense(w, moe.expert_intermediate_size, ws, xe, ye));
    }
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(ws.moe.expert_out.data() + i * d, d, dst + order[begin + i] * d);
    }
    begin = end;
  }
  return absl::OkStatus();
}

}  // namespace cleave::model
