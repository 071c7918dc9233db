// ParseModelConfig / LoadModelConfig against configs modelled on real checkpoints, the defaults
// transformers' config classes apply, and malformed input (which must come back as
// InvalidArgument naming the field, never as an exception).
#include "cleave/model/config.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

using json = nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// meta-llama/Llama-3.1-8B config.json.
constexpr char kLlama31_8B[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.43.0.dev0",
  "use_cache": true,
  "vocab_size": 128256
})";

// mistralai/Mistral-7B-v0.1 config.json.
constexpr char kMistral7B[] = R"({
  "architectures": ["MistralForCausalLM"],
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 32768,
  "model_type": "mistral",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0,
  "sliding_window": 4096,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.34.0.dev0",
  "use_cache": true,
  "vocab_size": 32000
})";

// Qwen/Qwen2-0.5B config.json.
constexpr char kQwen2_05B[] = R"({
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 131072,
  "max_window_layers": 24,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 131072,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.40.1",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
})";

// Only the fields cleave requires.
constexpr char kMinimalLlama[] = R"({
  "architectures": ["LlamaForCausalLM"],
  "hidden_size": 256,
  "intermediate_size": 512,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "vocab_size": 1000
})";

// Parses `base`, applies `edit` to the JSON, and parses the result.
template <typename Edit>
absl::StatusOr<ModelConfig> ParseEdited(const char* base, Edit edit) {
  json j = json::parse(base);
  edit(j);
  return ParseModelConfig(j.dump());
}

void ExpectInvalid(const absl::StatusOr<ModelConfig>& c, const std::string& needle) {
  ASSERT_FALSE(c.ok()) << "expected an error mentioning '" << needle << "'";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << c.status();
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(needle));
}

TEST(ConfigTest, Llama31With3RopeScaling) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kLlama31_8B);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kLlama);
  EXPECT_EQ(c->architecture_name, "LlamaForCausalLM");
  EXPECT_EQ(c->hidden_size, 4096);
  EXPECT_EQ(c->intermediate_size, 14336);
  EXPECT_EQ(c->num_hidden_layers, 32);
  EXPECT_EQ(c->num_attention_heads, 32);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->q_size(), 4096);
  EXPECT_EQ(c->kv_size(), 1024);
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->max_position_embeddings, 131072);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-5f);
  EXPECT_EQ(c->rope.rotary_dim, 128);
  EXPECT_EQ(c->rope.style, kernels::RopeStyle::kHalves);
  EXPECT_DOUBLE_EQ(c->rope.theta, 500000.0);
  EXPECT_EQ(c->rope.scaling, kernels::RopeScaling::kLlama3);
  EXPECT_DOUBLE_EQ(c->rope.factor, 8.0);
  EXPECT_DOUBLE_EQ(c->rope.low_freq_factor, 1.0);
  EXPECT_DOUBLE_EQ(c->rope.high_freq_factor, 4.0);
  EXPECT_EQ(c->rope.original_max_position, 8192);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->mlp_bias);
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_EQ(c->eos_token_id, 128001);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(128001, 128008, 128009));
  EXPECT_TRUE(c->IsEos(128009));
  EXPECT_FALSE(c->IsEos(128000));
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  EXPECT_EQ(c->kv_block_size, 16);
}

TEST(ConfigTest, Mistral7B) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kMistral7B);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kMistral);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->sliding_window, 4096);
  EXPECT_EQ(c->max_position_embeddings, 32768);
  EXPECT_EQ(c->rope.scaling, kernels::RopeScaling::kNone);
  EXPECT_DOUBLE_EQ(c->rope.theta, 10000.0);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_id, 2);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));
}

TEST(ConfigTest, MistralSlidingWindowNullMeansFullAttention) {
  auto c = ParseEdited(kMistral7B, [](json& j) { j["sliding_window"] = nullptr; });
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 0);
}

TEST(ConfigTest, MistralClassDefaultsWhenKeysAbsent) {
  // MistralConfig's own defaults: 8 KV heads, a 4096 window, 4096 * 32 positions.
  auto c = ParseEdited(kMistral7B, [](json& j) {
    j.erase("sliding_window");
    j.erase("num_key_value_heads");
    j.erase("max_position_embeddings");
  });
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->sliding_window, 4096);
  EXPECT_EQ(c->num_key_value_heads, 8);
  EXPECT_EQ(c->max_position_embeddings, 131072);
  // An explicit null means "same as the attention heads" in every config class.
  c = ParseEdited(kMistral7B, [](json& j) { j["num_key_value_heads"] = nullptr; });
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 32);
}

