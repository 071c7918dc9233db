// PrepareRequest lives apart from the streaming code so that tools and tests that only
// validate and tokenize (e.g. against the bundled SentencePiece model) link no protobuf.
#include "cleave/common/status.h"
#include "cleave/frontend/chat_template.h"
#include "cleave/frontend/generation.h"

namespace cleave::frontend {

absl::StatusOr<PreparedRequest> PrepareRequest(const FrontendContext& ctx,
                                               const GenerationParams& params) {
  CLEAVE_RETURN_IF_ERROR(ValidateGenerationParams(params, ctx.model));
  PreparedRequest out;
  if (params.api == ApiKind::kChat) {
    absl::StatusOr<std::string> text =
        ctx.chat_template->Render(params.messages, params.add_generation_prompt);
    if (!text.ok()) return InvalidParam("messages", std::string(text.status().message()));
    out.prompt_text = *std::move(text);
    CLEAVE_ASSIGN_OR_RETURN(out.prompt_ids, ctx.tokenizer->Encode(
                                                out.prompt_text,
                                                ctx.chat_template->add_bos_when_encoding()));
  } else if (params.prompt.has_value()) {
    out.prompt_text = *params.prompt;
    absl::StatusOr<std::vector<int32_t>> ids =
        ctx.tokenizer->Encode(out.prompt_text, params.add_special_tokens);
    if (!ids.ok()) return InvalidParam("prompt", std::string(ids.status().message()));
    out.prompt_ids = *std::move(ids);
  } else {
    out.prompt_ids = *params.prompt_token_ids;
    if (params.echo) {
      CLEAVE_ASSIGN_OR_RETURN(out.prompt_text, ctx.tokenizer->Decode(out.prompt_ids, false));
    }
  }
  if (out.prompt_ids.empty()) return InvalidParam("prompt", "prompt must not be empty");
  CLEAVE_ASSIGN_OR_RETURN(out.max_tokens,
                          ValidatePromptFits(static_cast<int>(out.prompt_ids.size()), params,
                                             ctx.model));
  return out;
}

}  // namespace cleave::frontend
