#include "cleave/model/llama.h"

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

namespace {

Tensor F32(std::vector<float>& v, int64_t rows, int64_t cols) {
  return Tensor(v.data(), DType::kF32, {rows, cols});
}

Tensor I32(const std::vector<int32_t>& v) {
  return Tensor(const_cast<int32_t*>(v.data()), DType::kI32, {static_cast<int64_t>(v.size())});
}

template <typename T>
void Grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

LlamaModel::LlamaModel(ModelConfig config, std::unique_ptr<WeightStore> weights)
    : config_(std::move(config)), weights_(std::move(weights)) {}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::filesystem::path& model_dir) {
  CLEAVE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(model_dir));
  CLEAVE_ASSIGN_OR_RETURN(auto weights, WeightStore::Open(model_dir));
  return FromWeights(std::move(config), std::move(weights));
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromWeights(
    ModelConfig config, std::unique_ptr<WeightStore> weights) {
  auto model = std::unique_ptr<LlamaModel>(new LlamaModel(std::move(config), std::move(weights)));
  CLEAVE_RETURN_IF_ERROR(model->BindWeights());
  return model;
}

// Norm weights and biases are tiny and read every step: keep them as owned f32 so kernels see
// one dtype, whatever the checkpoint stores.
absl::StatusOr<Tensor> LlamaModel::VectorF32(const std::string& name, int64_t n) {
  CLEAVE_ASSIGN_OR_RETURN(Tensor t, weights_->Get(name, {n}));
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
  return Tensor(owned_.back().data(), DType::kF32, {n});
}

absl::Status LlamaModel::BindWeights() {
  const ModelConfig& c = config_;
  const int64_t d = c.hidden_size, f = c.intermediate_size, q = c.q_size(), kv = c.kv_size();
  // Tensors point into owned_'s inner vectors; growing owned_ moves them, which keeps their buffers.
  CLEAVE_ASSIGN_OR_RETURN(embed_, weights_->Get("model.embed_tokens.weight", {c.vocab_size, d}));
  CLEAVE_ASSIGN_OR_RETURN(final_norm_, VectorF32("model.norm.weight", d));
  if (c.tie_word_embeddings) {
    lm_head_ = embed_;
  } else {
    CLEAVE_ASSIGN_OR_RETURN(lm_head_, weights_->Get("lm_head.weight", {c.vocab_size, d}));
  }
  layers_.resize(c.num_hidden_layers);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    Layer& L = layers_[l];
    CLEAVE_ASSIGN_OR_RETURN(L.input_norm, VectorF32(p + "input_layernorm.weight", d));
    CLEAVE_ASSIGN_OR_RETURN(L.post_norm, VectorF32(p + "post_attention_layernorm.weight", d));
    CLEAVE_ASSIGN_OR_RETURN(L.wq, weights_->Get(p + "self_attn.q_proj.weight", {q, d}));
    CLEAVE_ASSIGN_OR_RETURN(L.wk, weights_->Get(p + "self_attn.k_proj.weight", {kv, d}));
    CLEAVE_ASSIGN_OR_RETURN(L.wv, weights_->Get(p + "self_attn.v_proj.weight", {kv, d}));
    CLEAVE_ASSIGN_OR_RETURN(L.wo, weights_->Get(p + "self_attn.o_proj.weight", {d, q}));
    if (c.attention_bias) {
      CLEAVE_ASSIGN_OR_RETURN(L.bq, VectorF32(p + "self_attn.q_proj.bias", q));
      CLEAVE_ASSIGN_OR_RETURN(L.bk, VectorF32(p + "self_attn.k_proj.bias", kv));
      CLEAVE_ASSIGN_OR_RETURN(L.bv, VectorF32(p + "self_attn.v_proj.bias", kv));
    }
    CLEAVE_ASSIGN_OR_RETURN(L.w_gate, weights_->Get(p + "mlp.gate_proj.weight", {f, d}));
    CLEAVE_ASSIGN_OR_RETURN(L.w_up, weights_->Get(p + "mlp.up_proj.weight", {f, d}));
    CLEAVE_ASSIGN_OR_RETURN(L.w_down, weights_->Get(p + "mlp.down_proj.weight", {d, f}));
  }
  if (c.mlp_bias) return absl::InvalidArgumentError("mlp_bias: true is not supported yet");

  const int64_t half = c.rope.rotary_dim / 2;
  const int64_t positions = c.max_position_embeddings;
  rope_cos_.assign(positions * half, 0.0f);
  rope_sin_.assign(positions * half, 0.0f);
  rope_cos_t_ = Tensor(rope_cos_.data(), DType::kF32, {positions, half});
  rope_sin_t_ = Tensor(rope_sin_.data(), DType::kF32, {positions, half});
  return kernels::BuildRopeTables(c.rope, rope_cos_t_, rope_sin_t_);
}

