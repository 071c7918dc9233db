// Reads tokenizer.json / tokenizer_config.json into HfTokenizerParts. Every field access is
// type-checked (the parser is fuzzed); anything the encoder does not implement is rejected by
// name rather than approximated.
#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/model/hf_tokenizer.h"
#include "cleave/model/unicode_text.h"

namespace cleave::model {
namespace {

using Json = nlohmann::json;

// Nesting of Sequence components; real files use one level. Bounded so a hostile file cannot
// exhaust the stack through recursion.
constexpr int kMaxNesting = 32;

absl::Status Bad(const std::string& where, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", where, ": ", what));
}

const Json* Find(const Json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

absl::StatusOr<std::string> String(const Json& obj, const char* key, const std::string& where) {
  const Json* v = Find(obj, key);
  if (v == nullptr || !v->is_string())
    return Bad(where, absl::StrCat("\"", key, "\" must be a string"));
  return v->get<std::string>();
}

// Missing or null -> nullopt.
absl::StatusOr<std::optional<std::string>> OptString(const Json& obj, const char* key,
                                                     const std::string& where) {
  const Json* v = Find(obj, key);
  if (v == nullptr || v->is_null()) return std::nullopt;
  if (!v->is_string()) return Bad(where, absl::StrCat("\"", key, "\" must be a string or null"));
  return v->get<std::string>();
}

absl::StatusOr<bool> Bool(const Json& obj, const char* key, bool fallback,
                          const std::string& where) {
  const Json* v = Find(obj, key);
  if (v == nullptr || v->is_null()) return fallback;
  if (!v->is_boolean()) return Bad(where, absl::StrCat("\"", key, "\" must be a boolean"));
  return v->get<bool>();
}

absl::StatusOr<int32_t> Int32(const Json& v, const std::string& where) {
  if (v.is_number_unsigned() && v.get<uint64_t>() <= INT32_MAX) {
    return static_cast<int32_t>(v.get<uint64_t>());
  }
  if (v.is_number_integer() && !v.is_number_unsigned() && v.get<int64_t>() >= INT32_MIN &&
      v.get<int64_t>() <= INT32_MAX) {
    return static_cast<int32_t>(v.get<int64_t>());
  }
  return Bad(where, "expected a 32-bit integer");
}

absl::StatusOr<const Json*> Array(const Json& obj, const char* key, const std::string& where) {
  const Json* v = Find(obj, key);
  if (v == nullptr || !v->is_array())
    return Bad(where, absl::StrCat("\"", key, "\" must be an array"));
  return v;
}

// A component's "type" tag.
absl::StatusOr<std::string> TypeOf(const Json& obj, const std::string& where) {
  if (!obj.is_object()) return Bad(where, "must be an object");
  return String(obj, "type", where);
}

// {"String": "..."} or {"Regex": "..."}.
absl::StatusOr<TextPattern> ParsePattern(const Json& obj, const char* key,
                                         const std::string& where) {
  const Json* p = Find(obj, key);
  if (p == nullptr || !p->is_object())
    return Bad(where, "pattern must be {\"String\"|\"Regex\": ...}");
  if (const Json* s = Find(*p, "String"); s != nullptr && s->is_string()) {
    return TextPattern::Literal(s->get<std::string>());
  }
  if (const Json* r = Find(*p, "Regex"); r != nullptr && r->is_string()) {
    auto regex = TextPattern::Regex(r->get<std::string>());
    if (!regex.ok()) return Bad(where, regex.status().message());
    return *std::move(regex);
  }
  return Bad(where, "pattern must be {\"String\"|\"Regex\": ...}");
}

// Exactly one character, as `tokenizers` stores Metaspace/Strip characters (Rust `char`).
absl::StatusOr<std::string> OneChar(const Json& obj, const char* key, const std::string& where) {
  CLEAVE_ASSIGN_OR_RETURN(std::string s, String(obj, key, where));
  char32_t cp;
  if (s.empty() || DecodeUtf8(s, 0, &cp) != static_cast<int>(s.size())) {
    return Bad(where, absl::StrCat("\"", key, "\" must be a single character"));
  }
  return s;
}

absl::StatusOr<PrependScheme> ParsePrependScheme(const Json& obj, const std::string& where) {
  CLEAVE_ASSIGN_OR_RETURN(auto scheme, OptString(obj, "prepend_scheme", where));
  if (!scheme) {  // files from before prepend_scheme existed
    CLEAVE_ASSIGN_OR_RETURN(bool add, Bool(obj, "add_prefix_space", true, where));
    return add ? PrependScheme::kAlways : PrependScheme::kNever;
  }
  if (*scheme == "always") return PrependScheme::kAlways;
  if (*scheme == "first") return PrependScheme::kFirst;
  if (*scheme == "never") return PrependScheme::kNever;
  return Bad(where, absl::StrCat("unknown prepend_scheme \"", *scheme, "\""));
}

absl::StatusOr<SplitBehavior> ParseSplitBehavior(const std::string& name,
                                                 const std::string& where) {
  static constexpr std::pair<std::string_view, SplitBehavior> kNames[] = {
      {"Removed", SplitBehavior::kRemoved},
      {"Isolated", SplitBehavior::kIsolated},
      {"MergedWithPrevious", SplitBehavior::kMergedWithPrevious},
      {"MergedWithNext", SplitBehavior::kMergedWithNext},
      {"Contiguous", SplitBehavior::kContiguous},
  };
  for (const auto& [n, b] : kNames) {
    if (name == n) return b;
  }
  return Bad(where, absl::StrCat("unknown split behavior \"", name, "\""));
}

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const Json& j, const std::string& where,
                                                            int depth = 0) {
  if (depth > kMaxNesting) return Bad(where, "nested too deeply");
  CLEAVE_ASSIGN_OR_RETURN(std::string type, TypeOf(j, where));
  const std::string here = absl::StrCat(where, "(", type, ")");
  if (type == "Sequence") {
    CLEAVE_ASSIGN_OR_RETURN(const Json* list, Array(j, "normalizers", here));
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (const Json& item : *list) {
      CLEAVE_ASSIGN_OR_RETURN(auto part, ParseNormalizer(item, here, depth + 1));
      parts.push_back(std::move(part));
    }
    return MakeSequenceNormalizer(std::move(parts));
  }
  if (type == "Prepend") {
    CLEAVE_ASSIGN_OR_RETURN(std::string prefix, String(j, "prepend", here));
    return MakePrependNormalizer(std::move(prefix));
  }
  if (type == "Replace") {
    CLEAVE_ASSIGN_OR_RETURN(TextPattern pattern, ParsePattern(j, "pattern", here));
    CLEAVE_ASSIGN_OR_RETURN(std::string content, String(j, "content", here));
    return MakeReplaceNormalizer(std::move(pattern), std::move(content));
  }
  if (type == "Strip") {
    CLEAVE_ASSIGN_OR_RETURN(bool left, Bool(j, "strip_left", true, here));
    CLEAVE_ASSIGN_OR_RETURN(bool right, Bool(j, "strip_right", true, here));
    return MakeStripNormalizer(left, right);
  }
  if (type == "NFC") return MakeNfcNormalizer();
  return Bad(where, absl::StrCat("unsupported normalizer type \"", type, "\""));
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const Json& j,
                                                                const std::string& where,
                                                                int depth = 0) {
  if (depth > kMaxNesting) return Bad(where, "nested too deeply");
  CLEAVE_ASSIGN_OR_RETURN(std::string type, TypeOf(j, where));
  const std::string here = absl::StrCat(where, "(", type, ")");
  if (type == "Sequence") {
    CLEAVE_ASSIGN_OR_RETURN(const Json* list, Array(j, "pretokenizers", here));
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (const Json& item : *list) {
      CLEAVE_ASSIGN_OR_RETURN(auto part, ParsePreTokenizer(item, here, depth + 1));
      parts.push_back(std::move(part));
    }
    return MakeSequencePreTokenizer(std::move(parts));
  }
  if (type == "Split") {
    CLEAVE_ASSIGN_OR_RETURN(TextPattern pattern, ParsePattern(j, "pattern", here));
    CLEAVE_ASSIGN_OR_RETURN(std::string behavior, String(j, "behavior", here));
    CLEAVE_ASSIGN_OR_RETURN(bool invert, Bool(j, "invert", false, here));
    CLEAVE_ASSIGN_OR_RETURN(SplitBehavior b, ParseSplitBehavior(behavior, here));
    return MakeSplitPreTokenizer(std::move(pattern), b, invert);
  }
  if (type == "ByteLevel") {
    CLEAVE_ASSIGN_OR_RETURN(bool add_prefix_space, Bool(j, "add_prefix_space", true, here));
    CLEAVE_ASSIGN_OR_RETURN(bool use_regex, Bool(j, "use_regex", true, here));
    return MakeByteLevelPreTokenizer(add_prefix_space, use_regex);
  }
  if (type == "Metaspace") {
    CLEAVE_ASSIGN_OR_RETURN(std::string replacement, OneChar(j, "replacement", here));
    CLEAVE_ASSIGN_OR_RETURN(PrependScheme scheme, ParsePrependScheme(j, here));
    CLEAVE_ASSIGN_OR_RETURN(bool split, Bool(j, "split", true, here));
    return MakeMetaspacePreTokenizer(std::move(replacement), scheme, split);
  }
  if (type == "Digits") {
    CLEAVE_ASSIGN_OR_RETURN(bool individual, Bool(j, "individual_digits", false, here));
    return MakeDigitsPreTokenizer(individual);
  }
  return Bad(where, absl::StrCat("unsupported pre_tokenizer type \"", type, "\""));
}

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const Json& j, const std::string& where,
                                                      int depth = 0) {
  if (depth > kMaxNesting) return Bad(where, "nested too deeply");
  CLEAVE_ASSIGN_OR_RETURN(std::string type, TypeOf(j, where));
  const std::string here = absl::StrCat(where, "(", type, ")");
  if (type == "Sequence") {
    CLEAVE_ASSIGN_OR_RETURN(const Json* list, Array(j, "decoders", here));
    std::vector<std::unique_ptr<Decoder>> parts;
    for (const Json& item : *list) {
      CLEAVE_ASSIGN_OR_RETURN(auto part, ParseDecoder(item, here, depth + 1));
      parts.push_back(std::move(part));
    }
    return MakeSequenceDecoder(std::move(parts));
  }
  if (type == "ByteLevel") return MakeByteLevelDecoder();
  if (type == "ByteFallback") return MakeByteFallbackDecoder();
  if (type == "Fuse") return MakeFuseDecoder();
  if (type == "Replace") {
    CLEAVE_ASSIGN_OR_RETURN(TextPattern pattern, ParsePattern(j, "pattern", here));
    CLEAVE_ASSIGN_OR_RETURN(std::string content, String(j, "content", here));
    return MakeReplaceDecoder(std::move(pattern), std::move(content));
  }
  if (type == "Strip") {
    CLEAVE_ASSIGN_OR_RETURN(std::string content, OneChar(j, "content", here));
    const Json* start = Find(j, "start");
    const Json* stop = Find(j, "stop");
    if (start == nullptr || stop == nullptr) return Bad(here, "needs \"start\" and \"stop\"");
    CLEAVE_ASSIGN_OR_RETURN(int32_t n_start, Int32(*start, here));
    CLEAVE_ASSIGN_OR_RETURN(int32_t n_stop, Int32(*stop, here));
    if (n_start < 0 || n_stop < 0) return Bad(here, "start/stop must be non-negative");
    return MakeStripDecoder(std::move(content), n_start, n_stop);
  }
  if (type == "Metaspace") {
    CLEAVE_ASSIGN_OR_RETURN(std::string replacement, OneChar(j, "replacement", here));
    CLEAVE_ASSIGN_OR_RETURN(PrependScheme scheme, ParsePrependScheme(j, here));
    return MakeMetaspaceDecoder(std::move(replacement), scheme);
  }
  return Bad(where, absl::StrCat("unsupported decoder type \"", type, "\""));
}

absl::StatusOr<std::unique_ptr<BpeModel>> ParseModel(const Json& j) {
  const std::string where = "model";
  if (!j.is_object()) return Bad(where, "must be an object");
  CLEAVE_ASSIGN_OR_RETURN(auto type, OptString(j, "type", where));
  // Old files omit the tag; `tokenizers` then recognises BPE by its merges.
  if (type ? *type != "BPE" : Find(j, "merges") == nullptr) {
    return Bad(where, absl::StrCat("unsupported model type \"", type.value_or("(untagged)"),
                                   "\" (only BPE is implemented)"));
  }
  BpeModelOptions options;
  const Json* vocab = Find(j, "vocab");
  if (vocab == nullptr || !vocab->is_object()) return Bad(where, "\"vocab\" must be an object");
  options.vocab.reserve(vocab->size());
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    CLEAVE_ASSIGN_OR_RETURN(int32_t id, Int32(it.value(), "model.vocab"));
    options.vocab.emplace_back(it.key(), id);
  }
  CLEAVE_ASSIGN_OR_RETURN(const Json* merges, Array(j, "merges", where));
  options.merges.reserve(merges->size());
  for (const Json& m : *merges) {
    if (m.is_string()) {  // "a b" (older files)
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos)
        return Bad("model.merges", absl::StrCat("\"", s, "\" is not \"a b\""));
      options.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      options.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      return Bad("model.merges", "each merge must be \"a b\" or [\"a\", \"b\"]");
    }
  }
  CLEAVE_ASSIGN_OR_RETURN(options.unk_token, OptString(j, "unk_token", where));
  CLEAVE_ASSIGN_OR_RETURN(options.fuse_unk, Bool(j, "fuse_unk", false, where));
  CLEAVE_ASSIGN_OR_RETURN(options.byte_fallback, Bool(j, "byte_fallback", false, where));
  CLEAVE_ASSIGN_OR_RETURN(options.ignore_merges, Bool(j, "ignore_merges", false, where));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    CLEAVE_ASSIGN_OR_RETURN(auto affix, OptString(j, key, where));
    if (affix && !affix->empty()) return Bad(where, absl::StrCat("\"", key, "\" is not supported"));
  }
  if (const Json* dropout = Find(j, "dropout"); dropout != nullptr && !dropout->is_null()) {
    if (!dropout->is_number() || dropout->get<double>() != 0.0) {
      return Bad(where, "BPE dropout is not supported (encoding would be random)");
    }
  }
  auto model = BpeModel::Create(std::move(options));
  if (!model.ok()) return Bad(where, model.status().message());
  return model;
}

