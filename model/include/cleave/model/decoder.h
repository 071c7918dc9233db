// The decoder-only language models cleave runs: the Llama family (Llama, Mistral, Qwen2), MoE
// (Mixtral, Qwen2-MoE), Mamba and the Jamba hybrid. They share one shape — embeddings, a stack of
// (sequence mixer, FFN) layers over an RMSNorm'd residual stream, a final norm and an LM head —
// and differ per layer in the mixer (attention over the paged KV cache, or a Mamba mixer over
// per-request state slots) and the FFN (dense SwiGLU, mixture of experts, or none). Weights are
// views of memory-mapped safetensors.
//
// A decoder layer is split at an explicit seam into its sequence mixer and its FFN,
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
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/moe.h"
#include "cleave/kernels/tensor.h"
#include "cleave/model/config.h"
#include "cleave/model/forward_batch.h"
#include "cleave/model/kv_cache.h"
#include "cleave/model/weight_store.h"

namespace cleave::model {

namespace internal {
class DeviceWorkspace;
struct BatchTensors;
}  // namespace internal

// Scratch for one forward pass, grown on demand and reused across steps so a steady decode loop
// does not allocate. One per executing thread.
struct Workspace {
  std::vector<float> residual, delta, normed, q, k, v, attn, gate_up, act;
  std::vector<float> final_residual, final_delta, final_normed, final_logits;
  // Mamba mixer: in_proj output [T, 2 d_inner] (x | z), conv output, x_proj output [T, r + 2N],
  // dt [T, d_inner], scan output.
  std::vector<float> xz, conv_out, xdbc, dt, scan_out;
  // MoE FFN.
  std::vector<float> router_logits, moe_out, shared_gate;
  kernels::MoeRouting routing;
  kernels::MoeWorkspace moe;
  // Router statistics: tokens routed to each expert of each layer since the caller last cleared
  // it ([num_layers][num_experts]; empty rows for layers without MoE). For metrics and expert
  // placement; RunFfn adds to it.
  std::vector<std::vector<int64_t>> expert_tokens;
  // A model on a CUDA device keeps the scratch above (and the pass's uploaded plan) in device
  // memory here instead; created on the workspace's first pass. Null on the CPU.
  std::shared_ptr<internal::DeviceWorkspace> device;
};

// Which weights a process binds (they are views of the mapped files: what is not bound is never
// paged in). Attention-FFN disaggregation splits them: an attention worker binds everything but
// the FFN projections (it keeps the FFN norms, the routers and the shared-expert gate, because it
// normalises and routes), an FFN worker only the dense FFNs and the experts it owns.
struct LoadOptions {
  enum class Part { kAll, kAttention, kFfn };
  Part part = Part::kAll;
  // kFfn: the routed experts this worker owns (any order); the shared expert if `shared_expert`.
  std::vector<int> experts;
  bool shared_expert = false;
  // Where the weights live and the pass runs: the CPU (views of the mapped files, nothing
  // copied), or a CUDA device (every weight copied there at load; the KvCache passed to Forward
  // must be on the same device). Only Part::kAll runs on a device for now.
  kernels::Device device = kernels::Device::Cpu();
  // On a device: the storage type of the weight matrices (projections, experts, embeddings, LM
  // head). kBF16 converts f32/f16 checkpoints at load (half the bytes per decode step, the
  // tensor-core GEMM path); kAsStored keeps the checkpoint's type. Norms, biases, the router, the
  // conv kernels, A and D stay f32 either way. Ignored on the CPU.
  enum class DeviceWeights { kBF16, kAsStored };
  DeviceWeights device_weights = DeviceWeights::kBF16;
};

// The residual stream of the T tokens of one pass, f32 [T, hidden] each.
struct HiddenState {
  kernels::Tensor residual;
  kernels::Tensor delta;
};

class DecoderModel {
 public:
  // Loads config.json and the safetensors weights of `model_dir`, checking every tensor's shape
  // against the config. The weight files stay mapped for the model's lifetime.
  // Models with Mamba layers read and write the state slots named by ForwardBatch::state_slots.
  static absl::StatusOr<std::unique_ptr<DecoderModel>> Load(const std::filesystem::path& model_dir,
                                                            LoadOptions options = {});
  static absl::StatusOr<std::unique_ptr<DecoderModel>> FromWeights(ModelConfig config,
                                                                 std::unique_ptr<WeightStore> weights,
                                                                 LoadOptions options = {});

