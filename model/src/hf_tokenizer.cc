#include "cleave/model/hf_tokenizer.h"

#include <algorithm>
#include <array>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/model/unicode_text.h"

namespace cleave::model {
namespace {

// Ids index per-token tables elsewhere in cleave (logits, embeddings); anything beyond this is
// a broken file, not a real vocabulary.
constexpr int32_t kMaxTokenId = 1 << 24;

absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// A stretch of text: either plain text or one added token.
struct Segment {
  size_t begin, end;
  int32_t token_id;  // -1 for plain text
};

// Finds added tokens in text: leftmost match first, the longest one starting there (what
// `tokenizers` gets from aho-corasick with MatchKind::LeftmostLongest), via a byte trie.
class AddedTokenMatcher {
 public:
  // `pattern` is what to look for: the content, or its normalized form for normalized tokens.
  void Add(const AddedTokenSpec* token, const std::string& pattern) {
    if (pattern.empty()) return;
    int32_t node = 0;
    for (char c : pattern) {
      const auto byte = static_cast<uint8_t>(c);
      int32_t next = Child(node, byte);
      if (next < 0) {
        next = static_cast<int32_t>(nodes_.size());
        if (node == 0) root_[byte] = next;
        nodes_[node].children.emplace_back(byte, next);
        nodes_.emplace_back();
      }
      node = next;
    }
    nodes_[node].token = token;  // a later duplicate wins, as in `tokenizers`
    any_single_word_ |= token->single_word;
  }
  bool empty() const { return nodes_.size() == 1; }
  bool any_single_word() const { return any_single_word_; }

  // Splits `text` into plain-text and added-token segments covering it.
  absl::StatusOr<std::vector<Segment>> Split(std::string_view text,
                                             const TextRegex* word_char) const;

 private:
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> children;
    const AddedTokenSpec* token = nullptr;
  };
  // Longest token starting at text[pos]; its length in `len`.
  const AddedTokenSpec* LongestAt(std::string_view text, size_t pos, size_t* len) const {
    const AddedTokenSpec* best = nullptr;
    int32_t node = 0;
    for (size_t i = pos; i < text.size(); ++i) {
      node = Child(node, static_cast<uint8_t>(text[i]));
      if (node < 0) break;
      if (nodes_[node].token != nullptr) {
        best = nodes_[node].token;
        *len = i + 1 - pos;
      }
    }
    return best;
  }

  // -1 when absent. The root, tried at every byte of the text, has a direct table.
  int32_t Child(int32_t node, uint8_t byte) const {
    if (node == 0) return root_[byte];
    for (const auto& [b, next] : nodes_[node].children) {
      if (b == byte) return next;
    }
    return -1;
  }

  std::vector<Node> nodes_ = std::vector<Node>(1);
  std::array<int32_t, 256> root_ = MakeEmptyRoot();
  bool any_single_word_ = false;