absl::StatusOr<std::vector<AddedTokenSpec>> ParseAddedTokens(const Json& root) {
  std::vector<AddedTokenSpec> out;
  const Json* list = Find(root, "added_tokens");
  if (list == nullptr || list->is_null()) return out;
  if (!list->is_array()) return Bad("added_tokens", "must be an array");
  for (const Json& t : *list) {
    const std::string where = "added_tokens[]";
    if (!t.is_object()) return Bad(where, "each entry must be an object");
    AddedTokenSpec spec;
    const Json* id = Find(t, "id");
    if (id == nullptr) return Bad(where, "missing \"id\"");
    CLEAVE_ASSIGN_OR_RETURN(spec.id, Int32(*id, where));
    CLEAVE_ASSIGN_OR_RETURN(spec.content, String(t, "content", where));
    CLEAVE_ASSIGN_OR_RETURN(spec.special, Bool(t, "special", false, where));
    CLEAVE_ASSIGN_OR_RETURN(spec.normalized, Bool(t, "normalized", !spec.special, where));
    CLEAVE_ASSIGN_OR_RETURN(spec.lstrip, Bool(t, "lstrip", false, where));
    CLEAVE_ASSIGN_OR_RETURN(spec.rstrip, Bool(t, "rstrip", false, where));
    CLEAVE_ASSIGN_OR_RETURN(spec.single_word, Bool(t, "single_word", false, where));
    out.push_back(std::move(spec));
  }
  return out;
}

