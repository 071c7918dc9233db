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
  const cleave::model::ModelConfig& c = *config;
  if (c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_hidden_layers <= 0 || c.vocab_size <= 0 ||
      c.max_position_embeddings <= 0 || c.kv_block_size <= 0) {
    __builtin_trap();
  }
  if (c.num_attention_heads <= 0 || c.num_key_value_heads <= 0 ||
      c.num_attention_heads % c.num_key_value_heads != 0) {
    __builtin_trap();
  }
  if (c.head_dim <= 0 || c.head_dim % 2 != 0 || c.rope.rotary_dim != c.head_dim) __builtin_trap();
  if (c.q_size() <= 0 || c.kv_size() <= 0 || c.sliding_window < 0) __builtin_trap();
  if (!(c.rms_norm_eps > 0) || !(c.rope.theta > 0)) __builtin_trap();
  if (c.eos_token_ids.empty() ? c.eos_token_id != -1 : c.eos_token_id != c.eos_token_ids.front()) {
    __builtin_trap();
  }
  return 0;
}