  const ModelConfig& config() const { return config_; }
  kernels::Device device() const { return options_.device; }
  // Bytes of weights this instance holds on its device (0 on the CPU, where they stay mapped).
  size_t device_weight_bytes() const { return device_weight_bytes_; }

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
  // A model on a device: the same logits, f32 [logits_indices.size(), vocab], left on the device
  // (a view of ws's scratch, valid until the workspace's next pass) for a device sampler, with
  // no copy to the host. FailedPrecondition on the CPU.
  [[nodiscard]] absl::StatusOr<kernels::Tensor> ComputeDeviceLogits(const ForwardBatch& batch, Workspace& ws,
                                                                    HiddenState& h) const;

  // Attention-FFN disaggregation: RunFfn cut at the wire (see decoder_afd.cc). The attention side
  // runs FfnInput (and for MoE layers RouteMoe), ships `normed` to the FFN workers, and folds
  // their answer back with CombineMoe (MoE; dense answers land in h.delta as they are). The FFN
  // side runs FfnDense / FfnExperts. Together they compute bit for bit what RunFfn does.
  FfnKind ffn_kind(int layer) const { return layers_[layer].ffn; }
  // AddRmsNorm with the layer's FFN norm: the residual absorbs the mixer's delta; returns the
  // normalised rows (a view of ws.normed). Layers without an FFN must not call it.
  [[nodiscard]] absl::StatusOr<kernels::Tensor> FfnInput(int layer, Workspace& ws, HiddenState& h) const;
  // Router logits and top-k into ws.routing (counted in ws.expert_tokens), and the shared
  // expert's gate logits into ws.shared_gate when the model has one.
  [[nodiscard]] absl::Status RouteMoe(int layer, const kernels::Tensor& normed, Workspace& ws) const;
  // h.delta = the weighted sum of slot_out ([T*k, D], slot order) + the gated shared expert
  // output (shared_out [T, D]; required exactly when the model has a shared expert).
  [[nodiscard]] absl::Status CombineMoe(int layer, const kernels::Tensor& slot_out,
                                        const kernels::Tensor* shared_out, Workspace& ws,
                                        HiddenState& h) const;
  // FFN side. x, out: f32 [T, D]. FfnExperts: row i of out = expert experts[i] (the model's
  // num_experts = the shared expert) applied to x[rows[i]], unweighted; every expert must be
  // owned (LoadOptions) and every row < T.
  [[nodiscard]] absl::Status FfnDense(int layer, const kernels::Tensor& x, kernels::Tensor& out,
                                      Workspace& ws) const;
  [[nodiscard]] absl::Status FfnExperts(int layer, const kernels::Tensor& x,
                                        std::span<const int32_t> rows,
                                        std::span<const int32_t> experts, kernels::Tensor& out,
                                        Workspace& ws) const;
  bool owns_expert(int expert) const;

 private:
  struct AttentionWeights {
    kernels::Tensor wq, wk, wv, wo;  // [out, in], f32/bf16/f16 views of the mapped file
    kernels::Tensor bq, bk, bv;      // f32, empty when the model has no attention bias
  };
  struct MambaWeights {
    kernels::Tensor in_proj, in_proj_bias;    // [2 d_inner, D]; bias f32 or empty
    kernels::Tensor conv_w, conv_b;           // owned f32 [d_inner, K], [d_inner] or empty
    kernels::Tensor x_proj;                   // [dt_rank + 2N, d_inner]
    kernels::Tensor dt_proj, dt_bias;         // [d_inner, dt_rank]; f32 [d_inner]
    kernels::Tensor a;                        // owned f32 [d_inner, N] = -exp(A_log)
    kernels::Tensor d;                        // f32 [d_inner]
    kernels::Tensor out_proj, out_proj_bias;  // [D, d_inner]; bias f32 or empty
    kernels::Tensor dt_norm, b_norm, c_norm;  // Jamba: f32 [dt_rank], [N], [N]; else empty
  };
  struct DenseFfnWeights {
    kernels::Tensor w_gate, w_up, w_down;
  };
  struct MoeWeights {
    kernels::Tensor router;  // [E, D]
    kernels::MoeExpertWeights experts;
    DenseFfnWeights shared;       // Qwen2-MoE's shared expert (empty tensors when absent)
    kernels::Tensor shared_gate;  // [1, D]
  };
  struct Layer {
    MixerKind mixer = MixerKind::kAttention;
    FfnKind ffn = FfnKind::kDense;
    kernels::Tensor input_norm, post_norm;  // f32 [D] (owned copies when stored as 16-bit)
    AttentionWeights attn;
    MambaWeights mamba;
    DenseFfnWeights mlp;
    MoeWeights moe;
  };