void LlamaModel::Reserve(Workspace& ws, int t) const {
  const ModelConfig& c = config_;
  const size_t d = c.hidden_size;
  Grow(ws.residual, t * d);
  Grow(ws.delta, t * d);
  Grow(ws.normed, t * d);
  Grow(ws.q, static_cast<size_t>(t) * c.q_size());
  Grow(ws.k, static_cast<size_t>(t) * c.kv_size());
  Grow(ws.v, static_cast<size_t>(t) * c.kv_size());
  Grow(ws.attn, static_cast<size_t>(t) * c.q_size());
  Grow(ws.gate_up, static_cast<size_t>(t) * 2 * c.intermediate_size);
  Grow(ws.act, static_cast<size_t>(t) * c.intermediate_size);
}

absl::StatusOr<HiddenState> LlamaModel::Embed(const ForwardBatch& batch, Workspace& ws) const {
  const int t = batch.num_tokens();
  CLEAVE_CHECK_ARG(t > 0, "forward batch has no tokens");
  Reserve(ws, t);
  HiddenState h{F32(ws.residual, t, config_.hidden_size), F32(ws.delta, t, config_.hidden_size)};
  CLEAVE_RETURN_IF_ERROR(kernels::EmbeddingLookup(I32(batch.token_ids), embed_, h.residual));
  // Layer 0's AddRmsNorm folds a zero delta into the residual: one code path for every layer.
  std::memset(h.delta.data(), 0, h.delta.nbytes());
  return h;
}

absl::Status LlamaModel::RunMixer(int layer, const ForwardBatch& batch, KvCache& cache,
                                  Workspace& ws, HiddenState& h) const {
  const ModelConfig& c = config_;
  const Layer& L = layers_[layer];
  const int64_t t = batch.num_tokens();
  Tensor normed = F32(ws.normed, t, c.hidden_size);
  CLEAVE_RETURN_IF_ERROR(kernels::AddRmsNorm(h.delta, h.residual, L.input_norm, c.rms_norm_eps, normed));

  Tensor q = F32(ws.q, t, c.q_size()), k = F32(ws.k, t, c.kv_size()), v = F32(ws.v, t, c.kv_size());
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, L.wq, L.bq.empty() ? nullptr : &L.bq, q));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, L.wk, L.bk.empty() ? nullptr : &L.bk, k));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, L.wv, L.bv.empty() ? nullptr : &L.bv, v));

  Tensor q3 = q.Reshape({t, c.num_attention_heads, c.head_dim});
  Tensor k3 = k.Reshape({t, c.num_key_value_heads, c.head_dim});
  Tensor v3 = v.Reshape({t, c.num_key_value_heads, c.head_dim});
  CLEAVE_RETURN_IF_ERROR(kernels::ApplyRope(I32(batch.positions), rope_cos_t_, rope_sin_t_,
                                            kernels::RopeStyle::kHalves, q3, k3));
  Tensor k_cache = cache.k(layer), v_cache = cache.v(layer);
  CLEAVE_RETURN_IF_ERROR(kernels::WriteKvCache(k3, v3, I32(batch.slot_mapping), k_cache, v_cache));

  kernels::PagedAttentionArgs args;
  args.q = q3;
  args.k_cache = k_cache;
  args.v_cache = v_cache;
  args.query_start_loc = I32(batch.query_start_loc);
  args.seq_lens = I32(batch.seq_lens);
  args.block_tables = Tensor(const_cast<int32_t*>(batch.block_tables.data()), DType::kI32,
                             {batch.num_seqs(), batch.max_blocks_per_seq});
  args.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  args.sliding_window = c.sliding_window;
  args.out = Tensor(ws.attn.data(), DType::kF32, {t, c.num_attention_heads, c.head_dim});
  CLEAVE_RETURN_IF_ERROR(batch.is_decode() ? kernels::PagedAttentionDecode(args)
                                           : kernels::PagedAttentionPrefill(args));
  Tensor attn = F32(ws.attn, t, c.q_size());
  return kernels::Linear(attn, L.wo, nullptr, h.delta);
}

