// The Llama-family decoder (Llama, Mistral, Qwen2 — they differ only by config): weights viewed
// from memory-mapped safetensors, a forward pass over the paged KV cache.
//
// A decoder layer is split at an explicit seam into its sequence mixer (attention) and its FFN,
// each a public call that reads and writes the residual stream only, so that the two halves can
// later run in different processes (attention–FFN disaggregation):
//
//   Embed -> for each layer: RunMixer(l) ; RunFfn(l) -> ComputeLogits
//
// The residual stream is carried as (residual, delta): each half first folds the previous half's
// output into the residual and normalises it (fused AddRmsNorm), then writes its own delta.
#pragma once

#include <filesystem>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"
#include "cleave/model/config.h"
#include "cleave/model/forward_batch.h"
#include "cleave/model/kv_cache.h"
#include "cleave/model/weight_store.h"

namespace cleave::model {

// Scratch for one forward pass, grown on demand and reused across steps so a steady decode loop
// does not allocate. One per executing thread.
struct Workspace {
  std::vector<float> residual, delta, normed, q, k, v, attn, gate_up, act;
  std::vector<float> final_residual, final_delta, final_normed;
};

// The residual stream of the T tokens of one pass, f32 [T, hidden] each.
struct HiddenState {
  kernels::Tensor residual;
  kernels::Tensor delta;
};

class LlamaModel {
 public:
  // Loads config.json and the safetensors weights of `model_dir`, checking every tensor's shape
  // against the config. The weight files stay mapped for the model's lifetime.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::filesystem::path& model_dir);
  static absl::StatusOr<std::unique_ptr<LlamaModel>> FromWeights(ModelConfig config,
                                                                 std::unique_ptr<WeightStore> weights);

  const ModelConfig& config() const { return config_; }

  // Whole pass: logits f32 [logits_indices.size(), vocab] written to `logits`. Thread-compatible:
  // concurrent calls need their own Workspace and must not write the same cache blocks.
  [[nodiscard]] absl::Status Forward(const ForwardBatch& batch, KvCache& cache, Workspace& ws,
                                     std::vector<float>& logits) const;

  // The pieces Forward is made of, public for disaggregated execution.
  [[nodiscard]] absl::StatusOr<HiddenState> Embed(const ForwardBatch& batch, Workspace& ws) const;
  [[nodiscard]] absl::Status RunMixer(int layer, const ForwardBatch& batch, KvCache& cache,
                                      Workspace& ws, HiddenState& h) const;
  [[nodiscard]] absl::Status RunFfn(int layer, Workspace& ws, HiddenState& h) const;
  [[nodiscard]] absl::Status ComputeLogits(const ForwardBatch& batch, Workspace& ws, HiddenState& h,
                                           std::vector<float>& logits) const;

 private:
  struct Layer {
    kernels::Tensor input_norm, post_norm;  // f32 [D] (owned copies when stored as 16-bit)
    kernels::Tensor wq, wk, wv, wo;         // [out, in], f32/bf16/f16 views of the mapped file
    kernels::Tensor bq, bk, bv;             // f32, empty when the model has no attention bias
    kernels::Tensor w_gate, w_up, w_down;
  };

  LlamaModel(ModelConfig config, std::unique_ptr<WeightStore> weights);
  absl::Status BindWeights();
  absl::StatusOr<kernels::Tensor> VectorF32(const std::string& name, int64_t n);
  void Reserve(Workspace& ws, int tokens) const;

  ModelConfig config_;
  std::unique_ptr<WeightStore> weights_;
  std::vector<std::vector<float>> owned_;  // f32 copies of small vectors (norms, biases)
  std::vector<Layer> layers_;
  kernels::Tensor embed_, final_norm_, lm_head_;
  std::vector<float> rope_cos_, rope_sin_;
  kernels::Tensor rope_cos_t_, rope_sin_t_;
};

}  // namespace cleave::model
