// Hand-written renderings of the Jinja chat templates in chat_template.h. Each Render* function
// mirrors one template statement by statement (the template is quoted above it) so that a reader
// can check them side by side; tests compare the output with jinja2's.
#include "cleave/frontend/chat_template.h"

#include <ctime>
#include <optional>
#include <vector>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "nlohmann/json.hpp"

namespace cleave::frontend {
namespace {

using Messages = std::span<const ChatMessage>;

// Python's str.strip() (Jinja's trim filter): Unicode whitespace at both ends.
size_t WhitespaceLenAt(std::string_view s, size_t i, bool backwards) {
  static constexpr std::string_view kMultiByte[] = {
      "\xc2\x85", "\xc2\xa0", "\xe1\x9a\x80", "\xe2\x80\x80", "\xe2\x80\x81", "\xe2\x80\x82",
      "\xe2\x80\x83", "\xe2\x80\x84", "\xe2\x80\x85", "\xe2\x80\x86", "\xe2\x80\x87",
      "\xe2\x80\x88", "\xe2\x80\x89", "\xe2\x80\x8a", "\xe2\x80\xa8", "\xe2\x80\xa9",
      "\xe2\x80\xaf", "\xe2\x81\x9f", "\xe3\x80\x80"};
  unsigned char c = static_cast<unsigned char>(backwards ? s[i - 1] : s[i]);
  if (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f)) return 1;
  for (std::string_view w : kMultiByte) {
    if (backwards ? (i >= w.size() && s.substr(i - w.size(), w.size()) == w)
                  : s.substr(i, w.size()) == w) {
      return w.size();
    }
  }
  return 0;
}

std::string Trim(std::string_view s) {
  size_t begin = 0, end = s.size();
  while (begin < end) {
    size_t n = WhitespaceLenAt(s, begin, false);
    if (n == 0) break;
    begin += n;
  }
  while (end > begin) {
    size_t n = WhitespaceLenAt(s, end, true);
    if (n == 0) break;
    end -= n;
  }
  return std::string(s.substr(begin, end - begin));
}

absl::Status AlternationError() {
  return absl::InvalidArgumentError(
      "Conversation roles must alternate user/assistant/user/assistant/...");
}

// {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception(...) }}
bool BreaksAlternation(const ChatMessage& m, size_t index0) {
  return (m.role == "user") != (index0 % 2 == 0);
}

// Plain fallback: documented in chat_template.h.
std::string RenderPlain(Messages messages, bool add_generation_prompt) {
  std::string out;
  for (const ChatMessage& m : messages) {
    if (m.role == "system") absl::StrAppend(&out, "System: ", m.content, "\n");
  }
  for (const ChatMessage& m : messages) {
    if (m.role == "user") absl::StrAppend(&out, "User: ", m.content, "\n");
    if (m.role == "assistant") absl::StrAppend(&out, "Assistant: ", m.content, "\n");
  }
  if (add_generation_prompt) out += "Assistant:";
  return out;
}

// {% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}
// {{ '<|im_start|>system\n<default><|im_end|>\n' }}{% endif %}
// {{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}
// {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
std::string RenderChatMl(Messages messages, bool add_generation_prompt,
                         const std::string& default_system) {
  std::string out;
  if (!default_system.empty() && messages[0].role != "system") {
    absl::StrAppend(&out, "<|im_start|>system\n", default_system, "<|im_end|>\n");
  }
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|im_start|>", m.role, "\n", m.content, "<|im_end|>\n");
  }
  if (add_generation_prompt) out += "<|im_start|>assistant\n";
  return out;
}

// Llama-3:   bos + per message '<|start_header_id|>' + role + '<|end_header_id|>\n\n' +
//            content|trim + '<|eot_id|>'; then the assistant header when add_generation_prompt.
// Llama-3.1: bos + a system header that is always there ("Cutting Knowledge Date: December
//            2023\nToday Date: <date>\n\n" + the first system message, trimmed) + the rest as
//            Llama-3.
std::string RenderLlama3(Messages messages, bool add_generation_prompt, const std::string& bos,
                         const std::string& date) {
  std::string out = bos;
  if (!date.empty()) {
    std::string system;
    if (messages[0].role == "system") {
      system = Trim(messages[0].content);
      messages = messages.subspan(1);
    }
    absl::StrAppend(&out, "<|start_header_id|>system<|end_header_id|>\n\n",
                    "Cutting Knowledge Date: December 2023\nToday Date: ", date, "\n\n", system,
                    "<|eot_id|>");
  }
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|start_header_id|>", m.role, "<|end_header_id|>\n\n", Trim(m.content),
                    "<|eot_id|>");
  }
  if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
  return out;
}