TEST(ConfigTest, Qwen2_05B) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kQwen2_05B);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kQwen2);
  EXPECT_EQ(c->hidden_size, 896);
  EXPECT_EQ(c->num_attention_heads, 14);
  EXPECT_EQ(c->num_key_value_heads, 2);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_TRUE(c->attention_bias);  // always, for Qwen2
  EXPECT_FALSE(c->mlp_bias);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->sliding_window, 0);  // use_sliding_window: false
  EXPECT_DOUBLE_EQ(c->rope.theta, 1e6);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_EQ(c->bos_token_id, 151643);
  EXPECT_EQ(c->eos_token_id, 151643);
}

TEST(ConfigTest, Qwen2SlidingWindow) {
  // Every layer >= max_window_layers slides; all of them, or none, is what cleave supports.
  auto all = ParseEdited(kQwen2_05B, [](json& j) {
    j["use_sliding_window"] = true;
    j["sliding_window"] = 4096;
    j["max_window_layers"] = 0;
  });
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->sliding_window, 4096);

  auto none = ParseEdited(kQwen2_05B, [](json& j) { j["use_sliding_window"] = true; });
  ASSERT_TRUE(none.ok()) << none.status();  // max_window_layers 24 == num_hidden_layers
  EXPECT_EQ(none->sliding_window, 0);

  ExpectInvalid(ParseEdited(kQwen2_05B,
                            [](json& j) {
                              j["use_sliding_window"] = true;
                              j["max_window_layers"] = 12;
                            }),
                "12 of 24 layers sliding");

  auto typed = ParseEdited(kQwen2_05B, [](json& j) {
    j["use_sliding_window"] = true;
    j["sliding_window"] = 1024;
    j["layer_types"] = json(std::vector<std::string>(24, "sliding_attention"));
  });
  ASSERT_TRUE(typed.ok()) << typed.status();
  EXPECT_EQ(typed->sliding_window, 1024);
}

TEST(ConfigTest, DeeplyNestedValuesAreRejectedWithoutRecursion) {
  // Built as text: copying or dumping such a value with nlohmann recurses, which is exactly what
  // the parser must avoid.
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  const std::string qwen =
      R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 1000, "use_sliding_window": true, "max_window_layers": 0,
          "layer_types": [)" + deep + ", " + deep + "]}";
  ExpectInvalid(ParseModelConfig(qwen), "layer_types");
  ExpectInvalid(ParseModelConfig(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": )" + deep + "}"),
                "hidden_size");
  ExpectInvalid(ParseModelConfig(R"({"architectures": )" + deep + "}"), "architectures");
}

TEST(ConfigTest, Qwen2ClassDefaults) {
  auto c = ParseEdited(kQwen2_05B, [](json& j) {
    for (const char* k : {"num_key_value_heads", "bos_token_id", "eos_token_id", "max_position_embeddings",
                          "tie_word_embeddings", "rope_theta", "rms_norm_eps"}) {
      j.erase(k);
    }
    j["num_attention_heads"] = 32;
    j["hidden_size"] = 2048;
  });
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 32);
  EXPECT_EQ(c->bos_token_id, -1);
  EXPECT_EQ(c->eos_token_id, -1);
  EXPECT_TRUE(c->eos_token_ids.empty());
  EXPECT_EQ(c->max_position_embeddings, 32768);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_DOUBLE_EQ(c->rope.theta, 10000.0);
}

TEST(ConfigTest, LlamaDefaults) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(kMinimalLlama);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 4);  // = num_attention_heads
  EXPECT_EQ(c->head_dim, 64);            // = hidden_size / num_attention_heads
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_DOUBLE_EQ(c->rope.theta, 10000.0);
  EXPECT_EQ(c->rope.scaling, kernels::RopeScaling::kNone);
  EXPECT_EQ(c->rope.rotary_dim, 64);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->mlp_bias);
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_EQ(c->eos_token_id, 2);
  EXPECT_EQ(c->torch_dtype, "float32");
  EXPECT_EQ(c->kv_block_size, 16);
}

TEST(ConfigTest, LlamaOptionalFields) {
  auto c = ParseEdited(kMinimalLlama, [](json& j) {
    j["attention_bias"] = true;
    j["mlp_bias"] = true;
    j["head_dim"] = 32;  // need not be hidden / heads
    j["num_key_value_heads"] = 2;
    j["eos_token_id"] = nullptr;
    j["bos_token_id"] = nullptr;
    j["cleave_kv_block_size"] = 32;
    j["torch_dtype"] = "float16";
    j["dtype"] = "bfloat16";  // transformers >= 4.56 spelling wins
  });
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->attention_bias);
  EXPECT_TRUE(c->mlp_bias);
  EXPECT_EQ(c->head_dim, 32);
  EXPECT_EQ(c->q_size(), 128);
  EXPECT_EQ(c->kv_size(), 64);
  EXPECT_EQ(c->rope.rotary_dim, 32);
  EXPECT_EQ(c->eos_token_id, -1);
  EXPECT_EQ(c->bos_token_id, -1);
  EXPECT_EQ(c->kv_block_size, 32);
  EXPECT_EQ(c->torch_dtype, "bfloat16");
}

