// The OpenAI wire format: request bodies of /v1/completions and /v1/chat/completions parsed into
// GenerationParams, and response bodies / stream chunks written from GenerationUpdates. Pure
// functions of their inputs (no I/O), so the HTTP server and the tests share them.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/frontend/generation.h"
#include "cleave/frontend/generation_params.h"
#include "nlohmann/json.hpp"

namespace cleave::frontend {

// Parsing. Errors are InvalidArgument with OpenAI's "param" attached (InvalidParam): invalid
// JSON, a body that is not an object, a wrong type ("temperature must be a number, got string"),
// an unknown field ("Unrecognized request argument supplied: foo", as OpenAI), or a known but
// unsupported feature set to a non-default value (suffix, best_of > n... "suffix is not
// supported"). Values are range-checked later by ValidateGenerationParams. null means "not given".
//
// A completions prompt may be a batch (an array of strings or of token-id arrays): one
// GenerationParams per prompt; choice index = prompt_index * n + i, as OpenAI.
[[nodiscard]] absl::StatusOr<std::vector<GenerationParams>> ParseCompletionRequest(
    std::string_view body);
[[nodiscard]] absl::StatusOr<GenerationParams> ParseChatCompletionRequest(std::string_view body);

// vLLM's /tokenize: {"prompt": str} or {"messages": [...]} (+ "add_special_tokens",
// "add_generation_prompt", "model"); /detokenize: {"tokens": [int]} (+ "model").
struct TokenizeBody {
  std::string model;
  bool is_chat = false;
  std::string prompt;
  std::vector<ChatMessage> messages;
  bool add_special_tokens = true;     // default true for a prompt, false for messages (vLLM)
  bool add_generation_prompt = true;
};
[[nodiscard]] absl::StatusOr<TokenizeBody> ParseTokenizeRequest(std::string_view body);
struct DetokenizeBody {
  std::string model;
  std::vector<int32_t> tokens;
};
[[nodiscard]] absl::StatusOr<DetokenizeBody> ParseDetokenizeRequest(std::string_view body);

// Response identity shared by every chunk of one response.
struct ResponseMeta {
  std::string id;        // "cmpl-..." / "chatcmpl-..."
  int64_t created = 0;   // unix seconds
  std::string model;
};
// A fresh response id: prefix + 32 random hex digits.
std::string NewResponseId(std::string_view prefix);

// Accumulates one choice for a non-streaming response, and formats per-update logprobs.
struct ChoiceState {
  std::string text;
  std::vector<GeneratedToken> tokens;  // kept only when logprobs were asked
  FinishReason finish = FinishReason::kNone;
  int64_t text_offset = 0;             // code points emitted so far (completions text_offset)
};

// Logprobs objects, each API's own shape. Completions: {"tokens", "token_logprobs",
// "top_logprobs", "text_offset"} (offsets start at *text_offset, which advances). Chat:
// {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}.
nlohmann::json CompletionLogprobs(const std::vector<GeneratedToken>& tokens, int top_logprobs,
                                  int64_t* text_offset);
nlohmann::json ChatLogprobs(const std::vector<GeneratedToken>& tokens);

nlohmann::json UsageJson(const Usage& usage);

// Stream chunks (one choice each). `logprobs` is null when not asked. finish == kNone: null.
nlohmann::json CompletionChunk(const ResponseMeta& meta, int index, const std::string& text,
                               nlohmann::json logprobs, FinishReason finish);
// First chunk of a chat choice carries the role ({"role": "assistant", "content": ""}).
nlohmann::json ChatChunk(const ResponseMeta& meta, int index, bool first, const std::string& text,
                         nlohmann::json logprobs, FinishReason finish);
// Final usage chunk of a stream with stream_options.include_usage ("choices": []).
nlohmann::json UsageChunk(const ResponseMeta& meta, bool chat, const Usage& usage);

// Whole (non-stream) responses from accumulated choices, indexed by choice.
nlohmann::json CompletionResponse(const ResponseMeta& meta, const std::vector<ChoiceState>& choices,
                                  const GenerationParams& params, const Usage& usage);
nlohmann::json ChatResponse(const ResponseMeta& meta, const std::vector<ChoiceState>& choices,
                            const GenerationParams& params, const Usage& usage);

// JSON text that never throws: invalid UTF-8 (none is expected) becomes U+FFFD.
std::string DumpJson(const nlohmann::json& j);

}  // namespace cleave::frontend
