// GenerationParams: the one internal form of a generation request, whichever API it came in on
// (OpenAI completions / chat over HTTP, or gRPC Generate), and the one validator for it. Each API
// parses its wire format into this struct and calls ValidateGenerationParams, so every bound and
// every error message is the same everywhere.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "cleave/frontend/chat_template.h"
#include "cleave/frontend/frontend_context.h"

namespace cleave::frontend {

// Which API a request came in on: decides defaults and how fields are named in error messages.
enum class ApiKind {
  kCompletions,  // POST /v1/completions: logprobs is an int 0..5 (top_logprobs holds it)
  kChat,         // POST /v1/chat/completions: logprobs bool + top_logprobs 0..20
  kGrpc,         // cleave.v1.Generation/Generate
};

struct GenerationParams {
  ApiKind api = ApiKind::kCompletions;
  std::string model;  // "" = the served model; anything else must equal ModelInfo::id

  // Input: exactly one of prompt, prompt_token_ids, messages (chat).
  std::optional<std::string> prompt;
  std::optional<std::vector<int32_t>> prompt_token_ids;
  std::vector<ChatMessage> messages;      // api == kChat
  bool add_generation_prompt = true;      // chat
  bool add_special_tokens = true;         // text prompts: add BOS (chat: the template decides)

  // nullopt = the API default: 16 for completions/gRPC (as OpenAI), the rest of the context for
  // chat. Either way clamped to what fits in max_model_len only when defaulted; an explicit value
  // that does not fit is an error.
  std::optional<int64_t> max_tokens;
  std::string max_tokens_field = "max_tokens";  // chat clients may send max_completion_tokens
  int64_t n = 1;                          // [1, 128] choices

  // Sampling. Defaults are "off" (plain sampling at temperature 1).
  double temperature = 1.0;               // [0, 2]; 0 = greedy
  double top_p = 1.0;                     // (0, 1]
  int64_t top_k = -1;                     // -1 or 0 = off, else >= 1
  double min_p = 0.0;                     // [0, 1]
  double repetition_penalty = 1.0;        // (0, 2]
  double presence_penalty = 0.0;          // [-2, 2]
  double frequency_penalty = 0.0;         // [-2, 2]
  std::optional<uint64_t> seed;           // choice i of n samples with seed + i

  bool logprobs = false;                  // report the chosen tokens' logprobs
  int64_t top_logprobs = 0;               // alternatives per token: [0, 20] (completions: 0..5)

  std::vector<std::string> stop;          // at most 4, each 1..1024 bytes; not in the output
  std::vector<int32_t> stop_token_ids;    // each in [0, vocab_size)
  bool ignore_eos = false;
  bool skip_special_tokens = true;
  int64_t priority = 0;                   // lower = served first

  bool stream = false;
  bool include_usage = false;             // stream_options.include_usage
  bool echo = false;                      // completions: prepend the prompt to the text
  std::string user;                       // accepted and ignored (OpenAI end-user id)
};

// Checks every field against its bounds and the served model. InvalidArgument with an
// OpenAI-style message naming the field ("max_tokens must be at least 1, got -5"); NotFound
// "The model `x` does not exist." for a model name other than the served one. Does not know the
// prompt's token count: PrepareRequest (generation.h) checks that it fits, via ValidatePromptFits.
[[nodiscard]] absl::Status ValidateGenerationParams(const GenerationParams& params,
                                                    const ModelInfo& model);

// Prompt + completion must fit max_model_len. Returns the max_tokens to request (the explicit
// value, or the API default clamped to the room left). InvalidArgument with OpenAI's wording
// otherwise: "This model's maximum context length is N tokens. However, you requested M tokens
// (P in the messages, C in the completion). Please reduce the length of the messages or
// completion." (completions: "in your prompt" / "for the completion").
[[nodiscard]] absl::StatusOr<int> ValidatePromptFits(int num_prompt_tokens,
                                                     const GenerationParams& params,
                                                     const ModelInfo& model);

// "" or the served model's id: OK. Anything else: NotFound "The model `x` does not exist." (param
// "model"). ValidateGenerationParams calls it; Tokenize/Detokenize-style requests use it alone.
[[nodiscard]] absl::Status CheckModelName(std::string_view requested, const ModelInfo& model);

// An InvalidArgument error about one request field; the field name rides along as a payload so
// the HTTP API can fill OpenAI's error "param" (ErrorParam reads it back; "" when absent).
absl::Status InvalidParam(std::string_view field, std::string_view message);
std::string ErrorParam(const absl::Status& status);

// The name the API gives top_logprobs in error messages: "logprobs" for completions (an int
// there), "top_logprobs" otherwise.
const char* TopLogprobsFieldName(ApiKind api);

}  // namespace cleave::frontend
