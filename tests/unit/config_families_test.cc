// ParseModelConfig for the MoE, Mamba and hybrid families: configs shaped like the published
// checkpoints (Mixtral-8x7B, Qwen1.5-MoE-A2.7B, mamba-130m-hf, Jamba-v0.1), the per-layer kinds
// derived from them, transformers' defaults, and malformed fields (InvalidArgument naming them).
#include <string>

#include "cleave/model/config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

json Mixtral8x7B() {
  return json::parse(R"({
    "architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 32000, "max_position_embeddings": 32768, "num_local_experts": 8,
    "num_experts_per_tok": 2, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": null, "tie_word_embeddings": false, "torch_dtype": "bfloat16"})");
}

json Qwen15MoE() {
  return json::parse(R"({
    "architectures": ["Qwen2MoeForCausalLM"], "hidden_size": 2048, "intermediate_size": 5632,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
    "vocab_size": 151936, "num_experts": 60, "num_experts_per_tok": 4,
    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
    "norm_topk_prob": false, "decoder_sparse_step": 1, "mlp_only_layers": [],
    "use_sliding_window": false, "bos_token_id": 151643, "eos_token_id": 151643})");
}

json Mamba130m() {
  return json::parse(R"({
    "architectures": ["MambaForCausalLM"], "hidden_size": 768, "num_hidden_layers": 24,
    "vocab_size": 50280, "state_size": 16, "conv_kernel": 4, "expand": 2,
    "time_step_rank": "auto", "use_bias": false, "use_conv_bias": true,
    "layer_norm_epsilon": 1e-05, "bos_token_id": 0, "eos_token_id": 0})");
}

json JambaV01() {
  return json::parse(R"({
    "architectures": ["JambaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "vocab_size": 65536, "attn_layer_period": 8, "attn_layer_offset": 4,
    "expert_layer_period": 2, "expert_layer_offset": 1, "num_experts": 16,
    "num_experts_per_tok": 2, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
    "mamba_dt_rank": 256, "mamba_conv_bias": true, "mamba_proj_bias": false})");
}

ModelConfig Parse(const json& j) {
  auto c = ParseModelConfig(j.dump());
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : ModelConfig();
}

std::string ErrorOf(const json& j) {
  auto c = ParseModelConfig(j.dump());
  EXPECT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(c.status().message());
}

TEST(ConfigFamilies, Mixtral) {
  const ModelConfig c = Parse(Mixtral8x7B());
  EXPECT_EQ(c.architecture, Architecture::kMixtral);
  EXPECT_EQ(c.moe.num_experts, 8);
  EXPECT_EQ(c.moe.top_k, 2);
  EXPECT_EQ(c.moe.expert_intermediate_size, 14336);
  EXPECT_TRUE(c.moe.renormalize);
  EXPECT_EQ(c.moe.shared_expert_intermediate_size, 0);
  EXPECT_EQ(c.num_layers_of(MixerKind::kAttention), 32);
  EXPECT_EQ(c.layer_ffn, std::vector<FfnKind>(32, FfnKind::kMoe));
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_DOUBLE_EQ(c.rope.theta, 1e6);
  EXPECT_FALSE(c.has_ssm_state());
  // Without rope_theta, MixtralConfig's default is 1e6 (not Llama's 1e4).
  json j = Mixtral8x7B();
  j.erase("rope_theta");
  EXPECT_DOUBLE_EQ(Parse(j).rope.theta, 1e6);
}