// Llama-2 (add_generation_prompt is not used by the template):
// system = messages[0] if it is a system message; for the others, alternation check, then
// content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content for the first;
// user: bos + '[INST] ' + content.strip() + ' [/INST]'; assistant: ' ' + content.strip() + ' ' + eos.
absl::StatusOr<std::string> RenderLlama2(Messages messages, const std::string& bos,
                                         const std::string& eos) {
  std::optional<std::string> system;
  if (messages[0].role == "system") {
    system = messages[0].content;
    messages = messages.subspan(1);
  }
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const ChatMessage& m = messages[i];
    if (BreaksAlternation(m, i)) return AlternationError();
    std::string content = m.content;
    if (i == 0 && system.has_value()) {
      content = absl::StrCat("<<SYS>>\n", *system, "\n<</SYS>>\n\n", m.content);
    }
    if (m.role == "user") absl::StrAppend(&out, bos, "[INST] ", Trim(content), " [/INST]");
    if (m.role == "assistant") absl::StrAppend(&out, " ", Trim(content), " ", eos);
  }
  return out;
}

// Mistral: bos; per message the alternation check; user: '[INST] ' + content + ' [/INST]';
// assistant: content + eos (+ ' ' in v0.1); other roles raise. The template has no system role:
// a leading system message is prepended to the first user turn, separated by a blank line
// (what Mistral's own later templates do).
absl::StatusOr<std::string> RenderMistral(Messages messages, const std::string& bos,
                                          const std::string& eos, bool space_after_eos) {
  std::vector<ChatMessage> merged(messages.begin(), messages.end());
  if (merged[0].role == "system") {
    if (merged.size() < 2 || merged[1].role != "user") {
      return absl::InvalidArgumentError(
          "this model's chat template needs a user message after the system message");
    }
    merged[1].content = absl::StrCat(merged[0].content, "\n\n", merged[1].content);
    merged.erase(merged.begin());
  }
  std::string out = bos;
  for (size_t i = 0; i < merged.size(); ++i) {
    const ChatMessage& m = merged[i];
    if (BreaksAlternation(m, i)) return AlternationError();
    if (m.role == "user") {
      absl::StrAppend(&out, "[INST] ", m.content, " [/INST]");
    } else if (m.role == "assistant") {
      absl::StrAppend(&out, m.content, eos, space_after_eos ? " " : "");
    } else {
      return absl::InvalidArgumentError(
          "this model's chat template supports a system message only as the first message");
    }
  }
  return out;
}

// Zephyr (rendered with trim_blocks, so only the expression lines' newlines remain):
// '<|' + role + '|>\n' + content + eos + '\n' per message; '<|assistant|>\n' at the end.
std::string RenderZephyr(Messages messages, bool add_generation_prompt, const std::string& eos) {
  std::string out;
  for (const ChatMessage& m : messages) {
    absl::StrAppend(&out, "<|", m.role, "|>\n", m.content, eos, "\n");
  }
  if (add_generation_prompt) out += "<|assistant|>\n";
  return out;
}

// A ChatML template's built-in system prompt (Qwen2: "You are a helpful assistant."): the first
// string literal '<|im_start|>system\n...<|im_end|>' whose text is fixed (no concatenation).
std::string ExtractChatMlDefaultSystem(std::string_view jinja) {
  static constexpr std::string_view kOpen = "<|im_start|>system";
  for (size_t pos = jinja.find(kOpen); pos != std::string_view::npos;
       pos = jinja.find(kOpen, pos + 1)) {
    size_t begin = pos + kOpen.size();
    if (jinja.substr(begin, 2) == "\\n") {
      begin += 2;
    } else if (jinja.substr(begin, 1) == "\n") {
      begin += 1;
    } else {
      continue;
    }
    size_t end = jinja.find("<|im_end|>", begin);
    if (end == std::string_view::npos) break;
    std::string_view raw = jinja.substr(begin, end - begin);
    if (raw.find_first_of("'\"{}+") != std::string_view::npos || raw.empty()) continue;
    std::string text;  // undo Jinja string-literal escapes
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] == '\\' && i + 1 < raw.size()) {
        char e = raw[++i];
        text += e == 'n' ? '\n' : e == 't' ? '\t' : e;
      } else {
        text += raw[i];
      }
    }
    return text;
  }
  return "";
}

std::string TodayForLlama3() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%d %b %Y", &tm);
  return buf;
}

std::string TokenString(const nlohmann::json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return "";
}

}  // namespace

const char* ChatTemplateFamilyName(ChatTemplateFamily family) {
  switch (family) {
    case ChatTemplateFamily::kPlain: return "plain";
    case ChatTemplateFamily::kChatMl: return "chatml";
    case ChatTemplateFamily::kLlama3: return "llama3";
    case ChatTemplateFamily::kLlama2: return "llama2";
    case ChatTemplateFamily::kMistral: return "mistral";
    case ChatTemplateFamily::kZephyr: return "zephyr";
    case ChatTemplateFamily::kUnsupported: return "unsupported";
  }
  return "unknown";
}

