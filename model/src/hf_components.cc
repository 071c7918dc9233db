#include "cleave/model/hf_components.h"

#include <algorithm>
#include <optional>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/model/unicode_text.h"

namespace cleave::model {
namespace {

// GPT-2's pre-tokenization regex, used by ByteLevel when use_regex is set.
constexpr std::string_view kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// prefix + *text. (Not text->insert(0, ...): GCC 12 reports a bogus -Wrestrict on it at -O3.)
void Prepend(std::string_view prefix, std::string* text) {
  std::string out;
  out.reserve(prefix.size() + text->size());
  out.append(prefix);
  out.append(*text);
  *text = std::move(out);
}

// One piece of a split: byte range of the parent and whether it was a pattern match.
struct Span {
  size_t begin, end;
  bool is_match;
};

// Splits `text` into consecutive spans covering it, alternating gaps and matches (tokenizers'
// Pattern::find_matches).
absl::StatusOr<std::vector<Span>> MatchSpans(const TextPattern& pattern, std::string_view text,
                                             bool invert) {
  std::vector<Span> spans;
  CLEAVE_ASSIGN_OR_RETURN(auto matches, pattern.FindAll(text));
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (prev != b) spans.push_back({prev, b, invert});
    spans.push_back({b, e, !invert});
    prev = e;
  }
  if (prev != text.size()) spans.push_back({prev, text.size(), invert});
  return spans;
}

// Applies a SplitDelimiterBehavior to the spans; returns the kept [begin, end) ranges
// (NormalizedString::split in `tokenizers`).
std::vector<std::pair<size_t, size_t>> ApplyBehavior(std::vector<Span> spans,
                                                     SplitBehavior behavior) {
  std::vector<std::pair<size_t, size_t>> out;
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const Span& s : spans) out.emplace_back(s.begin, s.end);
      break;
    case SplitBehavior::kRemoved:
      for (const Span& s : spans) {
        if (!s.is_match) out.emplace_back(s.begin, s.end);
      }
      break;
    case SplitBehavior::kContiguous: {
      bool prev_match = false;
      for (const Span& s : spans) {
        if (s.is_match == prev_match && !out.empty()) {
          out.back().second = s.end;
        } else {
          out.emplace_back(s.begin, s.end);
        }
        prev_match = s.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithPrevious: {
      bool prev_match = false;
      for (const Span& s : spans) {
        if (s.is_match && !prev_match && !out.empty()) {
          out.back().second = s.end;
        } else {
          out.emplace_back(s.begin, s.end);
        }
        prev_match = s.is_match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool prev_match = false;  // walking right to left: "previous" is the span to the right
      for (auto it = spans.rbegin(); it != spans.rend(); ++it) {
        if (it->is_match && !prev_match && !out.empty()) {
          out.back().first = it->begin;
        } else {
          out.emplace_back(it->begin, it->end);
        }
        prev_match = it->is_match;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
  }
  return out;
}

// Splits every piece with `pattern`, keeping the non-empty results in order.
absl::Status SplitPieces(const TextPattern& pattern, SplitBehavior behavior, bool invert,
                         std::vector<TextPiece>* pieces) {
  std::vector<TextPiece> out;
  out.reserve(pieces->size());
  for (TextPiece& piece : *pieces) {
    CLEAVE_ASSIGN_OR_RETURN(auto spans, MatchSpans(pattern, piece.text, invert));
    for (const auto& [b, e] : ApplyBehavior(std::move(spans), behavior)) {
      if (b == e) continue;
      out.push_back({piece.text.substr(b, e - b), piece.at_origin && b == 0});
    }
  }
  *pieces = std::move(out);
  return absl::OkStatus();
}

// ---- normalizers ----

class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status Normalize(std::string* text) const override {
    for (const auto& p : parts_) CLEAVE_RETURN_IF_ERROR(p->Normalize(text));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  absl::Status Normalize(std::string* text) const override {
    if (!text->empty()) Prepend(prefix_, text);
    return absl::OkStatus();
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(TextPattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status Normalize(std::string* text) const override {
    CLEAVE_ASSIGN_OR_RETURN(*text, pattern_.ReplaceAll(*text, content_));
    return absl::OkStatus();
  }

 private:
  TextPattern pattern_;
  std::string content_;
};

class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  absl::Status Normalize(std::string* text) const override {
    size_t begin = 0, end = text->size();
    char32_t cp;
    if (left_) {
      while (begin < end) {
        const int len = DecodeUtf8(*text, begin, &cp);
        if (len == 0 || !IsUnicodeWhitespace(cp)) break;
        begin += len;
      }
    }
    if (right_) {
      while (end > begin) {
        size_t start = end - 1;  // back up to the lead byte of the last character
        while (start > begin && (static_cast<uint8_t>((*text)[start]) & 0xC0) == 0x80) --start;
        const int len = DecodeUtf8(*text, start, &cp);
        if (len == 0 || start + len != end || !IsUnicodeWhitespace(cp)) break;
        end = start;
      }
    }
    *text = text->substr(begin, end - begin);
    return absl::OkStatus();
  }

 private:
  bool left_, right_;
};

// ---- pre-tokenizers ----

class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  absl::Status PreTokenize(std::vector<TextPiece>* pieces) const override {
    for (const auto& p : parts_) CLEAVE_RETURN_IF_ERROR(p->PreTokenize(pieces));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(TextPattern pattern, SplitBehavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  absl::Status PreTokenize(std::vector<TextPiece>* pieces) const override {
    return SplitPieces(pattern_, behavior_, invert_, pieces);
  }

 private:
  TextPattern pattern_;
  SplitBehavior behavior_;
  bool invert_;
};

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::optional<TextPattern> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  absl::Status PreTokenize(std::vector<TextPiece>* pieces) const override {
    if (add_prefix_space_) {
      for (TextPiece& p : *pieces) {
        if (!p.text.empty() && p.text[0] != ' ') Prepend(" ", &p.text);
      }
    }
    if (regex_)
      CLEAVE_RETURN_IF_ERROR(SplitPieces(*regex_, SplitBehavior::kIsolated, false, pieces));
    for (TextPiece& p : *pieces) {
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (char c : p.text) mapped += ByteLevelChar(static_cast<uint8_t>(c));
      p.text = std::move(mapped);
    }
    return absl::OkStatus();
  }

 private:
  bool add_prefix_space_;
  std::optional<TextPattern> regex_;
};

class MetaspacePreTokenizer : public PreTokenizer {
 public:
  MetaspacePreTokenizer(std::string replacement, PrependScheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {}
  absl::Status PreTokenize(std::vector<TextPiece>* pieces) const override {
    const TextPattern space = TextPattern::Literal(" ");
    for (TextPiece& p : *pieces) {
      CLEAVE_ASSIGN_OR_RETURN(p.text, space.ReplaceAll(p.text, replacement_));
      const bool prepend =
          scheme_ == PrependScheme::kAlways || (scheme_ == PrependScheme::kFirst && p.at_origin);
      if (prepend && !p.text.empty() && !p.text.starts_with(replacement_)) {
        Prepend(replacement_, &p.text);
      }
    }
    if (!split_) return absl::OkStatus();
    return SplitPieces(TextPattern::Literal(replacement_), SplitBehavior::kMergedWithNext, false,
                       pieces);
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
  bool split_;
};

}  // namespace

TextPattern TextPattern::Literal(std::string literal) {
  TextPattern p;
  p.literal_ = std::move(literal);
  return p;
}

absl::StatusOr<TextPattern> TextPattern::Regex(std::string_view pattern) {
  CLEAVE_ASSIGN_OR_RETURN(std::shared_ptr<const TextRegex> regex, TextRegex::Compile(pattern));
  TextPattern p;
  p.regex_ = std::move(regex);
  return p;
}

absl::StatusOr<std::vector<std::pair<size_t, size_t>>> TextPattern::FindAll(
    std::string_view text) const {
  if (regex_) return regex_->FindAll(text);
  std::vector<std::pair<size_t, size_t>> matches;
  if (literal_.empty()) return matches;
  for (size_t pos = text.find(literal_); pos != std::string_view::npos;
       pos = text.find(literal_, pos + literal_.size())) {
    matches.emplace_back(pos, pos + literal_.size());
  }
  return matches;
}

absl::StatusOr<std::string> TextPattern::ReplaceAll(std::string_view text,
                                                    std::string_view content) const {
  CLEAVE_ASSIGN_OR_RETURN(auto matches, FindAll(text));
  if (matches.empty()) return std::string(text);
  std::string out;
  out.reserve(text.size() + matches.size() * content.size());
  size_t prev = 0;
  for (const auto& [b, e] : matches) {
    out.append(text.substr(prev, b - prev));
    out.append(content);
    prev = e;
  }
  out.append(text.substr(prev));
  return out;
}

std::unique_ptr<Normalizer> MakeSequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts) {
  return std::make_unique<SequenceNormalizer>(std::move(parts));
}
std::unique_ptr<Normalizer> MakePrependNormalizer(std::string prefix) {
  return std::make_unique<PrependNormalizer>(std::move(prefix));
}
std::unique_ptr<Normalizer> MakeReplaceNormalizer(TextPattern pattern, std::string content) {
  return std::make_unique<ReplaceNormalizer>(std::move(pattern), std::move(content));
}
std::unique_ptr<Normalizer> MakeStripNormalizer(bool left, bool right) {
  return std::make_unique<StripNormalizer>(left, right);
}

std::unique_ptr<PreTokenizer> MakeSequencePreTokenizer(
    std::vector<std::unique_ptr<PreTokenizer>> parts) {
  return std::make_unique<SequencePreTokenizer>(std::move(parts));
}
std::unique_ptr<PreTokenizer> MakeSplitPreTokenizer(TextPattern pattern, SplitBehavior behavior,
                                                    bool invert) {
  return std::make_unique<SplitPreTokenizer>(std::move(pattern), behavior, invert);
}
absl::StatusOr<std::unique_ptr<PreTokenizer>> MakeByteLevelPreTokenizer(bool add_prefix_space,
                                                                        bool use_regex) {
  std::optional<TextPattern> regex;
  if (use_regex) {
    CLEAVE_ASSIGN_OR_RETURN(regex, TextPattern::Regex(kGpt2Pattern));
  }
  return std::make_unique<ByteLevelPreTokenizer>(add_prefix_space, std::move(regex));
}
std::unique_ptr<PreTokenizer> MakeMetaspacePreTokenizer(std::string replacement,
                                                        PrependScheme scheme, bool split) {
  return std::make_unique<MetaspacePreTokenizer>(std::move(replacement), scheme, split);
}
absl::StatusOr<std::unique_ptr<PreTokenizer>> MakeDigitsPreTokenizer(bool individual_digits) {
  // `tokenizers` tests char::is_numeric, i.e. the N categories.
  CLEAVE_ASSIGN_OR_RETURN(TextPattern digits,
                          TextPattern::Regex(individual_digits ? "\\p{N}" : "\\p{N}+"));
  return MakeSplitPreTokenizer(std::move(digits), SplitBehavior::kIsolated, false);
}

}  // namespace cleave::model