// The special token a TemplateProcessing puts before $A, i.e. the BOS `tokenizers` adds with
// add_special_tokens=True. Other processors add nothing at the front.
absl::StatusOr<std::optional<std::string>> TemplateBos(const Json& p, const std::string& where,
                                                       int depth = 0) {
  if (p.is_null()) return std::nullopt;
  if (depth > kMaxNesting) return Bad(where, "nested too deeply");
  CLEAVE_ASSIGN_OR_RETURN(std::string type, TypeOf(p, where));
  if (type == "Sequence") {
    CLEAVE_ASSIGN_OR_RETURN(const Json* list, Array(p, "processors", where));
    for (const Json& item : *list) {
      CLEAVE_ASSIGN_OR_RETURN(auto bos, TemplateBos(item, where, depth + 1));
      if (bos) return bos;
    }
    return std::nullopt;
  }
  if (type == "ByteLevel") return std::nullopt;
  if (type != "TemplateProcessing") {
    return Bad(where, absl::StrCat("unsupported post_processor type \"", type, "\""));
  }
  CLEAVE_ASSIGN_OR_RETURN(const Json* single, Array(p, "single", where));
  if (single->empty()) return std::nullopt;
  const Json* special = Find((*single)[0], "SpecialToken");
  if (special == nullptr) return std::nullopt;
  CLEAVE_ASSIGN_OR_RETURN(std::string name, String(*special, "id", where));
  // special_tokens maps the template name to the actual token(s).
  if (const Json* tokens = Find(p, "special_tokens"); tokens != nullptr) {
    if (const Json* entry = Find(*tokens, name.c_str()); entry != nullptr) {
      if (const Json* list = Find(*entry, "tokens");
          list != nullptr && list->is_array() && !list->empty() && (*list)[0].is_string()) {
        return (*list)[0].get<std::string>();
      }
    }
  }
  return name;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseRoot(const Json& root,
                                                     const HfTokenizerConfig& config) {
  if (!root.is_object()) return Bad("(root)", "must be an object");
  HfTokenizerParts parts;
  CLEAVE_ASSIGN_OR_RETURN(parts.added_tokens, ParseAddedTokens(root));
  const Json* model = Find(root, "model");
  if (model == nullptr) return Bad("(root)", "missing \"model\"");
  CLEAVE_ASSIGN_OR_RETURN(parts.model, ParseModel(*model));
  if (const Json* n = Find(root, "normalizer"); n != nullptr && !n->is_null()) {
    CLEAVE_ASSIGN_OR_RETURN(parts.normalizer, ParseNormalizer(*n, "normalizer"));
  }
  if (const Json* p = Find(root, "pre_tokenizer"); p != nullptr && !p->is_null()) {
    CLEAVE_ASSIGN_OR_RETURN(parts.pre_tokenizer, ParsePreTokenizer(*p, "pre_tokenizer"));
  }
  if (const Json* d = Find(root, "decoder"); d != nullptr && !d->is_null()) {
    CLEAVE_ASSIGN_OR_RETURN(parts.decoder, ParseDecoder(*d, "decoder"));
  }
  std::optional<std::string> template_bos;
  if (const Json* p = Find(root, "post_processor"); p != nullptr) {
    CLEAVE_ASSIGN_OR_RETURN(template_bos, TemplateBos(*p, "post_processor"));
  }
  if (config.add_bos_token == false) {
    parts.bos_token = std::nullopt;
  } else if (config.add_bos_token == true && config.bos_token) {
    parts.bos_token = config.bos_token;
  } else {
    parts.bos_token = template_bos;
  }
  parts.eos_token = config.eos_token;
  if (!parts.eos_token) {
    // No config: the end-of-text marker of the families we know.
    for (const char* name : {"</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<eos>"}) {
      for (const AddedTokenSpec& t : parts.added_tokens) {
        if (!parts.eos_token && t.content == name) parts.eos_token = t.content;
      }
    }
  }
  return CreateHfTokenizer(std::move(parts));
}

// bos_token / eos_token are a string, null, or (older files) {"content": "...", ...}.
absl::StatusOr<std::optional<std::string>> ConfigToken(const Json& root, const char* key) {
  const Json* v = Find(root, key);
  if (v == nullptr || v->is_null()) return std::nullopt;
  if (v->is_string()) return v->get<std::string>();
  if (v->is_object()) {
    if (const Json* c = Find(*v, "content"); c != nullptr && c->is_string())
      return c->get<std::string>();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("tokenizer_config.json: \"", key, "\" must be a string or {\"content\": ...}"));
}

}  // namespace