absl::Status ValidateChatMessages(std::span<const ChatMessage> messages) {
  if (messages.empty()) {
    return absl::InvalidArgumentError("messages must contain at least one message");
  }
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string& role = messages[i].role;
    if (role != "system" && role != "user" && role != "assistant") {
      return absl::InvalidArgumentError(absl::StrCat(
          "messages[", i, "].role must be one of system, user, assistant, got '", role, "'"));
    }
  }
  return absl::OkStatus();
}

std::unique_ptr<ChatTemplate> ChatTemplate::FromJinja(std::string_view jinja, std::string bos,
                                                      std::string eos) {
  auto has = [&](std::string_view marker) { return jinja.find(marker) != std::string_view::npos; };
  ChatTemplateFamily family = ChatTemplateFamily::kUnsupported;
  if (has("<|start_header_id|>")) {
    family = ChatTemplateFamily::kLlama3;
  } else if (has("<|im_start|>")) {
    family = ChatTemplateFamily::kChatMl;
  } else if (has("[INST]")) {
    family = has("<<SYS>>") ? ChatTemplateFamily::kLlama2 : ChatTemplateFamily::kMistral;
  } else if (has("<|user|>")) {
    family = ChatTemplateFamily::kZephyr;
  }
  std::unique_ptr<ChatTemplate> t(new ChatTemplate(family, std::move(bos), std::move(eos)));
  if (family == ChatTemplateFamily::kChatMl) t->default_system_ = ExtractChatMlDefaultSystem(jinja);
  if (family == ChatTemplateFamily::kLlama3 && has("Cutting Knowledge Date")) {
    // Llama-3.1 fixes the date; 3.2+ ask for today's (strftime_now) and fall back to it.
    t->llama3_date_ = has("strftime_now") ? TodayForLlama3() : "26 Jul 2024";
  }
  if (family == ChatTemplateFamily::kMistral) t->space_after_eos_ = has("eos_token + ' '");
  return t;
}

std::unique_ptr<ChatTemplate> ChatTemplate::Plain() {
  return std::unique_ptr<ChatTemplate>(new ChatTemplate(ChatTemplateFamily::kPlain, "", ""));
}

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Load(
    const std::filesystem::path& model_dir) {
  const std::filesystem::path path = model_dir / "tokenizer_config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return Plain();
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json config = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (config.is_discarded() || !config.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": malformed JSON"));
  }
  std::string jinja;
  if (auto it = config.find("chat_template"); it != config.end()) {
    if (it->is_string()) {
      jinja = it->get<std::string>();
    } else if (it->is_array()) {  // [{"name": "default", "template": ...}, {"name": "tool_use"...}]
      for (const auto& entry : *it) {
        auto name = entry.is_object() ? entry.find("name") : entry.end();
        if (entry.is_object() && name != entry.end() && *name == "default" &&
            entry.contains("template") && entry["template"].is_string()) {
          jinja = entry["template"].get<std::string>();
        }
      }
    }
  }
  if (jinja.empty()) return Plain();
  auto t = FromJinja(jinja, TokenString(config.value("bos_token", nlohmann::json())),
                     TokenString(config.value("eos_token", nlohmann::json())));
  if (t->family() == ChatTemplateFamily::kUnsupported) {
    CLEAVE_LOG(Warning) << path.string()
                        << ": chat_template matches none of the supported families (ChatML, "
                           "Llama-3, Llama-2, Mistral, Zephyr); chat completions will be refused";
  }
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Render(std::span<const ChatMessage> messages,
                                                 bool add_generation_prompt) const {
  if (absl::Status s = ValidateChatMessages(messages); !s.ok()) return s;
  switch (family_) {
    case ChatTemplateFamily::kPlain: return RenderPlain(messages, add_generation_prompt);
    case ChatTemplateFamily::kChatMl:
      return RenderChatMl(messages, add_generation_prompt, default_system_);
    case ChatTemplateFamily::kLlama3:
      return RenderLlama3(messages, add_generation_prompt, bos_, llama3_date_);
    case ChatTemplateFamily::kLlama2: return RenderLlama2(messages, bos_, eos_);
    case ChatTemplateFamily::kMistral: return RenderMistral(messages, bos_, eos_, space_after_eos_);
    case ChatTemplateFamily::kZephyr: return RenderZephyr(messages, add_generation_prompt, eos_);
    case ChatTemplateFamily::kUnsupported: break;
  }
  return absl::InvalidArgumentError(
      "this model's chat template is not supported by cleave (supported: ChatML, Llama-3, "
      "Llama-2, Mistral, Zephyr); use /v1/completions with a formatted prompt");
}

}  // namespace cleave::frontend
