// OpenAI request bodies -> GenerationParams. Every field is dispatched by name from one table
// per endpoint; a field not in the table is refused as OpenAI refuses it, and fields cleave
// cannot honour are refused when set to anything but their no-op value, so that a client never
// silently gets something other than what it asked for.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>

#include "absl/strings/str_cat.h"
#include "cleave/frontend/openai_api.h"

namespace cleave::frontend {
namespace {

using nlohmann::json;

std::string TypeName(const json& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number()) return "number";
  return v.type_name();  // "string", "boolean", "array", "object", "null"
}

absl::Status WrongType(std::string_view field, std::string_view want, const json& v) {
  return InvalidParam(field, absl::StrCat(std::string(field), " must be ", std::string(want),
                                          ", got ", TypeName(v)));
}

absl::Status Unsupported(std::string_view field) {
  return InvalidParam(field, absl::StrCat(std::string(field), " is not supported"));
}

absl::StatusOr<double> Number(std::string_view field, const json& v) {
  if (!v.is_number()) return WrongType(field, "a number", v);
  return v.get<double>();
}

absl::StatusOr<int64_t> Integer(std::string_view field, const json& v) {
  if (v.is_number_integer()) {
    if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t{INT64_MAX}) {
      return InvalidParam(field, absl::StrCat(std::string(field), " is out of range"));
    }
    return v.get<int64_t>();
  }
  // 2.0 is accepted for an integer field (as pydantic does); 2.5 is not.
  if (v.is_number_float()) {
    double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) return static_cast<int64_t>(d);
  }
  return WrongType(field, "an integer", v);
}

absl::StatusOr<bool> Bool(std::string_view field, const json& v) {
  if (!v.is_boolean()) return WrongType(field, "a boolean", v);
  return v.get<bool>();
}

absl::StatusOr<std::string> String(std::string_view field, const json& v) {
  if (!v.is_string()) return WrongType(field, "a string", v);
  return v.get<std::string>();
}

absl::StatusOr<std::vector<int32_t>> TokenIds(std::string_view field, const json& v) {
  if (!v.is_array()) return WrongType(field, "an array of integers", v);
  std::vector<int32_t> ids;
  ids.reserve(v.size());
  for (const json& e : v) {
    if (!e.is_number_integer()) return WrongType(field, "an array of integers", v);
    int64_t id = e.is_number_unsigned() && e.get<uint64_t>() > uint64_t{INT64_MAX}
                     ? INT64_MAX : e.get<int64_t>();
    // Out-of-range ids are reported by the validator, which knows the vocabulary.
    ids.push_back(static_cast<int32_t>(std::clamp<int64_t>(id, INT32_MIN, INT32_MAX)));
  }
  return ids;
}

// "stop": a string or an array of strings.
absl::StatusOr<std::vector<std::string>> Stops(const json& v) {
  if (v.is_string()) return std::vector<std::string>{v.get<std::string>()};
  if (!v.is_array()) return WrongType("stop", "a string or an array of strings", v);
  std::vector<std::string> out;
  for (const json& e : v) {
    if (!e.is_string()) return WrongType("stop", "a string or an array of strings", v);
    out.push_back(e.get<std::string>());
  }
  return out;
}

absl::StatusOr<json> ParseObject(std::string_view body) {
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return InvalidParam("", "Invalid JSON body: could not parse the request");
  if (!j.is_object()) return InvalidParam("", "The request body must be a JSON object");
  return j;
}

#define CLEAVE_SET_OR_RETURN(target, expr) \
  do {                                     \
    auto v_ = (expr);                      \
    if (!v_.ok()) return v_.status();      \
    target = *std::move(v_);               \
  } while (0)

using Handler = std::function<absl::Status(const json&, GenerationParams&)>;
using HandlerTable = std::map<std::string, Handler, std::less<>>;

