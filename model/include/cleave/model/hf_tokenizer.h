// The Hugging Face tokenizer.json implementation of Tokenizer, assembled from parts so the JSON
// reading (hf_tokenizer_json.cc) stays apart from the encoding logic (hf_tokenizer.cc).
//
// Encode follows `tokenizers`: split the text on added tokens (leftmost-longest), normalize the
// rest, split again on "normalized" added tokens, pre-tokenize, BPE each piece.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/model/bpe_model.h"
#include "cleave/model/hf_components.h"
#include "cleave/model/tokenizer.h"

namespace cleave::model {

// One entry of tokenizer.json's "added_tokens".
struct AddedTokenSpec {
  int32_t id = -1;
  std::string content;
  bool special = false;      // dropped by Decode(skip_special_tokens)
  bool normalized = false;   // matched in normalized text rather than the raw input
  bool lstrip = false;       // swallows whitespace on its left
  bool rstrip = false;       // swallows whitespace on its right
  bool single_word = false;  // only matches with no word character on either side
};

struct HfTokenizerParts {
  std::vector<AddedTokenSpec> added_tokens;
  std::unique_ptr<Normalizer> normalizer;       // optional
  std::unique_ptr<PreTokenizer> pre_tokenizer;  // optional: the whole text is one BPE word
  std::unique_ptr<BpeModel> model;              // required
  std::unique_ptr<Decoder> decoder;             // optional: tokens joined with " "
  std::optional<std::string> bos_token;         // content; added by Encode(add_bos)
  std::optional<std::string> eos_token;         // content
};

// InvalidArgument when the model is missing, a token id is negative or absurd, or bos/eos name
// no token.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Tokenizer>> CreateHfTokenizer(HfTokenizerParts parts);

// What tokenizer_config.json says about BOS/EOS; it overrides what tokenizer.json implies.
struct HfTokenizerConfig {
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  std::optional<bool> add_bos_token;  // false: no BOS even if the post-processor has one
};
// Parses tokenizer_config.json text (only the fields above; the rest is ignored).
[[nodiscard]] absl::StatusOr<HfTokenizerConfig> ParseHfTokenizerConfig(
    const std::string& json_text);

[[nodiscard]] absl::StatusOr<std::unique_ptr<Tokenizer>> ParseHfTokenizerJson(
    const std::string& json_text, const HfTokenizerConfig& config);

}  // namespace cleave::model
