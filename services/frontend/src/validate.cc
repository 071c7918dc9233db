// The one validator behind both public APIs. Bounds follow OpenAI's and vLLM's, and the messages
// follow OpenAI's wording, naming the field and the value received.
#include <cmath>
#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "cleave/frontend/generation_params.h"

namespace cleave::frontend {
namespace {

constexpr char kParamPayload[] = "cleave.frontend/param";
constexpr int kMaxN = 128;
constexpr int kMaxTopLogprobs = 20;
constexpr int kMaxCompletionsLogprobs = 5;
constexpr int kMaxStops = 4;
// Matching holds back up to a stop string's length and rescans it per token: keep that small.
constexpr size_t kMaxStopBytes = 1024;
constexpr int kDefaultCompletionTokens = 16;  // OpenAI completions' default max_tokens

// %g-like rendering without trailing zeros, so "got 2.5" rather than "got 2.500000".
std::string Num(double v) {
  if (std::isnan(v)) return "nan";
  return absl::StrCat(v);
}

// Written so that NaN fails every check (comparisons with NaN are false).
absl::Status CheckRange(std::string_view field, double v, double lo, bool lo_open, double hi) {
  bool ok = (lo_open ? v > lo : v >= lo) && v <= hi;
  if (ok) return absl::OkStatus();
  return InvalidParam(field, absl::StrCat(std::string(field), " must be ", lo_open ? "greater than " : "between ",
                                          Num(lo), lo_open ? " and at most " : " and ", Num(hi),
                                          ", got ", Num(v)));
}

absl::Status CheckTokenIds(std::string_view field, const std::vector<int32_t>& ids, int vocab) {
  for (size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= vocab) {
      return InvalidParam(field, absl::StrCat(std::string(field), "[", i, "] must be a token id in [0, ", vocab,
                                              "), got ", ids[i]));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateInput(const GenerationParams& p, const ModelInfo& model) {
  if (p.api == ApiKind::kChat) {
    if (p.prompt.has_value() || p.prompt_token_ids.has_value()) {
      return InvalidParam("prompt", "chat requests take messages, not a prompt");
    }
    if (p.messages.empty()) {
      return InvalidParam("messages", "messages must contain at least one message");
    }
    absl::Status s = ValidateChatMessages(p.messages);
    return s.ok() ? s : InvalidParam("messages", std::string(s.message()));
  }
  if (!p.messages.empty()) return InvalidParam("messages", "messages are only for chat requests");
  if (p.prompt.has_value() == p.prompt_token_ids.has_value()) {
    return InvalidParam("prompt", "exactly one of prompt and prompt_token_ids must be given");
  }
  if (p.prompt.has_value() && p.prompt->empty()) {
    return InvalidParam("prompt", "prompt must not be empty");
  }
  if (p.prompt_token_ids.has_value()) {
    if (p.prompt_token_ids->empty()) return InvalidParam("prompt", "prompt must not be empty");
    return CheckTokenIds("prompt", *p.prompt_token_ids, model.vocab_size);
  }
  return absl::OkStatus();
}

absl::Status ValidateSampling(const GenerationParams& p) {
  if (absl::Status s = CheckRange("temperature", p.temperature, 0, false, 2); !s.ok()) return s;
  if (absl::Status s = CheckRange("top_p", p.top_p, 0, true, 1); !s.ok()) return s;
  if (p.top_k < -1) {
    return InvalidParam("top_k", absl::StrCat("top_k must be -1 (disabled), 0 (disabled) or at "
                                              "least 1, got ", p.top_k));
  }
  if (p.top_k > std::numeric_limits<int32_t>::max()) {
    return InvalidParam("top_k", absl::StrCat("top_k is too large, got ", p.top_k));
  }
  if (absl::Status s = CheckRange("min_p", p.min_p, 0, false, 1); !s.ok()) return s;
  if (absl::Status s = CheckRange("repetition_penalty", p.repetition_penalty, 0, true, 2); !s.ok()) {
    return s;
  }
  if (absl::Status s = CheckRange("presence_penalty", p.presence_penalty, -2, false, 2); !s.ok()) {
    return s;
  }
  return CheckRange("frequency_penalty", p.frequency_penalty, -2, false, 2);
}

absl::Status ValidateLogprobs(const GenerationParams& p) {
  const char* field = TopLogprobsFieldName(p.api);
  const int64_t max = p.api == ApiKind::kCompletions ? kMaxCompletionsLogprobs : kMaxTopLogprobs;
  if (p.top_logprobs < 0 || p.top_logprobs > max) {
    return InvalidParam(field, absl::StrCat(std::string(field), " must be between 0 and ", max, ", got ",
                                            p.top_logprobs));
  }
  if (p.top_logprobs > 0 && !p.logprobs) {
    return InvalidParam("top_logprobs", "top_logprobs requires logprobs to be true");
  }
  return absl::OkStatus();
}

absl::Status ValidateStops(const GenerationParams& p, const ModelInfo& model) {
  if (p.stop.size() > kMaxStops) {
    return InvalidParam("stop", absl::StrCat("stop must contain at most ", kMaxStops,
                                             " strings, got ", p.stop.size()));
  }
  for (size_t i = 0; i < p.stop.size(); ++i) {
    if (p.stop[i].empty()) return InvalidParam("stop", absl::StrCat("stop[", i, "] must not be empty"));
    if (p.stop[i].size() > kMaxStopBytes) {
      return InvalidParam("stop", absl::StrCat("stop[", i, "] must be at most ", kMaxStopBytes,
                                               " bytes, got ", p.stop[i].size()));
    }
  }
  return CheckTokenIds("stop_token_ids", p.stop_token_ids, model.vocab_size);
}

}  // namespace

absl::Status InvalidParam(std::string_view field, std::string_view message) {
  absl::Status s = absl::InvalidArgumentError(absl::string_view(message.data(), message.size()));
  s.SetPayload(kParamPayload, absl::Cord(std::string(field)));
  return s;
}

std::string ErrorParam(const absl::Status& status) {
  auto p = status.GetPayload(kParamPayload);
  return p.has_value() ? std::string(*p) : std::string();
}

absl::Status CheckModelName(std::string_view requested, const ModelInfo& model) {
  if (requested.empty() || requested == model.id) return absl::OkStatus();
  absl::Status s = absl::NotFoundError(
      absl::StrCat("The model `", std::string(requested), "` does not exist."));
  s.SetPayload(kParamPayload, absl::Cord("model"));
  return s;
}

const char* TopLogprobsFieldName(ApiKind api) {
  return api == ApiKind::kCompletions ? "logprobs" : "top_logprobs";
}

absl::Status ValidateGenerationParams(const GenerationParams& p, const ModelInfo& model) {
  if (absl::Status s = CheckModelName(p.model, model); !s.ok()) return s;
  if (absl::Status s = ValidateInput(p, model); !s.ok()) return s;
  if (p.max_tokens.has_value() && *p.max_tokens < 1) {
    return InvalidParam(p.max_tokens_field, absl::StrCat(p.max_tokens_field,
                                                         " must be at least 1, got ", *p.max_tokens));
  }
  if (p.n < 1 || p.n > kMaxN) {
    return InvalidParam("n", absl::StrCat("n must be between 1 and ", kMaxN, ", got ", p.n));
  }
  if (absl::Status s = ValidateSampling(p); !s.ok()) return s;
  if (absl::Status s = ValidateLogprobs(p); !s.ok()) return s;
  if (absl::Status s = ValidateStops(p, model); !s.ok()) return s;
  if (p.priority < std::numeric_limits<int32_t>::min() ||
      p.priority > std::numeric_limits<int32_t>::max()) {
    return InvalidParam("priority", absl::StrCat("priority must fit in 32 bits, got ", p.priority));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> ValidatePromptFits(int num_prompt_tokens, const GenerationParams& p,
                                       const ModelInfo& model) {
  const bool chat = p.api == ApiKind::kChat;
  const int64_t limit = model.max_model_len;
  if (p.max_tokens.has_value()) {
    const int64_t total = *p.max_tokens > std::numeric_limits<int64_t>::max() - num_prompt_tokens
                              ? std::numeric_limits<int64_t>::max()
                              : num_prompt_tokens + *p.max_tokens;
    if (total <= limit) return static_cast<int>(*p.max_tokens);
    if (chat) {
      return InvalidParam("messages", absl::StrCat(
          "This model's maximum context length is ", limit, " tokens. However, you requested ",
          total, " tokens (", num_prompt_tokens, " in the messages, ", *p.max_tokens,
          " in the completion). Please reduce the length of the messages or completion."));
    }
    return InvalidParam("prompt", absl::StrCat(
        "This model's maximum context length is ", limit, " tokens, however you requested ", total,
        " tokens (", num_prompt_tokens, " in your prompt; ", *p.max_tokens,
        " for the completion). Please reduce your prompt; or completion length."));
  }
  if (num_prompt_tokens >= limit) {
    const char* what = chat ? "messages" : "prompt";
    return InvalidParam(what, absl::StrCat(
        "This model's maximum context length is ", limit, " tokens. However, your ", what,
        " resulted in ", num_prompt_tokens, " tokens. Please reduce the length of the ", what,
        "."));
  }
  const int64_t room = limit - num_prompt_tokens;
  return static_cast<int>(chat ? room : std::min<int64_t>(room, kDefaultCompletionTokens));
}

}  // namespace cleave::frontend