  static std::array<int32_t, 256> MakeEmptyRoot() {
    std::array<int32_t, 256> root;
    root.fill(-1);
    return root;
  }
};

// Whether the character ending at / starting at a position is a regex word character (what
// `tokenizers` checks for single_word tokens).
absl::StatusOr<bool> IsWordChar(const TextRegex& word_char, std::string_view text, size_t pos,
                                bool before) {
  size_t start = pos;
  if (before) {
    if (pos == 0) return false;
    start = pos - 1;
    while (start > 0 && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
  } else if (pos >= text.size()) {
    return false;
  }
  char32_t cp;
  const int len = DecodeUtf8(text, start, &cp);
  if (len == 0) return false;
  CLEAVE_ASSIGN_OR_RETURN(auto m, word_char.FindAll(text.substr(start, len)));
  return !m.empty();
}

size_t SkipWhitespaceLeft(std::string_view text, size_t pos, size_t floor) {
  while (pos > floor) {
    size_t start = pos - 1;
    while (start > floor && (static_cast<uint8_t>(text[start]) & 0xC0) == 0x80) --start;
    char32_t cp;
    if (DecodeUtf8(text, start, &cp) == 0 || !IsUnicodeWhitespace(cp)) break;
    pos = start;
  }
  return pos;
}

size_t SkipWhitespaceRight(std::string_view text, size_t pos) {
  char32_t cp;
  while (pos < text.size()) {
    const int len = DecodeUtf8(text, pos, &cp);
    if (len == 0 || !IsUnicodeWhitespace(cp)) break;
    pos += len;
  }
  return pos;
}

absl::StatusOr<std::vector<Segment>> AddedTokenMatcher::Split(std::string_view text,
                                                              const TextRegex* word_char) const {
  std::vector<Segment> out;
  size_t emitted = 0;  // text before this is already in `out`
  size_t pos = 0;
  while (pos < text.size() && !empty()) {
    size_t len = 0;
    const AddedTokenSpec* token = LongestAt(text, pos, &len);
    if (token == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos, stop = pos + len;
    pos = stop;  // the search resumes after the raw match even if it is rejected below
    if (token->single_word && word_char != nullptr) {
      CLEAVE_ASSIGN_OR_RETURN(bool word_before, IsWordChar(*word_char, text, start, true));
      CLEAVE_ASSIGN_OR_RETURN(bool word_after, IsWordChar(*word_char, text, stop, false));
      if (word_before || word_after) continue;
    }
    if (token->lstrip) start = SkipWhitespaceLeft(text, start, emitted);
    if (token->rstrip) stop = SkipWhitespaceRight(text, stop);
    if (emitted < start) out.push_back({emitted, start, -1});
    out.push_back({start, stop, token->id});
    emitted = stop;
    pos = std::max(pos, stop);
  }
  if (emitted < text.size()) out.push_back({emitted, text.size(), -1});
  return out;
}

class HfTokenizer : public Tokenizer {
 public:
  static absl::StatusOr<std::unique_ptr<HfTokenizer>> Create(HfTokenizerParts parts);

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos) const override;
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids,
                                     bool skip_special_tokens) const override;
  int vocab_size() const override { return vocab_size_; }
  int32_t bos_id() const override { return bos_id_; }
  int32_t eos_id() const override { return eos_id_; }
  bool IsSpecial(int32_t id) const override {
    auto it = added_by_id_.find(id);
    return it != added_by_id_.end() && it->second.spec->special;
  }
  std::optional<int32_t> TokenId(std::string_view token) const override {
    auto it = added_by_content_.find(AbslView(token));
    if (it != added_by_content_.end()) return it->second->id;
    return model_->TokenToId(token);
  }

 private:
  HfTokenizer() = default;
  // Encodes a stretch of text holding no raw added token; at_origin: it starts the input.
  absl::Status EncodePlain(std::string_view text, bool at_origin, std::vector<int32_t>* ids) const;

  struct AddedEntry {
    const AddedTokenSpec* spec;
    // What Decode feeds the decoder: the content, normalized for normalized tokens (what
    // `tokenizers` id_to_token returns, so "▁ab▁c" for "ab c" under Llama-2's normalizer).
    std::string surface;
  };
  std::vector<AddedTokenSpec> added_;  // stable storage; the maps point into it
  absl::flat_hash_map<int32_t, AddedEntry> added_by_id_;
  absl::flat_hash_map<std::string, const AddedTokenSpec*> added_by_content_;
  AddedTokenMatcher raw_matcher_;         // tokens with normalized == false
  AddedTokenMatcher normalized_matcher_;  // tokens with normalized == true
  std::unique_ptr<TextRegex> word_char_;  // only when some token is single_word
  std::unique_ptr<Normalizer> normalizer_;
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  std::unique_ptr<BpeModel> model_;
  std::unique_ptr<Decoder> decoder_;
  int vocab_size_ = 0;
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
};

absl::StatusOr<std::unique_ptr<HfTokenizer>> HfTokenizer::Create(HfTokenizerParts parts) {
  if (parts.model == nullptr) return absl::InvalidArgumentError("tokenizer has no model");
  auto tok = std::unique_ptr<HfTokenizer>(new HfTokenizer());
  tok->normalizer_ = std::move(parts.normalizer);
  tok->pre_tokenizer_ = std::move(parts.pre_tokenizer);
  tok->model_ = std::move(parts.model);
  tok->decoder_ = std::move(parts.decoder);
  tok->added_ = std::move(parts.added_tokens);
  int32_t max_id = tok->model_->max_id();
  for (const AddedTokenSpec& t : tok->added_) {
    if (t.id < 0 || t.id >= kMaxTokenId) {
      return absl::InvalidArgumentError(absl::StrCat("added token id ", t.id, " is out of range"));
    }
    max_id = std::max(max_id, t.id);
    std::string surface = t.content;
    if (t.normalized && tok->normalizer_ != nullptr) {
      CLEAVE_RETURN_IF_ERROR(tok->normalizer_->Normalize(&surface));
    }
    // Normalized tokens are looked for in normalized text, so their pattern is normalized too.
    if (!t.content.empty()) {
      (t.normalized ? tok->normalized_matcher_ : tok->raw_matcher_).Add(&t, surface);
    }
    // Later entries win, as in `tokenizers` (HashMap inserts).
    tok->added_by_id_[t.id] = AddedEntry{&t, std::move(surface)};
    tok->added_by_content_[t.content] = &t;
  }
  tok->vocab_size_ = max_id + 1;
  if (tok->vocab_size_ == 0) return absl::InvalidArgumentError("tokenizer has no tokens");
  if (tok->raw_matcher_.any_single_word() || tok->normalized_matcher_.any_single_word()) {
    // regex-syntax's \w, which `tokenizers` uses for the single_word boundary test.
    CLEAVE_ASSIGN_OR_RETURN(
        tok->word_char_,
        TextRegex::Compile("[\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}]"));
  }
  auto resolve = [&](const std::optional<std::string>& content,
                     const char* what) -> absl::StatusOr<int32_t> {
    if (!content) return -1;
    auto id = tok->TokenId(*content);
    if (!id) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " token \"", *content, "\" is not in the vocabulary"));
    }
    return *id;
  };
  CLEAVE_ASSIGN_OR_RETURN(tok->bos_id_, resolve(parts.bos_token, "BOS"));
  CLEAVE_ASSIGN_OR_RETURN(tok->eos_id_, resolve(parts.eos_token, "EOS"));
  return tok;
}

