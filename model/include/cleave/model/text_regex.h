// TextRegex: the regular expressions tokenizer.json files carry (pre-tokenizer splits such as
// Llama-3's `(?i:'s|...)|[^\r\n\p{L}\p{N}]?\p{L}+|...`), run with PCRE2 in UTF + Unicode-property
// mode. std::regex can do neither \p{L} nor UTF-8.
//
// Hugging Face runs these with Oniguruma; the differences that matter are smoothed over here:
// \s, \S and \w are rewritten to Oniguruma's Unicode definitions (PCRE2 counts U+180E as space
// and No/Nl digits as word characters), and ^/$ match at line breaks as in Ruby syntax.
#pragma once

#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace cleave::model {

class TextRegex {
 public:
  // InvalidArgument (with PCRE2's message and offset) when the pattern does not compile.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<TextRegex>> Compile(std::string_view pattern);
  ~TextRegex();
  TextRegex(const TextRegex&) = delete;
  TextRegex& operator=(const TextRegex&) = delete;

  // Byte ranges [begin, end) of the successive non-overlapping matches in `text` (valid UTF-8),
  // left to right, as Oniguruma's find_iter yields them (an empty match right where the previous
  // match ended is skipped). Thread-safe. ResourceExhausted if PCRE2 hits its match limits.
  [[nodiscard]] absl::StatusOr<std::vector<std::pair<size_t, size_t>>> FindAll(
      std::string_view text) const;

  const std::string& pattern() const { return pattern_; }

 private:
  TextRegex() = default;

  std::string pattern_;   // as written in the file (before rewriting)
  void* code_ = nullptr;  // pcre2_code_8*, kept opaque so pcre2.h stays out of this header
};

}  // namespace cleave::model
