#include "cleave/model/config.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cleave/common/status.h"
#include "config_fields.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

using internal::CheckIntValue;
using internal::Fields;
using internal::kIntMax;
using json = nlohmann::json;

// config.json is a few KB; anything this large is not a config and is refused before parsing.
constexpr uintmax_t kMaxConfigBytes = 16u << 20;

// What transformers' config classes fill in when config.json leaves a field out. Only fields
// that differ between the three families are here; sizes have no default (a config without
// hidden_size describes no real checkpoint, so cleave refuses it instead of guessing 4096).
struct ArchSpec {
  Architecture architecture;
  const char* class_name;  // "LlamaForCausalLM"
  const char* model_type;  // "llama"
  // num_key_value_heads when the key is absent; 0 means num_attention_heads. (An explicit null
  // always means num_attention_heads.) Mistral and Qwen2 have literal class defaults (8, 32).
  int default_kv_heads;
  int default_max_positions;
  int default_bos;  // -1 = None
  int default_eos;
  double default_rope_theta;
};

constexpr ArchSpec kArchs[] = {
    {Architecture::kLlama, "LlamaForCausalLM", "llama", 0, 2048, 1, 2, 1e4},
    {Architecture::kMistral, "MistralForCausalLM", "mistral", 8, 4096 * 32, 1, 2, 1e4},
    {Architecture::kQwen2, "Qwen2ForCausalLM", "qwen2", 32, 32768, -1, -1, 1e4},
    {Architecture::kMixtral, "MixtralForCausalLM", "mixtral", 8, 4096 * 32, 1, 2, 1e6},
    {Architecture::kQwen2Moe, "Qwen2MoeForCausalLM", "qwen2_moe", 16, 32768, -1, -1, 1e4},
    {Architecture::kJamba, "JambaForCausalLM", "jamba", 8, 262144, 1, 2, 1e4},
    // Mamba has no attention: its shape is parsed by ParseMambaShape, not ParseShape.
    {Architecture::kMamba, "MambaForCausalLM", "mamba", 0, 0, 0, 0, 1e4},
};

std::string SupportedArchitectures() {
  std::string out;
  for (const ArchSpec& a : kArchs) absl::StrAppend(&out, out.empty() ? "" : ", ", a.class_name);
  return out;
}

absl::StatusOr<const ArchSpec*> ResolveArchitecture(const Fields& f, std::string& name) {
  if (f.Has("architectures")) {
    const json& list = f.at("architectures");
    if (!list.is_array() || list.empty() || !list[0].is_string()) {
      return absl::InvalidArgumentError(
          "field 'architectures' must be a non-empty list of strings, e.g. [\"LlamaForCausalLM\"]");
    }
    name = list[0].get<std::string>();
    for (const ArchSpec& a : kArchs) {
      if (name == a.class_name) return &a;
    }
    return absl::InvalidArgumentError(absl::StrCat("unsupported architecture ", name,
                                                   " (supported: ", SupportedArchitectures(), ")"));
  }
  // Some hand-written or older configs carry only model_type; transformers' AutoConfig maps it.
  CLEAVE_ASSIGN_OR_RETURN(std::optional<std::string> model_type, f.OptionalString("model_type"));
  if (!model_type) return f.Missing("architectures");
  for (const ArchSpec& a : kArchs) {
    if (*model_type == a.model_type) {
      name = a.class_name;
      return &a;
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("unsupported architecture (model_type ", *model_type,
                                                 ") (supported: ", SupportedArchitectures(), ")"));
}

// Sizes, heads and head_dim, with the consistency the forward pass relies on.
absl::Status ParseShape(const Fields& f, const ArchSpec& arch, ModelConfig& c) {
  CLEAVE_ASSIGN_OR_RETURN(c.hidden_size, f.RequiredInt("hidden_size", 1));
  CLEAVE_ASSIGN_OR_RETURN(c.intermediate_size, f.RequiredInt("intermediate_size", 1));
  CLEAVE_ASSIGN_OR_RETURN(c.num_hidden_layers, f.RequiredInt("num_hidden_layers", 1));
  CLEAVE_ASSIGN_OR_RETURN(c.num_attention_heads, f.RequiredInt("num_attention_heads", 1));
  CLEAVE_ASSIGN_OR_RETURN(c.vocab_size, f.RequiredInt("vocab_size", 1));
  CLEAVE_ASSIGN_OR_RETURN(c.max_position_embeddings,
                          f.OptionalInt("max_position_embeddings", arch.default_max_positions, 1));

  if (!f.Present("num_key_value_heads") && arch.default_kv_heads > 0) {
    c.num_key_value_heads = arch.default_kv_heads;
  } else {
    CLEAVE_ASSIGN_OR_RETURN(c.num_key_value_heads,
                            f.OptionalInt("num_key_value_heads", c.num_attention_heads, 1));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "field 'num_attention_heads' (", c.num_attention_heads,
        ") must be a multiple of 'num_key_value_heads' (", c.num_key_value_heads, ")"));
  }

  if (f.Has("head_dim")) {
    CLEAVE_ASSIGN_OR_RETURN(c.head_dim, f.CheckInt("head_dim", 1));
  } else {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "field 'hidden_size' (", c.hidden_size, ") is not a multiple of 'num_attention_heads' (",
          c.num_attention_heads, ") and no 'head_dim' is given"));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("field 'head_dim' must be even for rotary embeddings, got ", c.head_dim));
  }
  // q_size() and kv_size() are ints; keep every product the model computes in range.
  if (static_cast<int64_t>(c.num_attention_heads) * c.head_dim > kIntMax) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_attention_heads * head_dim (", c.num_attention_heads, " * ", c.head_dim,
                     ") is too large"));
  }
  return absl::OkStatus();
}

