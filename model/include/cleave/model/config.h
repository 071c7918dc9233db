// ModelConfig: what cleave reads from a Hugging Face config.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/kernels/rope.h"

namespace cleave::model {

enum class Architecture { kLlama, kMistral, kQwen2, kMixtral, kQwen2Moe, kMamba, kJamba };

// What a layer mixes the sequence with, and what its feed-forward half is.
enum class MixerKind { kAttention, kMamba };
enum class FfnKind { kNone, kDense, kMoe };  // kNone: Mamba blocks have no FFN

// Mixture-of-experts FFN (Mixtral, Qwen2-MoE, Jamba).
struct MoeConfig {
  int num_experts = 0;
  int top_k = 0;
  int expert_intermediate_size = 0;  // each routed expert's F
  bool renormalize = false;          // divide the top-k weights by their sum
  int shared_expert_intermediate_size = 0;  // 0 = no shared expert (Qwen2-MoE has one, sigmoid-gated)
};

// Mamba (selective SSM) mixer shape (Mamba, Jamba).
struct MambaConfig {
  int d_inner = 0;   // expand * hidden_size
  int d_state = 0;   // N
  int d_conv = 0;    // K, the conv1d kernel width
  int dt_rank = 0;
  bool conv_bias = true;
  bool proj_bias = false;     // in_proj / out_proj biases
  bool bcdt_norms = false;    // Jamba: RMSNorm on dt, B and C before the scan
};

struct ModelConfig {
  Architecture architecture = Architecture::kLlama;
  std::string architecture_name;  // as written in config.json ("LlamaForCausalLM")
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;  // defaults to num_attention_heads
  int head_dim = 0;             // defaults to hidden_size / num_attention_heads
  int vocab_size = 0;
  int max_position_embeddings = 2048;
  float rms_norm_eps = 1e-6f;
  kernels::RopeConfig rope;     // theta, scaling; style is always kHalves for HF checkpoints
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v biases (Qwen2 always; Llama when attention_bias: true)
  bool mlp_bias = false;
  int sliding_window = 0;       // 0 = full attention (Mistral may set it)
  int bos_token_id = -1;
  int eos_token_id = -1;        // first of the list when config gives several
  std::vector<int> eos_token_ids;
  std::string torch_dtype = "float32";
  int kv_block_size = 16;       // cleave's paged-KV block size; not an HF field
  bool use_rope = true;         // Jamba's attention has no positional encoding
  // Per layer, num_hidden_layers long: filled for every architecture (all kAttention / kDense for
  // the Llama family).
  std::vector<MixerKind> layer_mixer;
  std::vector<FfnKind> layer_ffn;
  MoeConfig moe;
  MambaConfig mamba;

  bool IsEos(int id) const {
    for (int e : eos_token_ids) if (e == id) return true;
    return id == eos_token_id;
  }
  int q_size() const { return num_attention_heads * head_dim; }
  int num_layers_of(MixerKind kind) const {
    int n = 0;
    for (MixerKind m : layer_mixer) n += m == kind;
    return n;
  }
  // True when requests carry per-layer recurrent state (conv + SSM) besides attention KV.
  bool has_ssm_state() const { return num_layers_of(MixerKind::kMamba) > 0; }
  int kv_size() const { return num_key_value_heads * head_dim; }
};

// Parses and validates config.json text. Unsupported architectures, missing or non-positive
// sizes, heads not dividing evenly, and unknown rope_scaling types are InvalidArgument with a
// message naming the field.
[[nodiscard]] absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text);
// Reads <dir>/config.json (NotFound naming the path when absent).
[[nodiscard]] absl::StatusOr<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir);

}  // namespace cleave::model