TEST(ConfigTest, ModelTypeStandsInForArchitectures) {
  auto c = ParseEdited(kMinimalLlama, [](json& j) {
    j.erase("architectures");
    j["model_type"] = "mistral";
    j["num_key_value_heads"] = 2;  // MistralConfig's default of 8 would not divide 4 heads
  });
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kMistral);
  EXPECT_EQ(c->architecture_name, "MistralForCausalLM");
}

TEST(ConfigTest, RopeScalingVariants) {
  auto linear = ParseEdited(kMinimalLlama, [](json& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", 4}}; });
  ASSERT_TRUE(linear.ok()) << linear.status();
  EXPECT_EQ(linear->rope.scaling, kernels::RopeScaling::kLinear);
  EXPECT_DOUBLE_EQ(linear->rope.factor, 4.0);

  auto def = ParseEdited(kMinimalLlama, [](json& j) { j["rope_scaling"] = {{"rope_type", "default"}}; });
  ASSERT_TRUE(def.ok()) << def.status();
  EXPECT_EQ(def->rope.scaling, kernels::RopeScaling::kNone);

  auto null = ParseEdited(kMinimalLlama, [](json& j) { j["rope_scaling"] = nullptr; });
  ASSERT_TRUE(null.ok()) << null.status();
  EXPECT_EQ(null->rope.scaling, kernels::RopeScaling::kNone);

  // transformers 5 nests theta and scaling in rope_parameters; a missing
  // original_max_position_embeddings falls back to max_position_embeddings there.
  auto v5 = ParseEdited(kMinimalLlama, [](json& j) {
    j["max_position_embeddings"] = 4096;
    j["rope_parameters"] = {{"rope_type", "llama3"}, {"rope_theta", 500000.0}, {"factor", 8.0},
                            {"low_freq_factor", 1.0}, {"high_freq_factor", 4.0}};
  });
  ASSERT_TRUE(v5.ok()) << v5.status();
  EXPECT_EQ(v5->rope.scaling, kernels::RopeScaling::kLlama3);
  EXPECT_DOUBLE_EQ(v5->rope.theta, 500000.0);
  EXPECT_EQ(v5->rope.original_max_position, 4096);
}

TEST(ConfigTest, UnsupportedRopeTypes) {
  for (const char* type : {"dynamic", "yarn", "longrope", "su"}) {
    ExpectInvalid(ParseEdited(kMinimalLlama, [&](json& j) { j["rope_scaling"] = {{"rope_type", type}, {"factor", 2.0}}; }),
                  std::string("rope type '") + type + "' is not supported");
  }
  ExpectInvalid(ParseEdited(kLlama31_8B, [](json& j) { j["rope_scaling"].erase("factor"); }),
                "rope_scaling.factor");
  ExpectInvalid(ParseEdited(kLlama31_8B, [](json& j) { j["rope_scaling"]["high_freq_factor"] = 0.5; }),
                "high_freq_factor");
  ExpectInvalid(ParseEdited(kMinimalLlama, [](json& j) { j["rope_scaling"] = {{"type", "linear"}}; }),
                "rope_scaling.factor");
  ExpectInvalid(ParseEdited(kMinimalLlama, [](json& j) { j["rope_scaling"] = {{"type", "linear"}, {"factor", -1}}; }),
                "rope_scaling.factor");
  ExpectInvalid(ParseEdited(kMinimalLlama, [](json& j) { j["rope_scaling"] = "linear"; }), "rope_scaling");
  ExpectInvalid(ParseEdited(kMinimalLlama, [](json& j) { j["rope_theta"] = 0; }), "rope_theta");
}

TEST(ConfigTest, UnsupportedArchitecture) {
  auto c = ParseEdited(kMinimalLlama, [](json& j) { j["architectures"] = {"GPT2LMHeadModel"}; });
  ExpectInvalid(c, "unsupported architecture GPT2LMHeadModel");
  EXPECT_THAT(std::string(c.status().message()),
              HasSubstr("supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"));
  ExpectInvalid(ParseEdited(kMinimalLlama, [](json& j) { j["architectures"] = "LlamaForCausalLM"; }),
                "architectures");
  ExpectInvalid(ParseEdited(kMinimalLlama, [](json& j) { j["architectures"] = json::array(); }),
                "architectures");
  ExpectInvalid(ParseEdited(kMinimalLlama, [](json& j) { j.erase("architectures"); }), "'architectures' is missing");
  ExpectInvalid(ParseEdited(kMinimalLlama, [](json& j) { j["hidden_act"] = "gelu"; }), "hidden_act");
}

TEST(ConfigTest, MissingRequiredFields) {
  for (const char* field : {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "vocab_size"}) {
    auto c = ParseEdited(kLlama31_8B, [&](json& j) { j.erase(field); });
    ExpectInvalid(c, std::string("field '") + field + "' is missing");
  }
}

TEST(ConfigTest, BadTypesAndValues) {
  struct Case {
    const char* field;
    json value;
    const char* needle;
  };
  const Case cases[] = {
      {"hidden_size", "4096", "'hidden_size' must be an integer, got string"},
      {"hidden_size", 4096.0, "'hidden_size' must be an integer, got number"},
      {"hidden_size", nullptr, "'hidden_size' must be an integer, got null"},
      {"hidden_size", 0, "'hidden_size' must be in [1,"},
      {"hidden_size", -4096, "'hidden_size' must be in [1,"},
      {"vocab_size", json::parse("99999999999999999999"), "vocab_size"},  // parses as a float
      {"vocab_size", uint64_t{1} << 63, "'vocab_size' is too large"},
      {"num_hidden_layers", int64_t{1} << 40, "num_hidden_layers"},
      {"num_key_value_heads", 5, "multiple of 'num_key_value_heads'"},
      {"head_dim", 127, "'head_dim' must be even"},
      {"head_dim", "128", "'head_dim' must be an integer"},
      {"rms_norm_eps", "1e-5", "'rms_norm_eps' must be a number"},
      {"rms_norm_eps", 0.0, "rms_norm_eps"},
      {"rms_norm_eps", 1e-50, "out of range for a float"},
      {"rms_norm_eps", 1e50, "out of range for a float"},
      {"tie_word_embeddings", "yes", "'tie_word_embeddings' must be a boolean"},
      {"attention_bias", 1, "'attention_bias' must be a boolean"},
      {"eos_token_id", "2", "eos_token_id"},
      {"eos_token_id", json::array({1, "2"}), "eos_token_id[1]"},
      {"eos_token_id", json::array({1, -2}), "eos_token_id[1]"},
      {"bos_token_id", -5, "bos_token_id"},
      {"torch_dtype", 16, "torch_dtype"},
      {"cleave_kv_block_size", 0, "cleave_kv_block_size"},
      {"max_position_embeddings", "big", "max_position_embeddings"},
      {"rope_scaling", json::array(), "rope_scaling"},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.field);
    ExpectInvalid(ParseEdited(kLlama31_8B, [&](json& j) { j[k.field] = k.value; }), k.needle);
  }
  ExpectInvalid(ParseEdited(kMinimalLlama, [](json& j) { j["num_attention_heads"] = 3; }),
                "not a multiple of 'num_attention_heads'");
  // A product the model computes in int must not overflow.
  ExpectInvalid(ParseEdited(kMinimalLlama,
                            [](json& j) {
                              j["num_attention_heads"] = 1 << 20;
                              j["num_key_value_heads"] = 1;
                              j["head_dim"] = 1 << 20;
                            }),
                "too large");
}

TEST(ConfigTest, NotJsonOrNotAnObject) {
  ExpectInvalid(ParseModelConfig(""), "not valid JSON");
  ExpectInvalid(ParseModelConfig("{\"hidden_size\": 12"), "not valid JSON");
  ExpectInvalid(ParseModelConfig("[1, 2, 3]"), "must hold a JSON object");
  ExpectInvalid(ParseModelConfig("\"LlamaForCausalLM\""), "must hold a JSON object");
  ExpectInvalid(ParseModelConfig(std::string("{\"a\": \"\xff\xfe\"}")), "not valid JSON");
}

class LoadModelConfigTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(::testing::TempDir()) /
           ("cleave_config_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void Write(const std::string& text) { std::ofstream(dir_ / "config.json") << text; }

  std::filesystem::path dir_;
};

TEST_F(LoadModelConfigTest, ReadsFile) {
  Write(kQwen2_05B);
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir_);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->architecture, Architecture::kQwen2);
}

TEST_F(LoadModelConfigTest, MissingFileIsNotFound) {
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir_ / "nope");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("config.json"));
}

TEST_F(LoadModelConfigTest, ErrorsNameThePath) {
  Write(R"({"architectures": ["LlamaForCausalLM"]})");
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir_);
  ExpectInvalid(c, (dir_ / "config.json").string());
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("'hidden_size' is missing"));
}

}  // namespace
}  // namespace cleave::model
