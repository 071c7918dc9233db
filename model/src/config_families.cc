// The parts of config.json that differ per model family beyond attention: which layers are MoE
// (Mixtral, Qwen2-MoE, Jamba), which are Mamba (Jamba), and Mamba's own config (MambaForCausalLM).
// Defaults are transformers' config-class defaults, so a config that leaves a field out means
// what it means there.
#include <algorithm>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "config_fields.h"

namespace cleave::model::internal {
namespace {

// transformers spells "ceil(hidden / 16)" as the string "auto" (Mamba's time_step_rank).
absl::StatusOr<int> RankOrAuto(const Fields& f, const char* key, int fallback, int hidden) {
  if (f.Has(key) && f.at(key).is_string()) {
    if (f.at(key).get<std::string>() != "auto") return f.WrongType(key, "an integer or \"auto\"");
    return (hidden + 15) / 16;
  }
  return f.OptionalInt(key, fallback, 1);
}

absl::Status ParseMoe(const Fields& f, const char* experts_key, int default_experts,
                      int default_top_k, MoeConfig& moe) {
  CLEAVE_ASSIGN_OR_RETURN(moe.num_experts, f.OptionalInt(experts_key, default_experts, 1));
  CLEAVE_ASSIGN_OR_RETURN(moe.top_k, f.OptionalInt("num_experts_per_tok", default_top_k, 1));
  if (moe.top_k > moe.num_experts) {
    return absl::InvalidArgumentError(absl::StrCat("field 'num_experts_per_tok' (", moe.top_k,
                                                   ") exceeds the number of experts (",
                                                   moe.num_experts, ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int>> LayerList(const Fields& f, const char* key, int num_layers) {
  std::vector<int> out;
  if (!f.Has(key)) return out;
  const json& list = f.at(key);
  if (!list.is_array()) return f.WrongType(key, "a list of layer indices");
  for (size_t i = 0; i < list.size(); ++i) {
    CLEAVE_ASSIGN_OR_RETURN(int l, CheckIntValue(list[i], absl::StrCat(f.Name(key), "[", i, "]"), 0));
    if (l >= num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("field '", f.Name(key), "' names layer ", l,
                                                     " of a ", num_layers, "-layer model"));
    }
    out.push_back(l);
  }
  return out;
}

absl::Status ParsePeriod(const Fields& f, const char* period_key, int default_period,
                         const char* offset_key, int default_offset, int& period, int& offset) {
  CLEAVE_ASSIGN_OR_RETURN(period, f.OptionalInt(period_key, default_period, 1));
  CLEAVE_ASSIGN_OR_RETURN(offset, f.OptionalInt(offset_key, default_offset, 0));
  if (offset >= period) {
    return absl::InvalidArgumentError(absl::StrCat("field '", f.Name(offset_key), "' (", offset,
                                                   ") must be less than '", f.Name(period_key),
                                                   "' (", period, ")"));
  }
  return absl::OkStatus();
}

absl::Status ParseMambaMixer(const Fields& f, ModelConfig& c, const char* state_key,
                             const char* conv_key, const char* expand_key, const char* rank_key,
                             const char* conv_bias_key, const char* proj_bias_key) {
  MambaConfig& m = c.mamba;
  CLEAVE_ASSIGN_OR_RETURN(m.d_state, f.OptionalInt(state_key, 16, 1));
  CLEAVE_ASSIGN_OR_RETURN(m.d_conv, f.OptionalInt(conv_key, 4, 1));
  CLEAVE_ASSIGN_OR_RETURN(const int expand, f.OptionalInt(expand_key, 2, 1));
  if (static_cast<int64_t>(expand) * c.hidden_size > kIntMax / 2) {
    return absl::InvalidArgumentError(absl::StrCat("field '", f.Name(expand_key), "' is too large"));
  }
  m.d_inner = expand * c.hidden_size;
  CLEAVE_ASSIGN_OR_RETURN(m.dt_rank, RankOrAuto(f, rank_key, (c.hidden_size + 15) / 16, c.hidden_size));
  CLEAVE_ASSIGN_OR_RETURN(m.conv_bias, f.OptionalBool(conv_bias_key, true));
  CLEAVE_ASSIGN_OR_RETURN(m.proj_bias, f.OptionalBool(proj_bias_key, false));
  return absl::OkStatus();
}

}  // namespace

absl::Status ParseLayerKinds(const Fields& f, ModelConfig& c) {
  const int n = c.num_hidden_layers;
  c.layer_mixer.assign(n, MixerKind::kAttention);
  c.layer_ffn.assign(n, FfnKind::kDense);
  switch (c.architecture) {
    case Architecture::kLlama:
    case Architecture::kMistral:
    case Architecture::kQwen2:
      return absl::OkStatus();
    case Architecture::kMixtral: {
      CLEAVE_RETURN_IF_ERROR(ParseMoe(f, "num_local_experts", 8, 2, c.moe));
      c.moe.expert_intermediate_size = c.intermediate_size;
      c.moe.renormalize = true;  // MixtralTopKRouter always divides by the top-k sum
      c.layer_ffn.assign(n, FfnKind::kMoe);
      return absl::OkStatus();
    }
    case Architecture::kQwen2Moe: {
      CLEAVE_RETURN_IF_ERROR(ParseMoe(f, "num_experts", 60, 4, c.moe));
      CLEAVE_ASSIGN_OR_RETURN(c.moe.expert_intermediate_size, f.OptionalInt("moe_intermediate_size", 1408, 1));
      CLEAVE_ASSIGN_OR_RETURN(c.moe.shared_expert_intermediate_size,
                              f.OptionalInt("shared_expert_intermediate_size", 5632, 0));
      CLEAVE_ASSIGN_OR_RETURN(c.moe.renormalize, f.OptionalBool("norm_topk_prob", false));
      CLEAVE_ASSIGN_OR_RETURN(const int step, f.OptionalInt("decoder_sparse_step", 1, 1));
      CLEAVE_ASSIGN_OR_RETURN(const std::vector<int> dense_layers, LayerList(f, "mlp_only_layers", n));
      // Qwen2MoeDecoderLayer: sparse iff not listed in mlp_only_layers and (l + 1) % step == 0.
      for (int l = 0; l < n; ++l) {
        const bool listed = std::find(dense_layers.begin(), dense_layers.end(), l) != dense_layers.end();
        if (!listed && (l + 1) % step == 0) c.layer_ffn[l] = FfnKind::kMoe;
      }
      return absl::OkStatus();
    }
    case Architecture::kJamba: {
      c.use_rope = false;  // JambaAttention applies no positional encoding
      int attn_period, attn_offset, expert_period, expert_offset;
      CLEAVE_RETURN_IF_ERROR(ParsePeriod(f, "attn_layer_period", 8, "attn_layer_offset", 4,
                                         attn_period, attn_offset));
      CLEAVE_RETURN_IF_ERROR(ParsePeriod(f, "expert_layer_period", 2, "expert_layer_offset", 1,
                                         expert_period, expert_offset));
      CLEAVE_RETURN_IF_ERROR(ParseMoe(f, "num_experts", 16, 2, c.moe));
      c.moe.expert_intermediate_size = c.intermediate_size;
      c.moe.renormalize = false;  // JambaTopKRouter keeps the softmax probabilities
      CLEAVE_RETURN_IF_ERROR(ParseMambaMixer(f, c, "mamba_d_state", "mamba_d_conv", "mamba_expand",
                                             "mamba_dt_rank", "mamba_conv_bias", "mamba_proj_bias"));
      c.mamba.bcdt_norms = true;
      for (int l = 0; l < n; ++l) {
        c.layer_mixer[l] = l % attn_period == attn_offset ? MixerKind::kAttention : MixerKind::kMamba;
        // A layer with one "expert" is a plain MLP in transformers too.
        if (c.moe.num_experts > 1 && l % expert_period == expert_offset) c.layer_ffn[l] = FfnKind::kMoe;
      }
      return absl::OkStatus();
    }
    case Architecture::kMamba:
      break;
  }
  return absl::InternalError("ParseLayerKinds called for a Mamba config");
}

absl::Status ParseMambaModel(const Fields& f, ModelConfig& c) {
  CLEAVE_ASSIGN_OR_RETURN(c.hidden_size, f.RequiredInt("hidden_size", 1));
  CLEAVE_ASSIGN_OR_RETURN(c.num_hidden_layers, f.RequiredInt("num_hidden_layers", 1));
  CLEAVE_ASSIGN_OR_RETURN(c.vocab_size, f.RequiredInt("vocab_size", 1));
  // Mamba has no positional limit; cleave bounds a request's context by this (override it with
  // max_position_embeddings in config.json).
  CLEAVE_ASSIGN_OR_RETURN(c.max_position_embeddings, f.OptionalInt("max_position_embeddings", 65536, 1));
  CLEAVE_ASSIGN_OR_RETURN(const double eps, f.OptionalNumber("layer_norm_epsilon", 1e-5));
  c.rms_norm_eps = static_cast<float>(eps);
  CLEAVE_ASSIGN_OR_RETURN(c.tie_word_embeddings, f.OptionalBool("tie_word_embeddings", true));
  CLEAVE_RETURN_IF_ERROR(ParseMambaMixer(f, c, "state_size", "conv_kernel", "expand",
                                         "time_step_rank", "use_conv_bias", "use_bias"));
  c.intermediate_size = c.mamba.d_inner;  // as MambaConfig sets it
  c.use_rope = false;
  c.layer_mixer.assign(c.num_hidden_layers, MixerKind::kMamba);
  c.layer_ffn.assign(c.num_hidden_layers, FfnKind::kNone);
  return absl::OkStatus();
}

}  // namespace cleave::model::internal
