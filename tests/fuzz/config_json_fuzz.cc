// libFuzzer target: arbitrary bytes as config.json text. ParseModelConfig must return a status
// (no exception, no crash); an accepted config must satisfy the invariants the model code
// assumes without re-checking.
#include <cstddef>
#include <cstdint>
#include <string>

#include "cleave/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto config = cleave::model::ParseModelConfig(std::string(reinterpret_cast<const char*>(data), size));
  if (!config.ok()) return 0;
  using cleave::model::FfnKind;
  using cleave::model::MixerKind;
  const cleave::model::ModelConfig& c = *config;
  if (c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_hidden_layers <= 0 || c.vocab_size <= 0 ||
      c.max_position_embeddings <= 0 || c.kv_block_size <= 0) {
    __builtin_trap();
  }
  if (static_cast<int>(c.layer_mixer.size()) != c.num_hidden_layers ||
      static_cast<int>(c.layer_ffn.size()) != c.num_hidden_layers) {
    __builtin_trap();
  }
  // Attention invariants hold whenever some layer attends (Mamba has none).
  if (c.num_layers_of(MixerKind::kAttention) > 0) {
    if (c.num_attention_heads <= 0 || c.num_key_value_heads <= 0 ||
        c.num_attention_heads % c.num_key_value_heads != 0) {
      __builtin_trap();
    }
    if (c.head_dim <= 0 || c.head_dim % 2 != 0 || c.rope.rotary_dim != c.head_dim) __builtin_trap();
    if (c.q_size() <= 0 || c.kv_size() <= 0 || c.sliding_window < 0) __builtin_trap();
    if (!(c.rope.theta > 0)) __builtin_trap();
  }
  if (c.has_ssm_state() && (c.mamba.d_inner <= 0 || c.mamba.d_state <= 0 || c.mamba.d_conv <= 0 ||
                            c.mamba.dt_rank <= 0)) {
    __builtin_trap();
  }
  for (FfnKind f : c.layer_ffn) {
    if (f == FfnKind::kMoe && (c.moe.top_k < 1 || c.moe.top_k > c.moe.num_experts ||
                               c.moe.expert_intermediate_size <= 0)) {
      __builtin_trap();
    }
  }
  if (!(c.rms_norm_eps > 0)) __builtin_trap();
  if (c.eos_token_ids.empty() ? c.eos_token_id != -1 : c.eos_token_id != c.eos_token_ids.front()) {
    __builtin_trap();
  }
  return 0;
}