  absl::Status BindAttention(const std::string& prefix, AttentionWeights& w);
  absl::Status BindMamba(const std::string& prefix, MambaWeights& w);
  absl::Status BindDense(const std::string& prefix, const char* gate, const char* up,
                         const char* down, int64_t f, DenseFfnWeights& w);
  absl::Status BindMoe(const std::string& prefix, MoeWeights& w);
  absl::StatusOr<kernels::Tensor> OwnedF32(const std::string& name, std::initializer_list<int64_t> shape);
  absl::StatusOr<kernels::Tensor> OptionalVectorF32(const std::string& name, int64_t n, bool present);

  absl::Status RunAttention(const Layer& L, int layer, const ForwardBatch& batch, KvCache& cache,
                            Workspace& ws, const kernels::Tensor& normed, HiddenState& h) const;
  absl::Status RunMamba(const Layer& L, int layer, const ForwardBatch& batch, KvCache& cache,
                        Workspace& ws, const kernels::Tensor& normed, HiddenState& h) const;
  absl::Status RunDense(const DenseFfnWeights& w, int64_t f, Workspace& ws,
                        const kernels::Tensor& normed, kernels::Tensor& out) const;
  absl::Status RunMoe(const Layer& L, int layer, Workspace& ws, const kernels::Tensor& normed,
                      HiddenState& h) const;

  DecoderModel(ModelConfig config, std::unique_ptr<WeightStore> weights, LoadOptions options);
  bool binds_mixers() const { return options_.part != LoadOptions::Part::kFfn; }
  bool binds_ffn() const { return options_.part != LoadOptions::Part::kAttention; }
  absl::Status BindWeights();
  absl::StatusOr<kernels::Tensor> VectorF32(const std::string& name, int64_t n);
  absl::Status Reserve(Workspace& ws, int tokens) const;
  // An f32 [rows, cols] view of the scratch `host` names (a field of `ws`): the vector itself on
  // the CPU, grown when short; its device buffer on a device (device_workspace.h).
  absl::StatusOr<kernels::Tensor> Scratch(Workspace& ws, std::vector<float>& host, int64_t rows,
                                          int64_t cols) const;
  // The pass's plan as kernel inputs: views of `batch` on the CPU, the copy Embed uploaded on a
  // device.
  internal::BatchTensors Plan(const ForwardBatch& batch, const Workspace& ws) const;
  // Copies every bound weight to options_.device (decoder_device.cc).
  absl::Status UploadWeights();

  ModelConfig config_;
  LoadOptions options_;
  std::vector<bool> owned_experts_;  // [num_experts + 1]; the last is the shared expert
  std::unique_ptr<WeightStore> weights_;
  std::vector<std::vector<float>> owned_;  // f32 copies of small vectors (norms, biases)
  std::vector<Layer> layers_;
  kernels::Tensor embed_, final_norm_, lm_head_;
  std::vector<float> rope_cos_, rope_sin_;
  kernels::Tensor rope_cos_t_, rope_sin_t_;
  // A model on a device: its backend and the device copies of the weights.
  kernels::Backend* backend_ = nullptr;
  std::vector<std::unique_ptr<kernels::Buffer>> device_buffers_;
  size_t device_weight_bytes_ = 0;
};

}  // namespace cleave::model