// Fields shared by both endpoints (sampling, stops, streaming, vLLM's extras).
void AddCommonHandlers(HandlerTable& t) {
  t["model"] = [](const json& v, GenerationParams& p) {
    CLEAVE_SET_OR_RETURN(p.model, String("model", v));
    return absl::OkStatus();
  };
  t["n"] = [](const json& v, GenerationParams& p) {
    CLEAVE_SET_OR_RETURN(p.n, Integer("n", v));
    return absl::OkStatus();
  };
  auto number = [](const char* name, double GenerationParams::*field) {
    return [name, field](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.*field, Number(name, v));
      return absl::OkStatus();
    };
  };
  t["temperature"] = number("temperature", &GenerationParams::temperature);
  t["top_p"] = number("top_p", &GenerationParams::top_p);
  t["min_p"] = number("min_p", &GenerationParams::min_p);
  t["repetition_penalty"] = number("repetition_penalty", &GenerationParams::repetition_penalty);
  t["presence_penalty"] = number("presence_penalty", &GenerationParams::presence_penalty);
  t["frequency_penalty"] = number("frequency_penalty", &GenerationParams::frequency_penalty);
  t["top_k"] = [](const json& v, GenerationParams& p) {
    CLEAVE_SET_OR_RETURN(p.top_k, Integer("top_k", v));
    return absl::OkStatus();
  };
  t["seed"] = [](const json& v, GenerationParams& p) {
    if (v.is_number_unsigned()) {
      p.seed = v.get<uint64_t>();
      return absl::OkStatus();
    }
    int64_t seed = 0;
    CLEAVE_SET_OR_RETURN(seed, Integer("seed", v));
    p.seed = static_cast<uint64_t>(seed);  // negative seeds wrap, still reproducible
    return absl::OkStatus();
  };
  t["stop"] = [](const json& v, GenerationParams& p) {
    CLEAVE_SET_OR_RETURN(p.stop, Stops(v));
    return absl::OkStatus();
  };
  t["stop_token_ids"] = [](const json& v, GenerationParams& p) {
    CLEAVE_SET_OR_RETURN(p.stop_token_ids, TokenIds("stop_token_ids", v));
    return absl::OkStatus();
  };
  auto boolean = [](const char* name, bool GenerationParams::*field) {
    return [name, field](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.*field, Bool(name, v));
      return absl::OkStatus();
    };
  };
  t["stream"] = boolean("stream", &GenerationParams::stream);
  t["ignore_eos"] = boolean("ignore_eos", &GenerationParams::ignore_eos);
  t["skip_special_tokens"] = boolean("skip_special_tokens", &GenerationParams::skip_special_tokens);
  t["stream_options"] = [](const json& v, GenerationParams& p) {
    if (!v.is_object()) return WrongType("stream_options", "an object", v);
    for (const auto& [key, value] : v.items()) {
      if (key == "include_usage") {
        if (value.is_null()) continue;
        CLEAVE_SET_OR_RETURN(p.include_usage, Bool("stream_options.include_usage", value));
      } else if (key != "continuous_usage_stats" || (value.is_boolean() && value.get<bool>())) {
        return InvalidParam("stream_options", absl::StrCat("stream_options.", key,
                                                           " is not supported"));
      }
    }
    return absl::OkStatus();
  };
  t["priority"] = [](const json& v, GenerationParams& p) {
    CLEAVE_SET_OR_RETURN(p.priority, Integer("priority", v));
    return absl::OkStatus();
  };
  t["user"] = [](const json& v, GenerationParams& p) {
    CLEAVE_SET_OR_RETURN(p.user, String("user", v));
    return absl::OkStatus();
  };
  // Accepted and meaningless here.
  for (const char* ignored : {"spaces_between_special_tokens", "metadata", "store", "service_tier"}) {
    t[ignored] = [](const json&, GenerationParams&) { return absl::OkStatus(); };
  }
  // Refused unless they ask for nothing.
  t["logit_bias"] = [](const json& v, GenerationParams&) {
    return v.is_object() && v.empty() ? absl::OkStatus() : Unsupported("logit_bias");
  };
  t["min_tokens"] = [](const json& v, GenerationParams&) {
    return v.is_number_integer() && v.get<int64_t>() == 0 ? absl::OkStatus()
                                                          : Unsupported("min_tokens");
  };
  for (const char* off : {"include_stop_str_in_output", "use_beam_search"}) {
    t[off] = [off](const json& v, GenerationParams&) {
      return v.is_boolean() && !v.get<bool>() ? absl::OkStatus() : Unsupported(off);
    };
  }
  t["prompt_logprobs"] = [](const json&, GenerationParams&) { return Unsupported("prompt_logprobs"); };
}