absl::Status ParseRope(const Fields& f, const ArchSpec& arch, ModelConfig& c) {
  // transformers <= 4.x writes `rope_theta` + `rope_scaling`; 5.x writes `rope_parameters`
  // holding both. rope_scaling wins when both are present, as in transformers.
  CLEAVE_ASSIGN_OR_RETURN(std::optional<const json*> scaling, f.OptionalObject("rope_scaling"));
  std::string prefix = "rope_scaling.";
  if (!scaling || (*scaling)->empty()) {
    CLEAVE_ASSIGN_OR_RETURN(scaling, f.OptionalObject("rope_parameters"));
    prefix = "rope_parameters.";
  }
  const json empty = json::object();
  const Fields r(scaling ? **scaling : empty, prefix);

  CLEAVE_ASSIGN_OR_RETURN(const double top_theta, f.OptionalNumber("rope_theta", arch.default_rope_theta));
  CLEAVE_ASSIGN_OR_RETURN(c.rope.theta, r.OptionalNumber("rope_theta", top_theta));
  c.rope.rotary_dim = c.head_dim;
  c.rope.style = kernels::RopeStyle::kHalves;

  // "type" is the pre-4.45 spelling of "rope_type".
  CLEAVE_ASSIGN_OR_RETURN(std::optional<std::string> type, r.OptionalString("rope_type"));
  if (!type) {
    CLEAVE_ASSIGN_OR_RETURN(type, r.OptionalString("type"));
  }
  const std::string rope_type = type.value_or("default");

  if (rope_type == "default") {
    c.rope.scaling = kernels::RopeScaling::kNone;
  } else if (rope_type == "linear") {
    c.rope.scaling = kernels::RopeScaling::kLinear;
    CLEAVE_ASSIGN_OR_RETURN(c.rope.factor, r.RequiredNumber("factor"));
  } else if (rope_type == "llama3") {
    c.rope.scaling = kernels::RopeScaling::kLlama3;
    CLEAVE_ASSIGN_OR_RETURN(c.rope.factor, r.RequiredNumber("factor"));
    CLEAVE_ASSIGN_OR_RETURN(c.rope.low_freq_factor, r.RequiredNumber("low_freq_factor"));
    CLEAVE_ASSIGN_OR_RETURN(c.rope.high_freq_factor, r.RequiredNumber("high_freq_factor"));
    // The smoothing step divides by (high - low).
    if (c.rope.high_freq_factor <= c.rope.low_freq_factor) {
      return absl::InvalidArgumentError(absl::StrCat(
          "field '", r.Name("high_freq_factor"), "' (", c.rope.high_freq_factor,
          ") must be greater than '", r.Name("low_freq_factor"), "' (", c.rope.low_freq_factor, ")"));
    }
    // transformers 5 fills a missing original_max_position_embeddings from the model's own.
    CLEAVE_ASSIGN_OR_RETURN(
        c.rope.original_max_position,
        r.OptionalInt("original_max_position_embeddings", c.max_position_embeddings, 1));
  } else {
    return absl::InvalidArgumentError(absl::StrCat("field '", r.Name("rope_type"), "': rope type '",
                                                   rope_type,
                                                   "' is not supported (supported: default, linear, llama3)"));
  }
  return absl::OkStatus();
}