TEST(ConfigFamilies, Qwen2MoeSparseStepAndDenseLayers) {
  ModelConfig c = Parse(Qwen15MoE());
  EXPECT_EQ(c.architecture, Architecture::kQwen2Moe);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_FALSE(c.moe.renormalize);
  EXPECT_EQ(c.moe.expert_intermediate_size, 1408);
  EXPECT_EQ(c.moe.shared_expert_intermediate_size, 5632);
  EXPECT_EQ(c.num_layers_of(MixerKind::kAttention), 24);
  EXPECT_EQ(c.layer_ffn, std::vector<FfnKind>(24, FfnKind::kMoe));
  json j = Qwen15MoE();
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  c = Parse(j);
  // Sparse iff (l + 1) % 2 == 0 and l not listed: layers 1, 5, 7, ... (3 is listed).
  EXPECT_EQ(c.layer_ffn[0], FfnKind::kDense);
  EXPECT_EQ(c.layer_ffn[1], FfnKind::kMoe);
  EXPECT_EQ(c.layer_ffn[3], FfnKind::kDense);
  EXPECT_EQ(c.layer_ffn[5], FfnKind::kMoe);
  j["mlp_only_layers"] = {24};
  EXPECT_THAT(ErrorOf(j), HasSubstr("mlp_only_layers"));
  j = Qwen15MoE();
  j["num_experts_per_tok"] = 61;
  EXPECT_THAT(ErrorOf(j), HasSubstr("num_experts_per_tok"));
}

TEST(ConfigFamilies, MambaHasNoAttention) {
  const ModelConfig c = Parse(Mamba130m());
  EXPECT_EQ(c.architecture, Architecture::kMamba);
  EXPECT_EQ(c.num_layers_of(MixerKind::kAttention), 0);
  EXPECT_EQ(c.layer_ffn, std::vector<FfnKind>(24, FfnKind::kNone));
  EXPECT_EQ(c.mamba.d_inner, 1536);
  EXPECT_EQ(c.mamba.dt_rank, 48);  // "auto" = ceil(768 / 16)
  EXPECT_EQ(c.mamba.d_state, 16);
  EXPECT_EQ(c.mamba.d_conv, 4);
  EXPECT_TRUE(c.tie_word_embeddings);  // MambaConfig's default
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_TRUE(c.has_ssm_state());
  EXPECT_FALSE(c.use_rope);
  json j = Mamba130m();
  j["time_step_rank"] = "fast";
  EXPECT_THAT(ErrorOf(j), HasSubstr("time_step_rank"));
  j = Mamba130m();
  j.erase("hidden_size");
  EXPECT_THAT(ErrorOf(j), HasSubstr("hidden_size"));
}

TEST(ConfigFamilies, JambaPeriods) {
  const ModelConfig c = Parse(JambaV01());
  EXPECT_EQ(c.architecture, Architecture::kJamba);
  EXPECT_EQ(c.num_layers_of(MixerKind::kAttention), 4);  // layers 4, 12, 20, 28
  EXPECT_EQ(c.layer_mixer[4], MixerKind::kAttention);
  EXPECT_EQ(c.layer_mixer[5], MixerKind::kMamba);
  EXPECT_EQ(c.layer_ffn[0], FfnKind::kDense);
  EXPECT_EQ(c.layer_ffn[1], FfnKind::kMoe);
  EXPECT_FALSE(c.moe.renormalize);
  EXPECT_EQ(c.mamba.dt_rank, 256);
  EXPECT_TRUE(c.mamba.bcdt_norms);
  EXPECT_FALSE(c.use_rope);
  EXPECT_TRUE(c.has_ssm_state());
  json j = JambaV01();
  j["attn_layer_offset"] = 8;
  EXPECT_THAT(ErrorOf(j), HasSubstr("attn_layer_offset"));
  j = JambaV01();
  j["expert_layer_period"] = 0;
  EXPECT_THAT(ErrorOf(j), HasSubstr("expert_layer_period"));
  // One expert means a plain MLP on every layer, as in transformers.
  j = JambaV01();
  j["num_experts"] = 1;
  j["num_experts_per_tok"] = 1;
  EXPECT_EQ(Parse(j).layer_ffn, std::vector<FfnKind>(32, FfnKind::kDense));
}

TEST(ConfigFamilies, LlamaFamilyIsAllAttentionAndDense) {
  const ModelConfig c = Parse(json::parse(R"({"architectures": ["LlamaForCausalLM"],
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
    "num_attention_heads": 4, "vocab_size": 100})"));
  EXPECT_EQ(c.layer_mixer, std::vector<MixerKind>(3, MixerKind::kAttention));
  EXPECT_EQ(c.layer_ffn, std::vector<FfnKind>(3, FfnKind::kDense));
  EXPECT_FALSE(c.has_ssm_state());
}

}  // namespace
}  // namespace cleave::model