absl::Status ApplyFields(const json& body, const HandlerTable& table, GenerationParams& p) {
  for (const auto& [key, value] : body.items()) {
    auto it = table.find(key);
    if (it == table.end()) {
      return InvalidParam(key, absl::StrCat("Unrecognized request argument supplied: ", key));
    }
    if (value.is_null()) continue;  // null = not given
    if (absl::Status s = it->second(value, p); !s.ok()) return s;
  }
  return absl::OkStatus();
}

const HandlerTable& CompletionHandlers() {
  static const HandlerTable* table = [] {
    auto* t = new HandlerTable;
    AddCommonHandlers(*t);
    (*t)["prompt"] = [](const json&, GenerationParams&) { return absl::OkStatus(); };  // below
    (*t)["max_tokens"] = [](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.max_tokens, Integer("max_tokens", v));
      return absl::OkStatus();
    };
    (*t)["logprobs"] = [](const json& v, GenerationParams& p) {  // an int 0..5 here
      CLEAVE_SET_OR_RETURN(p.top_logprobs, Integer("logprobs", v));
      p.logprobs = true;
      return absl::OkStatus();
    };
    (*t)["echo"] = [](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.echo, Bool("echo", v));
      return absl::OkStatus();
    };
    (*t)["add_special_tokens"] = [](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.add_special_tokens, Bool("add_special_tokens", v));
      return absl::OkStatus();
    };
    (*t)["suffix"] = [](const json& v, GenerationParams&) {
      return v.is_string() && v.get<std::string>().empty() ? absl::OkStatus()
                                                           : Unsupported("suffix");
    };
    (*t)["best_of"] = [](const json& v, GenerationParams&) {
      return v.is_number_integer() && v.get<int64_t>() == 1 ? absl::OkStatus()
                                                            : Unsupported("best_of");
    };
    return t;
  }();
  return *table;
}

