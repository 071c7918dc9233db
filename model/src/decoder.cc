#include "cleave/model/decoder.h"

#include "decoder_internal.h"
#include "device_workspace.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/activation.h"
#include "cleave/kernels/attention.h"
#include "cleave/kernels/embedding.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/norm.h"
#include "cleave/kernels/rope.h"

namespace cleave::model {

using kernels::DType;
using kernels::Tensor;

using internal::F32;
using internal::Grow;
using internal::I32;

DecoderModel::DecoderModel(ModelConfig config, std::unique_ptr<WeightStore> weights,
                           LoadOptions options)
    : config_(std::move(config)), options_(std::move(options)), weights_(std::move(weights)) {}

absl::StatusOr<std::unique_ptr<DecoderModel>> DecoderModel::Load(const std::filesystem::path& model_dir,
                                                                 LoadOptions options) {
  CLEAVE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  CLEAVE_ASSIGN_OR_RETURN(auto weights, WeightStore::Open(model_dir));
  return FromWeights(std::move(config), std::move(weights), std::move(options));
}

absl::StatusOr<std::unique_ptr<DecoderModel>> DecoderModel::FromWeights(
    ModelConfig config, std::unique_ptr<WeightStore> weights, LoadOptions options) {
  const int e = config.moe.num_experts;
  std::vector<bool> owned(e + 1, options.part == LoadOptions::Part::kAll);
  if (options.part == LoadOptions::Part::kFfn) {
    for (int x : options.experts) {
      CLEAVE_CHECK_ARG(x >= 0 && x < e, absl::StrCat("expert ", x, " is not one of the model's ", e));
      CLEAVE_CHECK_ARG(!owned[x], absl::StrCat("expert ", x, " is listed twice"));
      owned[x] = true;
    }
    owned[e] = options.shared_expert && config.moe.shared_expert_intermediate_size > 0;
  }
  auto model = std::unique_ptr<DecoderModel>(
      new DecoderModel(std::move(config), std::move(weights), std::move(options)));
  model->owned_experts_ = std::move(owned);
  CLEAVE_RETURN_IF_ERROR(model->BindWeights());
  CLEAVE_RETURN_IF_ERROR(model->UploadWeights());
  return model;
}

bool DecoderModel::owns_expert(int expert) const {
  return expert >= 0 && expert < static_cast<int>(owned_experts_.size()) && owned_experts_[expert];
}

// Norm weights, biases, conv kernels and A are small and read every step: keep them as owned f32
// so kernels see one dtype, whatever the checkpoint stores.
absl::StatusOr<Tensor> DecoderModel::OwnedF32(const std::string& name,
                                              std::initializer_list<int64_t> shape) {
  CLEAVE_ASSIGN_OR_RETURN(Tensor t, weights_->Get(name, std::vector<int64_t>(shape)));
  const int64_t n = t.numel();
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) {
    switch (t.dtype()) {
      case DType::kF32: v[i] = t.data_as<const float>()[i]; break;
      case DType::kBF16: v[i] = kernels::Bf16ToF32(t.data_as<const uint16_t>()[i]); break;
      case DType::kF16: v[i] = kernels::F16ToF32(t.data_as<const uint16_t>()[i]); break;
      default: return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " has unsupported dtype"));
    }
  }
  owned_.push_back(std::move(v));
  return Tensor(owned_.back().data(), DType::kF32, shape);
}

absl::StatusOr<Tensor> DecoderModel::VectorF32(const std::string& name, int64_t n) {
  return OwnedF32(name, {n});
}

absl::StatusOr<Tensor> DecoderModel::OptionalVectorF32(const std::string& name, int64_t n,
                                                       bool present) {
  if (!present) return Tensor();
  return VectorF32(name, n);
}