absl::StatusOr<HfTokenizerConfig> ParseHfTokenizerConfig(const std::string& json_text) {
  try {
    const Json root = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
    if (root.is_discarded() || !root.is_object()) {
      return absl::InvalidArgumentError("tokenizer_config.json is not a JSON object");
    }
    HfTokenizerConfig config;
    CLEAVE_ASSIGN_OR_RETURN(config.bos_token, ConfigToken(root, "bos_token"));
    CLEAVE_ASSIGN_OR_RETURN(config.eos_token, ConfigToken(root, "eos_token"));
    if (const Json* add = Find(root, "add_bos_token"); add != nullptr && add->is_boolean()) {
      config.add_bos_token = add->get<bool>();
    }
    return config;
  } catch (const std::exception& e) {  // nlohmann or allocation failure: still a bad file
    return absl::InvalidArgumentError(absl::StrCat("tokenizer_config.json: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseHfTokenizerJson(const std::string& json_text,
                                                                const HfTokenizerConfig& config) {
  try {
    const Json root = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
    if (root.is_discarded()) return absl::InvalidArgumentError("tokenizer.json is not valid JSON");
    return ParseRoot(root, config);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("tokenizer.json: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseHfTokenizerJson(const std::string& json_text) {
  return ParseHfTokenizerJson(json_text, HfTokenizerConfig{});
}

}  // namespace cleave::model