// "prompt": a string, an array of token ids, or a batch (array of strings / of id arrays).
absl::Status SplitPrompts(const json& prompt, const GenerationParams& base,
                          std::vector<GenerationParams>* out) {
  auto with_text = [&](std::string text) {
    out->push_back(base);
    out->back().prompt = std::move(text);
  };
  auto with_ids = [&](std::vector<int32_t> ids) {
    out->push_back(base);
    out->back().prompt_token_ids = std::move(ids);
  };
  constexpr std::string_view kWant = "a string, an array of strings, or an array of token ids";
  if (prompt.is_string()) {
    with_text(prompt.get<std::string>());
    return absl::OkStatus();
  }
  if (!prompt.is_array()) return WrongType("prompt", kWant, prompt);
  if (prompt.empty()) return InvalidParam("prompt", "prompt must not be empty");
  if (prompt[0].is_number_integer()) {
    absl::StatusOr<std::vector<int32_t>> ids = TokenIds("prompt", prompt);
    if (!ids.ok()) return ids.status();
    with_ids(*std::move(ids));
    return absl::OkStatus();
  }
  for (const json& e : prompt) {
    if (e.is_string()) {
      with_text(e.get<std::string>());
    } else if (e.is_array()) {
      absl::StatusOr<std::vector<int32_t>> ids = TokenIds("prompt", e);
      if (!ids.ok()) return ids.status();
      with_ids(*std::move(ids));
    } else {
      return WrongType("prompt", kWant, prompt);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> MessageContent(size_t i, const json& content) {
  const std::string field = absl::StrCat("messages[", i, "].content");
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) return WrongType(field, "a string or an array of text parts", content);
  std::string text;  // text parts concatenated, as vLLM does for text-only models
  for (const json& part : content) {
    if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
        !part.contains("text") || !part["text"].is_string()) {
      return InvalidParam(field, absl::StrCat(field, " parts must be {\"type\": \"text\", "
                                                     "\"text\": string}; only text is supported"));
    }
    text += part["text"].get<std::string>();
  }
  return text;
}

absl::StatusOr<std::vector<ChatMessage>> Messages(const json& v) {
  if (!v.is_array()) return WrongType("messages", "an array", v);
  std::vector<ChatMessage> out;
  for (size_t i = 0; i < v.size(); ++i) {
    const json& m = v[i];
    const std::string field = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return WrongType(field, "an object", m);
    ChatMessage msg;
    for (const auto& [key, value] : m.items()) {
      if (key == "role") {
        CLEAVE_SET_OR_RETURN(msg.role, String(field + ".role", value));
      } else if (key == "content") {
        CLEAVE_SET_OR_RETURN(msg.content, MessageContent(i, value));
      } else if (key == "name") {
        if (!value.is_string()) return WrongType(field + ".name", "a string", value);
      } else if (!value.is_null() && !(value.is_array() && value.empty())) {
        // tool_calls, tool_call_id, function_call, audio...: not supported.
        return InvalidParam(field, absl::StrCat(field, ".", key, " is not supported"));
      }
    }
    if (!m.contains("role")) return InvalidParam(field, field + ".role is required");
    if (!m.contains("content")) return InvalidParam(field, field + ".content is required");
    out.push_back(std::move(msg));
  }
  return out;
}

const HandlerTable& ChatHandlers() {
  static const HandlerTable* table = [] {
    auto* t = new HandlerTable;
    AddCommonHandlers(*t);
    (*t)["messages"] = [](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.messages, Messages(v));
      return absl::OkStatus();
    };
    // max_completion_tokens supersedes the deprecated max_tokens when both are given.
    (*t)["max_tokens"] = [](const json& v, GenerationParams& p) {
      if (p.max_tokens_field == "max_completion_tokens") return absl::OkStatus();
      CLEAVE_SET_OR_RETURN(p.max_tokens, Integer("max_tokens", v));
      return absl::OkStatus();
    };
    (*t)["max_completion_tokens"] = [](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.max_tokens, Integer("max_completion_tokens", v));
      p.max_tokens_field = "max_completion_tokens";
      return absl::OkStatus();
    };
    (*t)["logprobs"] = [](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.logprobs, Bool("logprobs", v));
      return absl::OkStatus();
    };
    (*t)["top_logprobs"] = [](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.top_logprobs, Integer("top_logprobs", v));
      return absl::OkStatus();
    };
    (*t)["add_generation_prompt"] = [](const json& v, GenerationParams& p) {
      CLEAVE_SET_OR_RETURN(p.add_generation_prompt, Bool("add_generation_prompt", v));
      return absl::OkStatus();
    };
    (*t)["response_format"] = [](const json& v, GenerationParams&) {
      const bool text_only = v.is_object() && v.size() == 1 && v.contains("type") && v["type"] == "text";
      return text_only ? absl::OkStatus() : Unsupported("response_format");
    };
    (*t)["tools"] = [](const json& v, GenerationParams&) {
      return v.is_array() && v.empty() ? absl::OkStatus() : Unsupported("tools");
    };
    (*t)["tool_choice"] = [](const json& v, GenerationParams&) {
      return v == "none" || v == "auto" ? absl::OkStatus() : Unsupported("tool_choice");
    };
    (*t)["parallel_tool_calls"] = [](const json&, GenerationParams&) { return absl::OkStatus(); };
    return t;
  }();
  return *table;
}