absl::Status DecoderModel::BindAttention(const std::string& p, AttentionWeights& w) {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size, q = c.q_size(), kv = c.kv_size();
  CLEAVE_ASSIGN_OR_RETURN(w.wq, weights_->Get(p + "q_proj.weight", {q, d}));
  CLEAVE_ASSIGN_OR_RETURN(w.wk, weights_->Get(p + "k_proj.weight", {kv, d}));
  CLEAVE_ASSIGN_OR_RETURN(w.wv, weights_->Get(p + "v_proj.weight", {kv, d}));
  CLEAVE_ASSIGN_OR_RETURN(w.wo, weights_->Get(p + "o_proj.weight", {d, q}));
  CLEAVE_ASSIGN_OR_RETURN(w.bq, OptionalVectorF32(p + "q_proj.bias", q, c.attention_bias));
  CLEAVE_ASSIGN_OR_RETURN(w.bk, OptionalVectorF32(p + "k_proj.bias", kv, c.attention_bias));
  CLEAVE_ASSIGN_OR_RETURN(w.bv, OptionalVectorF32(p + "v_proj.bias", kv, c.attention_bias));
  return absl::OkStatus();
}

absl::Status DecoderModel::BindDense(const std::string& p, const char* gate, const char* up,
                                     const char* down, int64_t f, DenseFfnWeights& w) {
  const int64_t d = config_.hidden_size;
  CLEAVE_ASSIGN_OR_RETURN(w.w_gate, weights_->Get(absl::StrCat(p, gate, ".weight"), {f, d}));
  CLEAVE_ASSIGN_OR_RETURN(w.w_up, weights_->Get(absl::StrCat(p, up, ".weight"), {f, d}));
  CLEAVE_ASSIGN_OR_RETURN(w.w_down, weights_->Get(absl::StrCat(p, down, ".weight"), {d, f}));
  return absl::OkStatus();
}

// Checkpoint names, per family (as transformers' save_pretrained writes them, which are also the
// names of the published checkpoints):
//   Llama / Mistral / Qwen2 / Mixtral / Qwen2-MoE / Jamba: model.embed_tokens, model.layers.L.*
//   Mamba: backbone.embeddings, backbone.layers.L.{norm, mixer.*}, backbone.norm_f
absl::Status DecoderModel::BindWeights() {
  const ModelConfig& c = config_;
  const Architecture arch = c.architecture;
  const bool mamba_model = arch == Architecture::kMamba;
  const int64_t d = c.hidden_size;
  CLEAVE_CHECK_ARG(static_cast<int>(c.layer_mixer.size()) == c.num_hidden_layers &&
                       static_cast<int>(c.layer_ffn.size()) == c.num_hidden_layers,
                   "model config has no per-layer kinds");
  // Tensors point into owned_'s inner vectors; growing owned_ moves them, which keeps their buffers.
  const bool mixers = binds_mixers(), ffn = binds_ffn();
  if (mixers) {
    CLEAVE_ASSIGN_OR_RETURN(embed_, weights_->Get(mamba_model ? "backbone.embeddings.weight"
                                                              : "model.embed_tokens.weight",
                                                  {c.vocab_size, d}));
    const char* final_norm = mamba_model               ? "backbone.norm_f.weight"
                             : arch == Architecture::kJamba ? "model.final_layernorm.weight"
                                                            : "model.norm.weight";
    CLEAVE_ASSIGN_OR_RETURN(final_norm_, VectorF32(final_norm, d));
    if (c.tie_word_embeddings) {
      lm_head_ = embed_;
    } else {
      CLEAVE_ASSIGN_OR_RETURN(lm_head_, weights_->Get("lm_head.weight", {c.vocab_size, d}));
    }
  }
  const bool jamba = arch == Architecture::kJamba;
  layers_.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat(mamba_model ? "backbone.layers." : "model.layers.", l, ".");
    Layer& L = layers_[l];
    L.mixer = c.layer_mixer[l];
    L.ffn = c.layer_ffn[l];
    if (mixers) {
      CLEAVE_ASSIGN_OR_RETURN(L.input_norm, VectorF32(p + (mamba_model ? "norm.weight" : "input_layernorm.weight"), d));
      if (L.ffn != FfnKind::kNone) {
        CLEAVE_ASSIGN_OR_RETURN(L.post_norm, VectorF32(p + (jamba ? "pre_ff_layernorm.weight"
                                                                  : "post_attention_layernorm.weight"), d));
      }
      if (L.mixer == MixerKind::kAttention) {
        CLEAVE_RETURN_IF_ERROR(BindAttention(p + "self_attn.", L.attn));
      } else {
        CLEAVE_RETURN_IF_ERROR(BindMamba(p + (mamba_model ? "mixer." : "mamba."), L.mamba));
      }
    }
    const std::string ffn_prefix = p + (jamba ? "feed_forward." : "mlp.");
    switch (L.ffn) {
      case FfnKind::kNone: break;
      case FfnKind::kDense:
        if (ffn) {
          CLEAVE_RETURN_IF_ERROR(BindDense(ffn_prefix, "gate_proj", "up_proj", "down_proj", c.intermediate_size, L.mlp));
        }
        break;
      case FfnKind::kMoe:
        CLEAVE_RETURN_IF_ERROR(BindMoe(arch == Architecture::kMixtral ? p + "block_sparse_moe." : ffn_prefix, L.moe));
        break;
    }
  }
  if (c.mlp_bias) return absl::InvalidArgumentError("mlp_bias: true is not supported yet");

  if (!mixers || c.num_layers_of(MixerKind::kAttention) == 0 || !c.use_rope) return absl::OkStatus();
  const int64_t half = c.rope.rotary_dim / 2;
  const int64_t positions = c.max_position_embeddings;
  rope_cos_.assign(positions * half, 0.0f);
  rope_sin_.assign(positions * half, 0.0f);
  rope_cos_t_ = Tensor(rope_cos_.data(), DType::kF32, {positions, half});
  rope_sin_t_ = Tensor(rope_sin_.data(), DType::kF32, {positions, half});
  return kernels::BuildRopeTables(c.rope, rope_cos_t_, rope_sin_t_);
}

