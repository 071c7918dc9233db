#include "cleave/frontend/frontend_context.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "cleave/common/status.h"
#include "cleave/frontend/chat_template.h"
#include "nlohmann/json.hpp"

namespace cleave::frontend {
namespace {

void AddUnique(std::vector<int32_t>* ids, int64_t id) {
  if (id < 0 || id > INT32_MAX) return;
  if (std::find(ids->begin(), ids->end(), id) == ids->end()) ids->push_back(static_cast<int32_t>(id));
}

// generation_config.json's eos_token_id (an int or a list): chat models often list their
// end-of-turn token there (Llama-3's <|eot_id|>) rather than in config.json.
absl::Status AddGenerationConfigEos(const std::filesystem::path& dir, std::vector<int32_t>* ids) {
  const std::filesystem::path path = dir / "generation_config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::OkStatus();
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": malformed JSON"));
  }
  auto it = j.find("eos_token_id");
  if (it == j.end()) return absl::OkStatus();
  if (it->is_number_integer()) AddUnique(ids, it->get<int64_t>());
  if (it->is_array()) {
    for (const auto& v : *it) {
      if (v.is_number_integer()) AddUnique(ids, v.get<int64_t>());
    }
  }
  return absl::OkStatus();
}

}  // namespace

FrontendModel::~FrontendModel() = default;

FrontendContext FrontendModel::MakeContext(EngineClient* engine) const {
  FrontendContext ctx;
  ctx.model = info;
  ctx.tokenizer = tokenizer.get();
  ctx.chat_template = chat_template.get();
  ctx.engine = engine;
  ctx.eos_token_ids = eos_token_ids;
  return ctx;
}

absl::StatusOr<std::unique_ptr<FrontendModel>> LoadFrontendModel(
    const std::filesystem::path& model_dir, const LoadFrontendModelOptions& options) {
  auto m = std::make_unique<FrontendModel>();
  CLEAVE_ASSIGN_OR_RETURN(m->config, model::LoadModelConfig(model_dir));
  CLEAVE_ASSIGN_OR_RETURN(m->tokenizer, model::LoadTokenizer(model_dir));
  CLEAVE_ASSIGN_OR_RETURN(m->chat_template, ChatTemplate::Load(model_dir));

  for (int id : m->config.eos_token_ids) AddUnique(&m->eos_token_ids, id);
  AddUnique(&m->eos_token_ids, m->config.eos_token_id);
  CLEAVE_RETURN_IF_ERROR(AddGenerationConfigEos(model_dir, &m->eos_token_ids));
  AddUnique(&m->eos_token_ids, m->tokenizer->eos_id());

  std::string name = options.served_model_name;
  if (name.empty()) {
    std::filesystem::path p = model_dir.lexically_normal();
    if (!p.has_filename()) p = p.parent_path();  // "models/x/" -> "models/x"
    name = p.filename().string();
  }
  const int context = m->config.max_position_embeddings;
  if (options.max_model_len < 0 || options.max_model_len > context) {
    return absl::InvalidArgumentError(absl::StrCat("max_model_len must be between 1 and ",
                                                   context, " for this model, got ",
                                                   options.max_model_len));
  }
  m->info.id = name;
  m->info.max_model_len = options.max_model_len > 0 ? options.max_model_len : context;
  // The embedding table can be padded past the tokenizer's ids; ids the tokenizer cannot decode
  // are refused either way, so the smaller bound is the useful one.
  m->info.vocab_size = std::min(m->config.vocab_size, m->tokenizer->vocab_size());
  CLEAVE_LOG(Info) << "frontend model " << name << ": max_model_len " << m->info.max_model_len
                   << ", vocab " << m->info.vocab_size << ", chat template "
                   << ChatTemplateFamilyName(m->chat_template->family());
  return m;
}

}  // namespace cleave::frontend