// Qwen2 slides only on layers >= max_window_layers, and only with use_sliding_window; cleave
// has one window for the whole model, so a mix of sliding and full layers is refused.
absl::StatusOr<int> Qwen2SlidingWindow(const Fields& f, int num_layers) {
  CLEAVE_ASSIGN_OR_RETURN(const bool use, f.OptionalBool("use_sliding_window", false));
  if (!use) return 0;
  int window = 4096;
  if (f.Present("sliding_window")) {
    if (f.at("sliding_window").is_null()) return 0;
    CLEAVE_ASSIGN_OR_RETURN(window, f.CheckInt("sliding_window", 1));
  }
  int sliding_layers = 0;
  if (f.Has("layer_types")) {
    const json& types = f.at("layer_types");
    if (!types.is_array() || static_cast<int64_t>(types.size()) != num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("field 'layer_types' must be a list of ", num_layers, " strings"));
    }
    for (const json& t : types) {
      if (t == "sliding_attention") {
        ++sliding_layers;
      } else if (t != "full_attention") {
        // Named by type, not dumped: dump() recurses and the value may be nested arbitrarily.
        return absl::InvalidArgumentError(absl::StrCat(
            "field 'layer_types' holds ", t.is_string() ? t.get<std::string>() : t.type_name(),
            " (supported: full_attention, sliding_attention)"));
      }
    }
  } else {
    CLEAVE_ASSIGN_OR_RETURN(const int max_window_layers, f.OptionalInt("max_window_layers", 28, 0));
    sliding_layers = std::max(0, num_layers - max_window_layers);
  }
  if (sliding_layers == 0) return 0;
  if (sliding_layers == num_layers) return window;
  return absl::InvalidArgumentError(absl::StrCat(
      "use_sliding_window with ", sliding_layers, " of ", num_layers,
      " layers sliding (max_window_layers / layer_types) is not supported: cleave applies one "
      "attention window to every layer"));
}

absl::Status ParseAttentionVariant(const Fields& f, const ArchSpec& arch, ModelConfig& c) {
  switch (arch.architecture) {
    case Architecture::kLlama: {
      CLEAVE_ASSIGN_OR_RETURN(c.attention_bias, f.OptionalBool("attention_bias", false));
      CLEAVE_ASSIGN_OR_RETURN(c.mlp_bias, f.OptionalBool("mlp_bias", false));
      c.sliding_window = 0;
      break;
    }
    case Architecture::kMistral: {
      // MistralConfig: an absent key means its class default 4096, an explicit null means none.
      if (!f.Present("sliding_window")) {
        c.sliding_window = 4096;
      } else {
        CLEAVE_ASSIGN_OR_RETURN(c.sliding_window, f.OptionalInt("sliding_window", 0, 0));
      }
      break;
    }
    case Architecture::kQwen2: {
      c.attention_bias = true;  // Qwen2Attention hard-codes bias=True on q/k/v, whatever the config
      CLEAVE_ASSIGN_OR_RETURN(c.sliding_window, Qwen2SlidingWindow(f, c.num_hidden_layers));
      break;
    }
    case Architecture::kQwen2Moe: {
      CLEAVE_ASSIGN_OR_RETURN(c.attention_bias, f.OptionalBool("qkv_bias", true));
      CLEAVE_ASSIGN_OR_RETURN(c.sliding_window, Qwen2SlidingWindow(f, c.num_hidden_layers));
      break;
    }
    case Architecture::kMixtral: {
      // MixtralConfig defaults sliding_window to None (unlike Mistral's 4096).
      CLEAVE_ASSIGN_OR_RETURN(c.sliding_window, f.OptionalInt("sliding_window", 0, 0));
      break;
    }
    case Architecture::kJamba:
    case Architecture::kMamba:
      c.sliding_window = 0;
      break;
  }
  return absl::OkStatus();
}

