// The pipeline stages of a Hugging Face tokenizer.json around the BPE model, each a small class
// behind an interface, with the semantics of the `tokenizers` library (v0.19+):
//   normalizer     Sequence, Prepend, Replace, Strip, NFC
//   pre_tokenizer  Sequence, Split, ByteLevel, Metaspace, Digits
//   decoder        Sequence, ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace
// hf_tokenizer_json.cc builds them from the file; anything else is rejected there by name.
// All stages are immutable and thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/model/text_regex.h"

namespace cleave::model {

// A stretch of text between added tokens, on its way to the BPE model.
struct TextPiece {
  std::string text;
  // Begins at offset 0 of the caller's text: Metaspace's prepend_scheme "first" adds its "▁"
  // only there.
  bool at_origin = false;
};

// A `{"String": ...}` or `{"Regex": ...}` pattern. Copyable; the compiled regex is shared.
class TextPattern {
 public:
  static TextPattern Literal(std::string literal);
  [[nodiscard]] static absl::StatusOr<TextPattern> Regex(std::string_view pattern);
  // Non-overlapping matches, left to right. An empty literal matches nothing.
  [[nodiscard]] absl::StatusOr<std::vector<std::pair<size_t, size_t>>> FindAll(
      std::string_view text) const;
  // `text` with every match replaced by `content`.
  [[nodiscard]] absl::StatusOr<std::string> ReplaceAll(std::string_view text,
                                                       std::string_view content) const;

 private:
  std::string literal_;
  std::shared_ptr<const TextRegex> regex_;  // null for literals
};

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  [[nodiscard]] virtual absl::Status Normalize(std::string* text) const = 0;
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Replaces `pieces` by their split (and transformed) versions; empty pieces are dropped.
  [[nodiscard]] virtual absl::Status PreTokenize(std::vector<TextPiece>* pieces) const = 0;
};

class Decoder {
 public:
  virtual ~Decoder() = default;
  // Transforms the token strings in place (the `tokenizers` decode_chain); the caller joins them.
  [[nodiscard]] virtual absl::Status Decode(std::vector<std::string>* tokens) const = 0;
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
enum class PrependScheme { kAlways, kFirst, kNever };

std::unique_ptr<Normalizer> MakeSequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts);
std::unique_ptr<Normalizer> MakePrependNormalizer(std::string prefix);  // only non-empty text
std::unique_ptr<Normalizer> MakeReplaceNormalizer(TextPattern pattern, std::string content);
std::unique_ptr<Normalizer> MakeStripNormalizer(bool left, bool right);  // Unicode whitespace
std::unique_ptr<Normalizer> MakeNfcNormalizer();

std::unique_ptr<PreTokenizer> MakeSequencePreTokenizer(
    std::vector<std::unique_ptr<PreTokenizer>> parts);
std::unique_ptr<PreTokenizer> MakeSplitPreTokenizer(TextPattern pattern, SplitBehavior behavior,
                                                    bool invert);
// use_regex splits with GPT-2's pattern first; either way every piece is then mapped into the
// byte-level alphabet (see ByteLevelChar).
[[nodiscard]] absl::StatusOr<std::unique_ptr<PreTokenizer>> MakeByteLevelPreTokenizer(
    bool add_prefix_space, bool use_regex);
std::unique_ptr<PreTokenizer> MakeMetaspacePreTokenizer(std::string replacement,
                                                        PrependScheme scheme, bool split);
[[nodiscard]] absl::StatusOr<std::unique_ptr<PreTokenizer>> MakeDigitsPreTokenizer(
    bool individual_digits);

std::unique_ptr<Decoder> MakeSequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts);
std::unique_ptr<Decoder> MakeByteLevelDecoder();
std::unique_ptr<Decoder> MakeReplaceDecoder(TextPattern pattern, std::string content);
std::unique_ptr<Decoder> MakeByteFallbackDecoder();
std::unique_ptr<Decoder> MakeFuseDecoder();
// Removes up to `start` leading and `stop` trailing occurrences of `content` (one character).
std::unique_ptr<Decoder> MakeStripDecoder(std::string content, int start, int stop);
std::unique_ptr<Decoder> MakeMetaspaceDecoder(std::string replacement, PrependScheme scheme);

}  // namespace cleave::model
