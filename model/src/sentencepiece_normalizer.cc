// SentencePiece text normalization (upstream normalizer.cc): character rules from the model's
// precompiled_charsmap, then whitespace handling (dummy prefix, extra-space removal, ' ' -> ▁).
#include <cstring>

#include "sentencepiece_internal.h"

namespace cleave::model::spm_internal {

bool DecodeOneUtf8(std::string_view s, size_t* len) {
  // Upstream's DecodeUTF8 + IsValidDecodeUTF8: shortest form only, no surrogates, <= U+10FFFF.
  const auto b = [&](size_t i) { return static_cast<unsigned char>(s[i]); };
  const auto trail = [&](size_t i) { return (b(i) & 0xC0) == 0x80; };
  const auto valid_cp = [](uint32_t c) { return c < 0xD800 || (c >= 0xE000 && c <= 0x10FFFF); };
  const size_t n = s.size();
  *len = 1;
  if (b(0) < 0x80) return true;
  if (n >= 2 && (b(0) & 0xE0) == 0xC0) {
    const uint32_t cp = ((b(0) & 0x1Fu) << 6) | (b(1) & 0x3Fu);
    if (trail(1) && cp >= 0x80 && valid_cp(cp)) return *len = 2, true;
  } else if (n >= 3 && (b(0) & 0xF0) == 0xE0) {
    const uint32_t cp = ((b(0) & 0x0Fu) << 12) | ((b(1) & 0x3Fu) << 6) | (b(2) & 0x3Fu);
    if (trail(1) && trail(2) && cp >= 0x800 && valid_cp(cp)) return *len = 3, true;
  } else if (n >= 4 && (b(0) & 0xF8) == 0xF0) {
    const uint32_t cp = ((b(0) & 0x07u) << 18) | ((b(1) & 0x3Fu) << 12) |
                        ((b(2) & 0x3Fu) << 6) | (b(3) & 0x3Fu);
    if (trail(1) && trail(2) && trail(3) && cp >= 0x10000 && valid_cp(cp)) return *len = 4, true;
  }
  return false;
}

namespace {

// darts-clone's unit layout: bit 31 marks a leaf (value in the low 31 bits); otherwise bits 0-7
// are the label, bit 8 says a key ends here (its value in the unit at `offset`), bits 10-31 are
// the offset to the children (shifted 8 more when bit 9 is set).
uint32_t Label(uint32_t u) { return u & ((1u << 31) | 0xFF); }
bool HasLeaf(uint32_t u) { return (u >> 8) & 1; }
uint32_t Value(uint32_t u) { return u & ((1u << 31) - 1); }
uint32_t Offset(uint32_t u) { return (u >> 10) << ((u & (1u << 9)) >> 6); }

// Upstream's charsmap decode (size checks) and darts-clone's DoubleArray::validate: every
// child block a lookup can reach lies inside the array and every value indexes the strings.
bool ValidTrie(const std::vector<uint32_t>& a, size_t max_value) {
  if (a.empty() || Label(a[0]) != 0 || HasLeaf(a[0]) || Offset(a[0]) == 0 ||
      (Offset(a[0]) | 0xFF) >= a.size()) {
    return false;
  }
  for (size_t i = 1; i < a.size(); ++i) {
    if (Label(a[i]) <= 0xFF) {
      if (((i ^ Offset(a[i])) | 0xFF) >= a.size()) return false;
      if (HasLeaf(a[i]) && Label(a[i ^ Offset(a[i])]) <= 0xFF) return false;
    } else if (Value(a[i]) >= max_value) {
      return false;
    }
  }
  return true;
}

}  // namespace

bool Normalizer::LoadCharsMap(std::string_view blob, std::string* error) {
  trie.clear();
  replacements.clear();
  if (blob.empty()) return true;  // identity
  uint32_t trie_bytes = 0;
  if (blob.size() <= sizeof(trie_bytes)) {
    *error = "precompiled_charsmap is truncated";
    return false;
  }
  std::memcpy(&trie_bytes, blob.data(), sizeof(trie_bytes));  // little-endian, as x86 reads it
  blob.remove_prefix(sizeof(trie_bytes));
  if (trie_bytes >= blob.size() || trie_bytes < 1024 || trie_bytes % 1024 != 0 ||
      blob.back() != '\0') {
    *error = "precompiled_charsmap is malformed (trie size " + std::to_string(trie_bytes) +
             " of " + std::to_string(blob.size()) + " bytes)";
    return false;
  }
  trie.resize(trie_bytes / 4);
  std::memcpy(trie.data(), blob.data(), trie_bytes);
  replacements.assign(blob.substr(trie_bytes));
  if (!ValidTrie(trie, replacements.size())) {
    trie.clear();
    *error = "precompiled_charsmap is invalid (its trie fails validation)";
    return false;
  }
  return true;
}

std::pair<std::string_view, size_t> Normalizer::MatchRule(std::string_view input) const {
  // darts-clone commonPrefixSearch. Upstream keeps the longest of the first 32 matches.
  constexpr int kMaxResults = 32;
  if (trie.empty()) return {{}, 0};
  size_t pos = Offset(trie[0]);
  size_t best_len = 0;
  uint32_t best_value = 0;
  int results = 0;
  for (size_t i = 0; i < input.size() && results < kMaxResults; ++i) {
    const unsigned char c = static_cast<unsigned char>(input[i]);
    pos ^= c;
    if (pos >= trie.size() || Label(trie[pos]) != c) break;  // no longer a prefix of a rule
    const uint32_t unit = trie[pos];
    pos ^= Offset(unit);
    if (HasLeaf(unit)) {
      if (pos >= trie.size()) break;  // unreachable after validation; kept as a guard
      best_len = i + 1;
      best_value = Value(trie[pos]);
      ++results;
    }
  }
  if (best_len == 0 || best_value >= replacements.size()) return {{}, 0};
  std::string_view out(replacements);
  out.remove_prefix(best_value);
  return {out.substr(0, out.find('\0')), best_len};
}

namespace {

// Upstream's NormalizePrefix: user-defined symbols verbatim, else the longest character rule,
// else one UTF-8 character (a malformed byte becomes U+FFFD). Returns (output, bytes consumed).
std::pair<std::string_view, size_t> NormalizePrefix(const Normalizer& n, const Model* model,
                                                    std::string_view input) {
  if (model != nullptr && !model->user_defined_trie.empty()) {
    bool found = false;
    const size_t len = model->PrefixMatch(input, &found);
    if (found) return {input.substr(0, len), len};
  }
  if (auto rule = n.MatchRule(input); rule.second > 0) return rule;
  size_t len = 0;
  if (!DecodeOneUtf8(input, &len)) return {kReplacementUtf8, 1};
  return {input.substr(0, len), len};
}

bool EndsWith(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

}  // namespace

std::string Normalize(const Normalizer& n, const Model* model, std::string_view input) {
  std::string out;
  if (n.remove_extra_whitespaces) {  // leading whitespace goes
    while (!input.empty()) {
      const auto p = NormalizePrefix(n, model, input);
      if (p.first != " ") break;
      input.remove_prefix(p.second);
    }
  }
  if (input.empty()) return out;
  out.reserve(input.size() * 3);
  const std::string_view space = n.escape_whitespaces ? kSpaceSymbol : " ";
  // "world" and "hello world" both become "▁world..." so the word is one piece in both.
  if (!n.treat_whitespace_as_suffix && n.add_dummy_prefix) out += space;
  bool is_prev_space = n.remove_extra_whitespaces;
  while (!input.empty()) {
    const auto [piece, consumed] = NormalizePrefix(n, model, input);
    std::string_view sp = piece;
    // With remove_extra_whitespaces a run of spaces collapses to its first one.
    while (is_prev_space && !sp.empty() && sp.front() == ' ') sp.remove_prefix(1);
    if (!sp.empty()) {
      for (char c : sp) {
        if (c == ' ' && n.escape_whitespaces) {
          out += kSpaceSymbol;
        } else {
          out += c;
        }
      }
      is_prev_space = sp.back() == ' ';
    }
    input.remove_prefix(consumed);
    if (!n.remove_extra_whitespaces) is_prev_space = false;
  }
  if (n.remove_extra_whitespaces) {  // trailing whitespace goes
    while (EndsWith(out, space)) out.resize(out.size() - space.size());
  }
  if (n.treat_whitespace_as_suffix && n.add_dummy_prefix) out += space;
  return out;
}

}  // namespace cleave::model::spm_internal