absl::Status DecoderModel::Reserve(Workspace& ws, int t) const {
  const ModelConfig& c = config_;
  const size_t d = c.hidden_size, n = t;
  auto reserve = [&](std::vector<float>& v, size_t floats) {
    return Scratch(ws, v, 1, static_cast<int64_t>(floats)).status();
  };
  CLEAVE_RETURN_IF_ERROR(reserve(ws.residual, n * d));
  CLEAVE_RETURN_IF_ERROR(reserve(ws.delta, n * d));
  CLEAVE_RETURN_IF_ERROR(reserve(ws.normed, n * d));
  if (c.num_layers_of(MixerKind::kAttention) > 0) {
    CLEAVE_RETURN_IF_ERROR(reserve(ws.q, n * c.q_size()));
    CLEAVE_RETURN_IF_ERROR(reserve(ws.k, n * c.kv_size()));
    CLEAVE_RETURN_IF_ERROR(reserve(ws.v, n * c.kv_size()));
    CLEAVE_RETURN_IF_ERROR(reserve(ws.attn, n * c.q_size()));
  }
  if (c.has_ssm_state()) {
    const MambaConfig& m = c.mamba;
    CLEAVE_RETURN_IF_ERROR(reserve(ws.xz, n * 2 * m.d_inner));
    CLEAVE_RETURN_IF_ERROR(reserve(ws.conv_out, n * m.d_inner));
    CLEAVE_RETURN_IF_ERROR(reserve(ws.xdbc, n * (m.dt_rank + 2 * m.d_state)));
    CLEAVE_RETURN_IF_ERROR(reserve(ws.dt, n * m.d_inner));
    CLEAVE_RETURN_IF_ERROR(reserve(ws.scan_out, n * m.d_inner));
  }
  // The widest dense SwiGLU any layer runs: the dense MLP or Qwen2-MoE's shared expert.
  const bool dense = std::find(c.layer_ffn.begin(), c.layer_ffn.end(), FfnKind::kDense) != c.layer_ffn.end();
  const size_t f = std::max(dense ? c.intermediate_size : 0, c.moe.shared_expert_intermediate_size);
  CLEAVE_RETURN_IF_ERROR(reserve(ws.gate_up, n * 2 * f));
  CLEAVE_RETURN_IF_ERROR(reserve(ws.act, n * f));
  if (c.moe.num_experts > 0) {
    CLEAVE_RETURN_IF_ERROR(reserve(ws.router_logits, n * c.moe.num_experts));
    CLEAVE_RETURN_IF_ERROR(reserve(ws.moe_out, n * d));
    CLEAVE_RETURN_IF_ERROR(reserve(ws.shared_gate, n));
  }
  return absl::OkStatus();
}