absl::Status HfTokenizer::EncodePlain(std::string_view text, bool at_origin,
                                      std::vector<int32_t>* ids) const {
  std::string normalized(text);
  if (normalizer_ != nullptr) CLEAVE_RETURN_IF_ERROR(normalizer_->Normalize(&normalized));
  CLEAVE_ASSIGN_OR_RETURN(auto segments, normalized_matcher_.Split(normalized, word_char_.get()));
  std::vector<TextPiece> pieces;
  for (const Segment& seg : segments) {
    if (seg.token_id >= 0) {
      ids->push_back(seg.token_id);
      continue;
    }
    pieces.clear();
    pieces.push_back(
        {normalized.substr(seg.begin, seg.end - seg.begin), at_origin && seg.begin == 0});
    if (pre_tokenizer_ != nullptr) CLEAVE_RETURN_IF_ERROR(pre_tokenizer_->PreTokenize(&pieces));
    for (const TextPiece& p : pieces) model_->Tokenize(p.text, ids);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> HfTokenizer::Encode(std::string_view text,
                                                         bool add_bos) const {
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("text to encode is not valid UTF-8");
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 2);
  if (add_bos && bos_id_ >= 0) ids.push_back(bos_id_);
  CLEAVE_ASSIGN_OR_RETURN(auto segments, raw_matcher_.Split(text, word_char_.get()));
  for (const Segment& seg : segments) {
    if (seg.token_id >= 0) {
      ids.push_back(seg.token_id);
      continue;
    }
    CLEAVE_RETURN_IF_ERROR(
        EncodePlain(text.substr(seg.begin, seg.end - seg.begin), seg.begin == 0, &ids));
  }
  return ids;
}

absl::StatusOr<std::string> HfTokenizer::Decode(std::span<const int32_t> ids,
                                                bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (auto it = added_by_id_.find(id); it != added_by_id_.end()) {
      if (!(skip_special_tokens && it->second.spec->special)) tokens.push_back(it->second.surface);
      continue;
    }
    const std::string* token = model_->IdToToken(id);
    if (token == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is not in the vocabulary"));
    }
    tokens.push_back(*token);
  }
  if (decoder_ == nullptr) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) absl::StrAppend(&out, i ? " " : "", tokens[i]);
    return out;
  }
  CLEAVE_RETURN_IF_ERROR(decoder_->Decode(&tokens));
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> CreateHfTokenizer(HfTokenizerParts parts) {
  CLEAVE_ASSIGN_OR_RETURN(auto tok, HfTokenizer::Create(std::move(parts)));
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace cleave::model