absl::Status ParseTokens(const Fields& f, const ArchSpec& arch, ModelConfig& c) {
  if (!f.Present("bos_token_id")) {
    c.bos_token_id = arch.default_bos;
  } else {
    CLEAVE_ASSIGN_OR_RETURN(c.bos_token_id, f.OptionalInt("bos_token_id", -1, 0));
  }
  c.eos_token_ids.clear();
  if (!f.Present("eos_token_id")) {
    if (arch.default_eos >= 0) c.eos_token_ids.push_back(arch.default_eos);
  } else if (f.Has("eos_token_id")) {
    const json& eos = f.at("eos_token_id");
    if (eos.is_array()) {
      // Llama 3.1 lists <|end_of_text|>, <|eom_id|>, <|eot_id|>: any of them ends generation.
      for (size_t i = 0; i < eos.size(); ++i) {
        CLEAVE_ASSIGN_OR_RETURN(int id, CheckIntValue(eos[i], absl::StrCat("eos_token_id[", i, "]"), 0));
        c.eos_token_ids.push_back(id);
      }
    } else if (eos.is_number_integer()) {
      CLEAVE_ASSIGN_OR_RETURN(int id, f.CheckInt("eos_token_id", 0));
      c.eos_token_ids.push_back(id);
    } else {
      return f.WrongType("eos_token_id", "an integer or a list of integers");
    }
  }
  c.eos_token_id = c.eos_token_ids.empty() ? -1 : c.eos_token_ids.front();
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> ParseRoot(const json& root) {
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json must hold a JSON object, got ", root.type_name()));
  }
  const Fields f(root, "");
  ModelConfig c;
  CLEAVE_ASSIGN_OR_RETURN(const ArchSpec* arch, ResolveArchitecture(f, c.architecture_name));
  c.architecture = arch->architecture;

  CLEAVE_ASSIGN_OR_RETURN(std::optional<std::string> act, f.OptionalString("hidden_act"));
  if (act && *act != "silu") {
    return absl::InvalidArgumentError(
        absl::StrCat("field 'hidden_act': activation '", *act, "' is not supported (supported: silu)"));
  }
  if (arch->architecture == Architecture::kMamba) {
    // No attention, no RoPE: its own field names (state_size, layer_norm_epsilon, ...).
    CLEAVE_RETURN_IF_ERROR(internal::ParseMambaModel(f, c));
  } else {
    CLEAVE_RETURN_IF_ERROR(ParseShape(f, *arch, c));
    CLEAVE_ASSIGN_OR_RETURN(const double eps, f.OptionalNumber("rms_norm_eps", 1e-6));
    c.rms_norm_eps = static_cast<float>(eps);
    CLEAVE_RETURN_IF_ERROR(ParseRope(f, *arch, c));
    CLEAVE_ASSIGN_OR_RETURN(c.tie_word_embeddings, f.OptionalBool("tie_word_embeddings", false));
    CLEAVE_RETURN_IF_ERROR(ParseAttentionVariant(f, *arch, c));
    CLEAVE_RETURN_IF_ERROR(internal::ParseLayerKinds(f, c));
  }
  // The norm kernels take eps as float: 1e-50 would silently become 0 (and 1e50 infinity).
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps)) {
    return absl::InvalidArgumentError(
        absl::StrCat("field 'rms_norm_eps' (", c.rms_norm_eps, ") is out of range for a float"));
  }
  CLEAVE_RETURN_IF_ERROR(ParseTokens(f, *arch, c));

  // transformers >= 4.56 writes "dtype"; older configs "torch_dtype". "dtype" wins, as there.
  CLEAVE_ASSIGN_OR_RETURN(std::optional<std::string> dtype, f.OptionalString("dtype"));
  if (!dtype) {
    CLEAVE_ASSIGN_OR_RETURN(dtype, f.OptionalString("torch_dtype"));
  }
  if (dtype) c.torch_dtype = *dtype;

  CLEAVE_ASSIGN_OR_RETURN(c.kv_block_size, f.OptionalInt("cleave_kv_block_size", c.kv_block_size, 1));
  return c;
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text) {
  // Config text is user input: no nlohmann exception may escape, whatever the bytes.
  try {
    const json root = json::parse(json_text);
    return ParseRoot(root);
  } catch (const json::parse_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("config.json is not valid JSON: ", e.what()));
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("config.json is malformed: ", e.what()));
  }
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "config.json";
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat("no config.json at ", path.string()));
  }
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot stat ", path.string(), ": ", ec.message()));
  if (size > kMaxConfigBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path.string(), " is ", size, " bytes; a config.json is at most ", kMaxConfigBytes));
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) return absl::UnavailableError(absl::StrCat("cannot read ", path.string()));
  absl::StatusOr<ModelConfig> config = ParseModelConfig(text.str());
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path.string(), ": ", std::string(config.status().message())));
  }
  return config;
}

}  // namespace cleave::model
