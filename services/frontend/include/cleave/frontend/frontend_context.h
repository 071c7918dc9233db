// What every frontend API (OpenAI HTTP, gRPC) shares: the served model's identity and limits, its
// tokenizer and chat template, and the engine requests go to.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/frontend/engine_client.h"
#include "cleave/model/config.h"
#include "cleave/model/tokenizer.h"

namespace cleave::frontend {

class ApiKeys;
class ChatTemplate;
class FrontendLifecycle;
class FrontendMetrics;

// The served model as clients see it (GET /v1/models, gRPC ListModels).
struct ModelInfo {
  std::string id;          // the name clients put in "model"
  int max_model_len = 0;   // prompt + completion tokens, at most
  int vocab_size = 0;      // valid token ids are [0, vocab_size)
};

// Everything a request handler reads. Plain pointers: the owners (FrontendModel, the engine
// client) outlive every server built on this context. All of it is immutable while serving, and
// the pointees are thread-safe (Tokenizer and ChatTemplate are const; EngineClient is called
// from any thread), so handlers on any thread share one context without locking.
struct FrontendContext {
  ModelInfo model;
  const model::Tokenizer* tokenizer = nullptr;
  const ChatTemplate* chat_template = nullptr;
  EngineClient* engine = nullptr;
  // Ids that end generation unless ignore_eos: config.json's eos_token_id (one or a list),
  // generation_config.json's, and the tokenizer's EOS. Sent to the engine as stop_token_ids.
  std::vector<int32_t> eos_token_ids;
  // Where requests are counted and timed (GET /metrics); null = not recorded (tests).
  FrontendMetrics* metrics = nullptr;
  // Admits generation requests and refuses them once a drain began (lifecycle.h); null = always
  // admit (tests).
  FrontendLifecycle* lifecycle = nullptr;
  // Client API keys (api_keys.h); null or empty = no authentication (tests, trusted networks).
  const ApiKeys* api_keys = nullptr;
};

struct LoadFrontendModelOptions {
  std::string served_model_name;  // "" = the model directory's name (e.g. "stories260K")
  int max_model_len = 0;          // 0 = config.json's max_position_embeddings; else at most that
};

// The model-side assets a frontend needs (no weights). Immutable after loading.
struct FrontendModel {
  ModelInfo info;
  model::ModelConfig config;
  std::unique_ptr<model::Tokenizer> tokenizer;
  std::unique_ptr<ChatTemplate> chat_template;  // never null (plain fallback without a template)
  std::vector<int32_t> eos_token_ids;

  ~FrontendModel();
  // A context pointing into this model; `engine` is borrowed and must outlive the context.
  FrontendContext MakeContext(EngineClient* engine) const;
};

// Loads <dir>/config.json, the tokenizer (LoadTokenizer), the chat template (ChatTemplate::Load,
// from <dir>/tokenizer_config.json) and <dir>/generation_config.json's eos_token_id when present.
// NotFound / InvalidArgument naming the file that is missing or malformed.
[[nodiscard]] absl::StatusOr<std::unique_ptr<FrontendModel>> LoadFrontendModel(
    const std::filesystem::path& model_dir, const LoadFrontendModelOptions& options = {});

}  // namespace cleave::frontend
