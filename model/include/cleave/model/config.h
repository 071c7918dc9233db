// ModelConfig: what cleave reads from a Hugging Face config.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/kernels/rope.h"

namespace cleave::model {

enum class Architecture { kLlama, kMistral, kQwen2 };

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

  bool IsEos(int id) const {
    for (int e : eos_token_ids) if (e == id) return true;
    return id == eos_token_id;
  }
  int q_size() const { return num_attention_heads * head_dim; }
  int kv_size() const { return num_key_value_heads * head_dim; }
};

// Parses and validates config.json text. Unsupported architectures, missing or non-positive
// sizes, heads not dividing evenly, and unknown rope_scaling types are InvalidArgument with a
// message naming the field.
[[nodiscard]] absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text);
// Reads <dir>/config.json (NotFound naming the path when absent).
[[nodiscard]] absl::StatusOr<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir);

}  // namespace cleave::model
