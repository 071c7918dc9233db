// GenerationUpdates -> OpenAI response bodies and stream chunks, field for field as OpenAI
// writes them (object names, null where OpenAI has null).
#include <random>

#include "absl/strings/str_cat.h"
#include "cleave/frontend/openai_api.h"

namespace cleave::frontend {
namespace {

using nlohmann::json;

int64_t CodePoints(std::string_view s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

json Bytes(std::string_view s) {
  json out = json::array();
  for (unsigned char c : s) out.push_back(static_cast<int>(c));
  return out;
}

json FinishJson(FinishReason finish) {
  return finish == FinishReason::kNone ? json(nullptr) : json(FinishReasonName(finish));
}

}  // namespace

std::string NewResponseId(std::string_view prefix) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  static constexpr char kHex[] = "0123456789abcdef";
  std::string id(prefix);
  for (int i = 0; i < 2; ++i) {
    uint64_t r = rng();
    for (int k = 0; k < 16; ++k) id += kHex[(r >> (4 * k)) & 15];
  }
  return id;
}

std::string DumpJson(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

json CompletionLogprobs(const std::vector<GeneratedToken>& tokens, int top_logprobs,
                        int64_t* text_offset) {
  json toks = json::array(), lps = json::array(), tops = json::array(), offs = json::array();
  for (const GeneratedToken& t : tokens) {
    toks.push_back(t.token);
    lps.push_back(t.logprob);
    if (top_logprobs > 0) {
      json top = json::object();
      for (const TopLogprob& alt : t.top) {
        if (!top.contains(alt.text)) top[alt.text] = alt.logprob;  // first (highest) wins
      }
      tops.push_back(std::move(top));
    } else {
      tops.push_back(nullptr);
    }
    offs.push_back(*text_offset);
    *text_offset += CodePoints(t.text);
  }
  return {{"tokens", toks}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

json ChatLogprobs(const std::vector<GeneratedToken>& tokens) {
  json content = json::array();
  for (const GeneratedToken& t : tokens) {
    json top = json::array();
    for (const TopLogprob& alt : t.top) {
      top.push_back({{"token", alt.text}, {"logprob", alt.logprob}, {"bytes", Bytes(alt.text)}});
    }
    content.push_back({{"token", t.token},
                       {"logprob", t.logprob},
                       {"bytes", Bytes(t.token)},
                       {"top_logprobs", std::move(top)}});
  }
  return {{"content", std::move(content)}, {"refusal", nullptr}};
}

json UsageJson(const Usage& usage) {
  const Usage& u = usage;
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

json CompletionChunk(const ResponseMeta& meta, int index, const std::string& text, json logprobs,
                     FinishReason finish) {
  json choice = {{"index", index},
                 {"text", text},
                 {"logprobs", std::move(logprobs)},
                 {"finish_reason", FinishJson(finish)}};
  return {{"id", meta.id},
          {"object", "text_completion"},
          {"created", meta.created},
          {"model", meta.model},
          {"choices", json::array({std::move(choice)})}};
}

json ChatChunk(const ResponseMeta& meta, int index, bool first, const std::string& text,
               json logprobs, FinishReason finish) {
  json delta = json::object();
  if (first) delta["role"] = "assistant";
  if (first || !text.empty()) delta["content"] = text;
  json choice = {{"index", index},
                 {"delta", std::move(delta)},
                 {"logprobs", std::move(logprobs)},
                 {"finish_reason", FinishJson(finish)}};
  return {{"id", meta.id},
          {"object", "chat.completion.chunk"},
          {"created", meta.created},
          {"model", meta.model},
          {"choices", json::array({std::move(choice)})}};
}

json UsageChunk(const ResponseMeta& meta, bool chat, const Usage& usage) {
  return {{"id", meta.id},
          {"object", chat ? "chat.completion.chunk" : "text_completion"},
          {"created", meta.created},
          {"model", meta.model},
          {"choices", json::array()},
          {"usage", UsageJson(usage)}};
}

json CompletionResponse(const ResponseMeta& meta, const std::vector<ChoiceState>& choices,
                        const GenerationParams& params, const Usage& usage) {
  json out = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const ChoiceState& c = choices[i];
    json logprobs = nullptr;
    if (params.logprobs) {
      int64_t offset = 0;
      logprobs = CompletionLogprobs(c.tokens, static_cast<int>(params.top_logprobs), &offset);
    }
    out.push_back({{"index", static_cast<int>(i)},
                   {"text", c.text},
                   {"logprobs", std::move(logprobs)},
                   {"finish_reason", FinishJson(c.finish)}});
  }
  return {{"id", meta.id},       {"object", "text_completion"}, {"created", meta.created},
          {"model", meta.model}, {"choices", std::move(out)},   {"usage", UsageJson(usage)}};
}

json ChatResponse(const ResponseMeta& meta, const std::vector<ChoiceState>& choices,
                  const GenerationParams& params, const Usage& usage) {
  json out = json::array();
  for (size_t i = 0; i < choices.size(); ++i) {
    const ChoiceState& c = choices[i];
    out.push_back({{"index", static_cast<int>(i)},
                   {"message", {{"role", "assistant"}, {"content", c.text}}},
                   {"logprobs", params.logprobs ? ChatLogprobs(c.tokens) : json(nullptr)},
                   {"finish_reason", FinishJson(c.finish)}});
  }
  return {{"id", meta.id},       {"object", "chat.completion"}, {"created", meta.created},
          {"model", meta.model}, {"choices", std::move(out)},   {"usage", UsageJson(usage)}};
}

}  // namespace cleave::frontend
