// The Mamba mixer of MambaForCausalLM and JambaForCausalLM, as transformers computes it:
//   xz = in_proj(x);  x, z = split(xz)
//   u = silu(conv1d(x))                       (depthwise, causal, carrying the conv state)
//   dt, B, C = split(x_proj(u))               (Jamba: RMSNorm on each of dt, B, C)
//   y = selective_scan(u, dt_proj(dt) + dt_bias, A = -exp(A_log), B, C, D) * silu(z)
//   out = out_proj(y)
// Each sequence's conv and SSM state lives in its state slot of this layer's pools in KvCache.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/norm.h"
#include "cleave/kernels/ssm.h"
#include "cleave/model/decoder.h"
#include "decoder_internal.h"
#include "device_workspace.h"

namespace cleave::model {

using kernels::DType;
using kernels::Tensor;

absl::Status DecoderModel::BindMamba(const std::string& p, MambaWeights& w) {
  const ModelConfig& c = config_;
  const MambaConfig& m = c.mamba;
  const int64_t d = c.hidden_size, di = m.d_inner, n = m.d_state, r = m.dt_rank, k = m.d_conv;
  CLEAVE_ASSIGN_OR_RETURN(w.in_proj, weights_->Get(p + "in_proj.weight", {2 * di, d}));
  CLEAVE_ASSIGN_OR_RETURN(w.in_proj_bias, OptionalVectorF32(p + "in_proj.bias", 2 * di, m.proj_bias));
  CLEAVE_ASSIGN_OR_RETURN(Tensor conv, OwnedF32(p + "conv1d.weight", {di, 1, k}));
  w.conv_w = Tensor(conv.data(), DType::kF32, {di, k});
  CLEAVE_ASSIGN_OR_RETURN(w.conv_b, OptionalVectorF32(p + "conv1d.bias", di, m.conv_bias));
  CLEAVE_ASSIGN_OR_RETURN(w.x_proj, weights_->Get(p + "x_proj.weight", {r + 2 * n, di}));
  CLEAVE_ASSIGN_OR_RETURN(w.dt_proj, weights_->Get(p + "dt_proj.weight", {di, r}));
  CLEAVE_ASSIGN_OR_RETURN(w.dt_bias, VectorF32(p + "dt_proj.bias", di));
  // A is input-independent: -exp(A_log) once at load, as transformers does at every call.
  CLEAVE_ASSIGN_OR_RETURN(w.a, OwnedF32(p + "A_log", {di, n}));
  float* a = w.a.data_as<float>();
  for (int64_t i = 0; i < di * n; ++i) a[i] = -std::exp(a[i]);
  CLEAVE_ASSIGN_OR_RETURN(w.d, VectorF32(p + "D", di));
  CLEAVE_ASSIGN_OR_RETURN(w.out_proj, weights_->Get(p + "out_proj.weight", {d, di}));
  CLEAVE_ASSIGN_OR_RETURN(w.out_proj_bias, OptionalVectorF32(p + "out_proj.bias", d, m.proj_bias));
  if (m.bcdt_norms) {
    CLEAVE_ASSIGN_OR_RETURN(w.dt_norm, VectorF32(p + "dt_layernorm.weight", r));
    CLEAVE_ASSIGN_OR_RETURN(w.b_norm, VectorF32(p + "b_layernorm.weight", n));
    CLEAVE_ASSIGN_OR_RETURN(w.c_norm, VectorF32(p + "c_layernorm.weight", n));
  }
  return absl::OkStatus();
}

absl::Status DecoderModel::RunMamba(const Layer& layer_weights, int layer, const ForwardBatch& batch,
                                    KvCache& cache, Workspace& ws, const Tensor& normed,
                                    HiddenState& h) const {
  const ModelConfig& c = config_;
  const MambaConfig& m = c.mamba;
  const MambaWeights& W = layer_weights.mamba;
  const int64_t t = batch.num_tokens(), di = m.d_inner, n = m.d_state, r = m.dt_rank;
  CLEAVE_CHECK_ARG(cache.is_mamba(layer), "KV cache has no state pools for this Mamba layer");
  CLEAVE_CHECK_ARG(batch.state_slots.size() == static_cast<size_t>(batch.num_seqs()) &&
                       batch.has_initial_state.size() == batch.state_slots.size(),
                   "forward batch has no state slots for a Mamba layer");

  CLEAVE_ASSIGN_OR_RETURN(Tensor xz, Scratch(ws, ws.xz, t, 2 * di));
  const internal::BatchTensors plan = Plan(batch, ws);
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, W.in_proj, W.in_proj_bias.empty() ? nullptr : &W.in_proj_bias, xz));
  kernels::SsmSequences seqs;
  seqs.query_start_loc = plan.query_start_loc;
  seqs.state_slots = plan.state_slots;
  seqs.has_initial_state = plan.has_initial_state;

  kernels::CausalConv1dArgs conv;
  conv.x = xz.Narrow(1, 0, di);
  conv.weight = W.conv_w;
  conv.bias = W.conv_b;
  conv.seqs = seqs;
  conv.conv_state = cache.conv_state(layer);
  conv.silu = true;
  CLEAVE_ASSIGN_OR_RETURN(conv.out, Scratch(ws, ws.conv_out, t, di));
  CLEAVE_RETURN_IF_ERROR(kernels::CausalConv1d(conv));

  CLEAVE_ASSIGN_OR_RETURN(Tensor xdbc, Scratch(ws, ws.xdbc, t, r + 2 * n));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(conv.out, W.x_proj, nullptr, xdbc));
  Tensor dt_in = xdbc.Narrow(1, 0, r), b = xdbc.Narrow(1, r, n), cm = xdbc.Narrow(1, r + n, n);
  if (m.bcdt_norms) {  // Jamba normalises each piece in place (RmsNorm allows out == x)
    CLEAVE_RETURN_IF_ERROR(kernels::RmsNorm(dt_in, W.dt_norm, c.rms_norm_eps, dt_in));
    CLEAVE_RETURN_IF_ERROR(kernels::RmsNorm(b, W.b_norm, c.rms_norm_eps, b));
    CLEAVE_RETURN_IF_ERROR(kernels::RmsNorm(cm, W.c_norm, c.rms_norm_eps, cm));
  }
  CLEAVE_ASSIGN_OR_RETURN(Tensor dt, Scratch(ws, ws.dt, t, di));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(dt_in, W.dt_proj, nullptr, dt));

  kernels::SelectiveScanArgs scan;
  scan.x = conv.out;
  scan.dt = dt;
  scan.dt_bias = W.dt_bias;
  scan.dt_softplus = true;
  scan.A = W.a;
  scan.B = b;
  scan.C = cm;
  scan.D = W.d;
  scan.z = xz.Narrow(1, di, di);
  scan.seqs = seqs;
  scan.ssm_state = cache.ssm_state(layer);
  CLEAVE_ASSIGN_OR_RETURN(scan.out, Scratch(ws, ws.scan_out, t, di));
  CLEAVE_RETURN_IF_ERROR(kernels::SelectiveScan(scan));
  return kernels::Linear(scan.out, W.out_proj, W.out_proj_bias.empty() ? nullptr : &W.out_proj_bias,
                         h.delta);
}

}  // namespace cleave::model