absl::StatusOr<HiddenState> DecoderModel::Embed(const ForwardBatch& batch, Workspace& ws) const {
  const int t = batch.num_tokens();
  CLEAVE_CHECK_ARG(t > 0, "forward batch has no tokens");
  CLEAVE_CHECK_ARG(binds_mixers(), "this model instance holds only FFN weights (an FFN worker's)");
  CLEAVE_RETURN_IF_ERROR(Reserve(ws, t));
  if (backend_ != nullptr) CLEAVE_RETURN_IF_ERROR(ws.device->Upload(batch));
  HiddenState h;
  CLEAVE_ASSIGN_OR_RETURN(h.residual, Scratch(ws, ws.residual, t, config_.hidden_size));
  CLEAVE_ASSIGN_OR_RETURN(h.delta, Scratch(ws, ws.delta, t, config_.hidden_size));
  CLEAVE_RETURN_IF_ERROR(kernels::EmbeddingLookup(Plan(batch, ws).token_ids, embed_, h.residual));
  // Layer 0's AddRmsNorm folds a zero delta into the residual: one code path for every layer.
  if (backend_ != nullptr) {
    CLEAVE_RETURN_IF_ERROR(backend_->Zero(h.delta.data(), h.delta.nbytes(), nullptr));
  } else {
    std::memset(h.delta.data(), 0, h.delta.nbytes());
  }
  return h;
}

absl::Status DecoderModel::RunMixer(int layer, const ForwardBatch& batch, KvCache& cache,
                                    Workspace& ws, HiddenState& h) const {
  const ModelConfig& c = config_;
  CLEAVE_CHECK_ARG(layer >= 0 && layer < c.num_hidden_layers, "layer out of range");
  const Layer& L = layers_[layer];
  const int64_t t = batch.num_tokens();
  CLEAVE_ASSIGN_OR_RETURN(Tensor normed, Scratch(ws, ws.normed, t, c.hidden_size));
  CLEAVE_RETURN_IF_ERROR(kernels::AddRmsNorm(h.delta, h.residual, L.input_norm, c.rms_norm_eps, normed));
  return L.mixer == MixerKind::kAttention ? RunAttention(L, layer, batch, cache, ws, normed, h)
                                          : RunMamba(L, layer, batch, cache, ws, normed, h);
}