absl::Status CheckStreamOptions(const json& body, const GenerationParams& p) {
  if (body.contains("stream_options") && !body["stream_options"].is_null() && !p.stream) {
    return InvalidParam("stream_options", "stream_options is only allowed when stream is true");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<GenerationParams>> ParseCompletionRequest(std::string_view body) {
  absl::StatusOr<json> j = ParseObject(body);
  if (!j.ok()) return j.status();
  GenerationParams base;
  base.api = ApiKind::kCompletions;
  if (absl::Status s = ApplyFields(*j, CompletionHandlers(), base); !s.ok()) return s;
  if (absl::Status s = CheckStreamOptions(*j, base); !s.ok()) return s;
  auto prompt = j->find("prompt");
  if (prompt == j->end() || prompt->is_null()) return InvalidParam("prompt", "prompt is required");
  if (base.echo && base.logprobs) {
    return InvalidParam("echo", "echo together with logprobs is not supported");
  }
  std::vector<GenerationParams> out;
  if (absl::Status s = SplitPrompts(*prompt, base, &out); !s.ok()) return s;
  return out;
}

absl::StatusOr<GenerationParams> ParseChatCompletionRequest(std::string_view body) {
  absl::StatusOr<json> j = ParseObject(body);
  if (!j.ok()) return j.status();
  GenerationParams p;
  p.api = ApiKind::kChat;
  // max_completion_tokens first, so that max_tokens can see it was given.
  if (auto it = j->find("max_completion_tokens"); it != j->end() && !it->is_null()) {
    if (absl::Status s = ChatHandlers().at("max_completion_tokens")(*it, p); !s.ok()) return s;
  }
  if (absl::Status s = ApplyFields(*j, ChatHandlers(), p); !s.ok()) return s;
  if (absl::Status s = CheckStreamOptions(*j, p); !s.ok()) return s;
  if (!j->contains("messages") || (*j)["messages"].is_null()) {
    return InvalidParam("messages", "messages is required");
  }
  return p;
}

absl::StatusOr<TokenizeBody> ParseTokenizeRequest(std::string_view body) {
  absl::StatusOr<json> j = ParseObject(body);
  if (!j.ok()) return j.status();
  TokenizeBody r;
  std::optional<bool> add_special;
  for (const auto& [key, value] : j->items()) {
    if (value.is_null()) continue;
    if (key == "model") {
      CLEAVE_SET_OR_RETURN(r.model, String("model", value));
    } else if (key == "prompt") {
      CLEAVE_SET_OR_RETURN(r.prompt, String("prompt", value));
    } else if (key == "messages") {
      CLEAVE_SET_OR_RETURN(r.messages, Messages(value));
      r.is_chat = true;
    } else if (key == "add_special_tokens") {
      bool b = false;
      CLEAVE_SET_OR_RETURN(b, Bool("add_special_tokens", value));
      add_special = b;
    } else if (key == "add_generation_prompt") {
      CLEAVE_SET_OR_RETURN(r.add_generation_prompt, Bool("add_generation_prompt", value));
    } else {
      return InvalidParam(key, absl::StrCat("Unrecognized request argument supplied: ", key));
    }
  }
  const bool has_prompt = j->contains("prompt") && !(*j)["prompt"].is_null();
  if (has_prompt == r.is_chat) {
    return InvalidParam("prompt", "exactly one of prompt and messages must be given");
  }
  r.add_special_tokens = add_special.value_or(!r.is_chat);
  return r;
}

absl::StatusOr<DetokenizeBody> ParseDetokenizeRequest(std::string_view body) {
  absl::StatusOr<json> j = ParseObject(body);
  if (!j.ok()) return j.status();
  DetokenizeBody r;
  for (const auto& [key, value] : j->items()) {
    if (key == "model") {
      if (!value.is_null()) CLEAVE_SET_OR_RETURN(r.model, String("model", value));
    } else if (key == "tokens") {
      CLEAVE_SET_OR_RETURN(r.tokens, TokenIds("tokens", value));
    } else {
      return InvalidParam(key, absl::StrCat("Unrecognized request argument supplied: ", key));
    }
  }
  if (!j->contains("tokens")) return InvalidParam("tokens", "tokens is required");
  return r;
}

}  // namespace cleave::frontend
