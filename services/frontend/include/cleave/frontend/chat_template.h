// Chat templates: turning a list of chat messages into the prompt text a model was trained on.
//
// Hugging Face models carry a Jinja template in tokenizer_config.json ("chat_template"). There is
// no Jinja engine for C++ in Debian, so the families cleave serves are written out by hand and
// recognised by markers in the template text:
//   ChatML (Qwen2, ...)   "<|im_start|>" (a fixed '<|im_start|>system\n...' literal in the
//                         template is the default system prompt, as Qwen2's)
//   Llama-3               "<|start_header_id|>" (with "Cutting Knowledge Date": the Llama-3.1+
//                         system header, dated "26 Jul 2024", or today where the template asks
//                         for strftime_now as 3.2+ do)
//   Llama-2               "[INST]" and "<<SYS>>"  Mistral   "[INST]" without "<<SYS>>" (the
//                                                            system message is prepended to the
//                                                            first user turn)
//   Zephyr                "<|user|>"
// Each renders exactly what the model's Jinja template renders (tests compare against strings
// produced by jinja2 from the real templates).
//
// No tokenizer_config.json, or one without "chat_template" (e.g. the bundled stories260K): the
// plain fallback below. A template with none of the markers: loading succeeds with a logged
// warning (so /v1/completions still serves the model) and Render fails with InvalidArgument
// saying the template is not supported - a wrong template would silently give bad answers.
//
// Plain fallback (documented contract; BOS is added by the tokenizer, not rendered):
//   "System: {system}\n" for each system message, in order of appearance
//   "User: {content}\n" / "Assistant: {content}\n" for the other turns
//   "Assistant:" at the end when add_generation_prompt
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cleave::frontend {

// One chat turn. OpenAI content-part arrays are flattened to text (parts concatenated) by the
// API parser before they get here.
struct ChatMessage {
  std::string role;     // "system", "user" or "assistant"
  std::string content;
};

enum class ChatTemplateFamily { kPlain, kChatMl, kLlama3, kLlama2, kMistral, kZephyr, kUnsupported };

const char* ChatTemplateFamilyName(ChatTemplateFamily family);

// Non-empty list; every role in {system, user, assistant}. InvalidArgument naming the message
// index otherwise ("messages[2].role must be one of system, user, assistant, got 'tool'").
[[nodiscard]] absl::Status ValidateChatMessages(std::span<const ChatMessage> messages);

// Immutable after construction; Render is const and thread-safe.
class ChatTemplate {
 public:
  // Family detected from the template text (see above); bos/eos are the literal token strings
  // the template inserts ({{ bos_token }}, {{ eos_token }}).
  static std::unique_ptr<ChatTemplate> FromJinja(std::string_view jinja_source, std::string bos_token,
                                                 std::string eos_token);
  static std::unique_ptr<ChatTemplate> Plain();
  // <dir>/tokenizer_config.json's chat_template (a string, or a list of {name, template} where
  // the one named "default" is used), bos_token and eos_token (strings or {"content": ...}).
  // Missing file or field: Plain(). Malformed JSON: InvalidArgument naming the file.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<ChatTemplate>> Load(
      const std::filesystem::path& model_dir);

  ChatTemplateFamily family() const { return family_; }

  // The prompt text. Validates the messages (ValidateChatMessages) and the family's own rules,
  // as the Jinja templates do (Llama-2/Mistral: roles must alternate user/assistant after an
  // optional leading system message). InvalidArgument on violation or kUnsupported.
  [[nodiscard]] absl::StatusOr<std::string> Render(std::span<const ChatMessage> messages,
                                                   bool add_generation_prompt) const;

  // Whether the tokenizer should add BOS when encoding rendered text. False for the real
  // templates (they write {{ bos_token }} themselves where the model wants it, and HF
  // tokenizers map that text to the BOS id); true for the plain fallback.
  bool add_bos_when_encoding() const { return family_ == ChatTemplateFamily::kPlain; }

 private:
  ChatTemplate(ChatTemplateFamily family, std::string bos, std::string eos)
      : family_(family), bos_(std::move(bos)), eos_(std::move(eos)) {}

  ChatTemplateFamily family_;
  std::string bos_;
  std::string eos_;
  std::string default_system_;   // ChatML: system prompt the template inserts when none is given
  std::string llama3_date_;      // Llama-3.1+: "Today Date" of the system header ("" = Llama-3)
  bool space_after_eos_ = false; // Mistral v0.1: eos_token + ' ' after assistant turns
};

}  // namespace cleave::frontend