absl::Status DecoderModel::RunAttention(const Layer& layer_weights, int layer,
                                        const ForwardBatch& batch, KvCache& cache, Workspace& ws,
                                        const Tensor& normed, HiddenState& h) const {
  const ModelConfig& c = config_;
  const AttentionWeights& W = layer_weights.attn;
  const int64_t t = batch.num_tokens();
  CLEAVE_CHECK_ARG(cache.is_attention(layer), "KV cache has no K/V for this attention layer");
  CLEAVE_ASSIGN_OR_RETURN(Tensor q, Scratch(ws, ws.q, t, c.q_size()));
  CLEAVE_ASSIGN_OR_RETURN(Tensor k, Scratch(ws, ws.k, t, c.kv_size()));
  CLEAVE_ASSIGN_OR_RETURN(Tensor v, Scratch(ws, ws.v, t, c.kv_size()));
  const internal::BatchTensors plan = Plan(batch, ws);
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, W.wq, W.bq.empty() ? nullptr : &W.bq, q));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, W.wk, W.bk.empty() ? nullptr : &W.bk, k));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, W.wv, W.bv.empty() ? nullptr : &W.bv, v));

  Tensor q3 = q.Reshape({t, c.num_attention_heads, c.head_dim});
  Tensor k3 = k.Reshape({t, c.num_key_value_heads, c.head_dim});
  Tensor v3 = v.Reshape({t, c.num_key_value_heads, c.head_dim});
  if (c.use_rope) {
    CLEAVE_RETURN_IF_ERROR(kernels::ApplyRope(plan.positions, rope_cos_t_, rope_sin_t_,
                                              kernels::RopeStyle::kHalves, q3, k3));
  }
  Tensor k_cache = cache.k(layer), v_cache = cache.v(layer);
  CLEAVE_RETURN_IF_ERROR(kernels::WriteKvCache(k3, v3, plan.slot_mapping, k_cache, v_cache));

  kernels::PagedAttentionArgs args;
  args.q = q3;
  args.k_cache = k_cache;
  args.v_cache = v_cache;
  args.query_start_loc = plan.query_start_loc;
  args.seq_lens = plan.seq_lens;
  args.block_tables = plan.block_tables;
  args.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  args.sliding_window = c.sliding_window;
  CLEAVE_ASSIGN_OR_RETURN(Tensor attn, Scratch(ws, ws.attn, t, c.q_size()));
  args.out = attn.Reshape({t, c.num_attention_heads, c.head_dim});
  CLEAVE_RETURN_IF_ERROR(batch.is_decode() ? kernels::PagedAttentionDecode(args)
                                           : kernels::PagedAttentionPrefill(args));
  return kernels::Linear(attn, W.wo, nullptr, h.delta);
}

absl::Status DecoderModel::RunFfn(int layer, Workspace& ws, HiddenState& h) const {
  const ModelConfig& c = config_;
  CLEAVE_CHECK_ARG(layer >= 0 && layer < c.num_hidden_layers, "layer out of range");
  const Layer& L = layers_[layer];
  // A Mamba block has no FFN: its mixer's delta is folded in by the next layer's norm.
  if (L.ffn == FfnKind::kNone) return absl::OkStatus();
  CLEAVE_CHECK_ARG(options_.part == LoadOptions::Part::kAll,
                   "this model instance holds part of the FFN weights: run the FFN through AFD");
  CLEAVE_ASSIGN_OR_RETURN(Tensor normed, FfnInput(layer, ws, h));
  if (L.ffn == FfnKind::kMoe) return RunMoe(L, layer, ws, normed, h);
  return RunDense(L.mlp, c.intermediate_size, ws, normed, h.delta);
}

absl::Status DecoderModel::RunDense(const DenseFfnWeights& w, int64_t f, Workspace& ws,
                                    const Tensor& normed, Tensor& out) const {
  const int64_t t = normed.dim(0);
  // gate and up write the two halves of one [T, 2F] buffer, the layout SwiGlu reads.
  CLEAVE_ASSIGN_OR_RETURN(Tensor gate_up, Scratch(ws, ws.gate_up, t, 2 * f));
  Tensor gate = gate_up.Narrow(1, 0, f), up = gate_up.Narrow(1, f, f);
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, w.w_gate, nullptr, gate));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, w.w_up, nullptr, up));
  CLEAVE_ASSIGN_OR_RETURN(Tensor act, Scratch(ws, ws.act, t, f));
  CLEAVE_RETURN_IF_ERROR(kernels::SwiGlu(gate_up, act));
  return kernels::Linear(act, w.w_down, nullptr, out);
}