absl::Status LlamaModel::RunFfn(int layer, Workspace& ws, HiddenState& h) const {
  const ModelConfig& c = config_;
  const Layer& L = layers_[layer];
  const int64_t t = h.residual.dim(0), f = c.intermediate_size;
  Tensor normed = F32(ws.normed, t, c.hidden_size);
  CLEAVE_RETURN_IF_ERROR(kernels::AddRmsNorm(h.delta, h.residual, L.post_norm, c.rms_norm_eps, normed));
  // gate and up write the two halves of one [T, 2F] buffer, the layout SwiGlu reads.
  Tensor gate_up = F32(ws.gate_up, t, 2 * f);
  Tensor gate = gate_up.Narrow(1, 0, f), up = gate_up.Narrow(1, f, f);
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, L.w_gate, nullptr, gate));
  CLEAVE_RETURN_IF_ERROR(kernels::Linear(normed, L.w_up, nullptr, up));
  Tensor act = F32(ws.act, t, f);
  CLEAVE_RETURN_IF_ERROR(kernels::SwiGlu(gate_up, act));
  return kernels::Linear(act, L.w_down, nullptr, h.delta);
}

absl::Status LlamaModel::ComputeLogits(const ForwardBatch& batch, Workspace& ws, HiddenState& h,
                                       std::vector<float>& logits) const {
  const int64_t n = static_cast<int64_t>(batch.logits_indices.size());
  const int64_t d = config_.hidden_size;
  logits.resize(n * config_.vocab_size);
  if (n == 0) return absl::OkStatus();
  // Only the rows that are sampled go through the final norm and the LM head.
  Grow(ws.final_residual, n * d);
  Grow(ws.final_delta, n * d);
  Grow(ws.final_normed, n * d);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t row = batch.logits_indices[i];
    CLEAVE_CHECK_ARG(row >= 0 && row < h.residual.dim(0), "logits index out of range");
    std::memcpy(&ws.final_residual[i * d], h.residual.data_as<float>() + row * d, d * sizeof(float));
    std::memcpy(&ws.final_delta[i * d], h.delta.data_as<float>() + row * d, d * sizeof(float));
  }
  Tensor res = F32(ws.final_residual, n, d), delta = F32(ws.final_delta, n, d);
  Tensor normed = F32(ws.final_normed, n, d);
  CLEAVE_RETURN_IF_ERROR(kernels::AddRmsNorm(delta, res, final_norm_, config_.rms_norm_eps, normed));
  Tensor out(logits.data(), DType::kF32, {n, config_.vocab_size});
  return kernels::Linear(normed, lm_head_, nullptr, out);
}

absl::Status LlamaModel::Forward(const ForwardBatch& batch, KvCache& cache, Workspace& ws,
                                 std::vector<float>& logits) const {
  CLEAVE_CHECK_ARG(cache.num_layers() == config_.num_hidden_layers, "KV cache layer count != model");
  CLEAVE_ASSIGN_OR_RETURN(HiddenState h, Embed(batch, ws));
  for (int l = 0; l < config_.num_hidden_layers; ++l) {
    CLEAVE_RETURN_IF_ERROR(RunMixer(l, batch, cache, ws, h));
    CLEAVE_RETURN_IF_ERROR(RunFfn(l, ws, h));
  }
  return ComputeLogits(batch, ws, h, logits);
}

}  // namespace cleave::model