absl::Status DecoderModel::ComputeLogits(const ForwardBatch& batch, Workspace& ws, HiddenState& h,
                                       std::vector<float>& logits) const {
  const int64_t n = static_cast<int64_t>(batch.logits_indices.size());
  const int64_t d = config_.hidden_size;
  logits.resize(n * config_.vocab_size);
  if (n == 0) return absl::OkStatus();
  if (backend_ != nullptr) {
    // On a device the logits come back to the host for sampling (the copy waits for the pass).
    CLEAVE_ASSIGN_OR_RETURN(const Tensor out, ComputeDeviceLogits(batch, ws, h));
    return backend_->CopyToHost(out.data(), logits.data(), out.nbytes(), nullptr);
  }
  // Only the rows that are sampled go through the final norm and the LM head.
  CLEAVE_ASSIGN_OR_RETURN(Tensor res, Scratch(ws, ws.final_residual, n, d));
  CLEAVE_ASSIGN_OR_RETURN(Tensor delta, Scratch(ws, ws.final_delta, n, d));
  CLEAVE_ASSIGN_OR_RETURN(Tensor normed, Scratch(ws, ws.final_normed, n, d));
  for (int64_t i = 0; i < n; ++i) {
    const int32_t row = batch.logits_indices[i];
    CLEAVE_CHECK_ARG(row >= 0 && row < h.residual.dim(0), "logits index out of range");
    std::memcpy(res.data_as<float>() + i * d, h.residual.data_as<float>() + row * d, d * sizeof(float));
    std::memcpy(delta.data_as<float>() + i * d, h.delta.data_as<float>() + row * d, d * sizeof(float));
  }
  CLEAVE_RETURN_IF_ERROR(kernels::AddRmsNorm(delta, res, final_norm_, config_.rms_norm_eps, normed));
  Tensor out(logits.data(), DType::kF32, {n, config_.vocab_size});
  return kernels::Linear(normed, lm_head_, nullptr, out);
}

absl::StatusOr<Tensor> DecoderModel::ComputeDeviceLogits(const ForwardBatch& batch, Workspace& ws,
                                                         HiddenState& h) const {
  CLEAVE_CHECK_ARG(backend_ != nullptr && ws.device != nullptr,
                   "ComputeDeviceLogits needs a model on a device and a pass run on it");
  const int64_t n = static_cast<int64_t>(batch.logits_indices.size());
  const int64_t d = config_.hidden_size;
  CLEAVE_CHECK_ARG(n > 0, "the batch asks for no logits");
  CLEAVE_ASSIGN_OR_RETURN(Tensor res, Scratch(ws, ws.final_residual, n, d));
  CLEAVE_ASSIGN_OR_RETURN(Tensor delta, Scratch(ws, ws.final_delta, n, d));
  CLEAVE_ASSIGN_OR_RETURN(Tensor normed, Scratch(ws, ws.final_normed, n, d));
  // A row gather is an embedding lookup with the hidden rows as the table; its id check is the
  // logits index check.
  const internal::BatchTensors plan = Plan(batch, ws);
  CLEAVE_RETURN_IF_ERROR(kernels::EmbeddingLookup(plan.logits_indices, h.residual, res));
  CLEAVE_RETURN_IF_ERROR(kernels::EmbeddingLookup(plan.logits_indices, h.delta, delta));
  CLEAVE_RETURN_IF_ERROR(kernels::AddRmsNorm(delta, res, final_norm_, config_.rms_norm_eps, normed));
  // Keyed by the workspace's own field: the logits live with the rest of its scratch.
  CLEAVE_ASSIGN_OR_RETURN(Tensor out, ws.device->F32(&ws.final_logits, n, config_.vocab_size));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, lm_head_, nullptr, out));
  return out;
}

absl::Status DecoderModel::Forward(const ForwardBatch& batch, KvCache& cache, Workspace& ws,
                                 std::vector<float>& logits) const {
  CLEAVE_CHECK_ARG(cache.num_layers() == config_.num_hidden_layers, "KV cache layer count != model");
  if (config_.has_ssm_state()) {
    CLEAVE_CHECK_ARG(cache.num_state_slots() > 0, "KV cache has no state slots for a Mamba model");
  }
  CLEAVE_ASSIGN_OR_RETURN(HiddenState h, Embed(batch, ws));
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    CLEAVE_RETURN_IF_ERROR(RunMixer(l, batch, cache, ws, h));
    CLEAVE_RETURN_IF_ERROR(RunFfn(l, ws, h));
  }
  return ComputeLogits(batch, ws, h, logits);
}

}  // namespace cleave::model
