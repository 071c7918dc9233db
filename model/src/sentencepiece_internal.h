// Internals of the native SentencePiece reader (sentencepiece_adapter.cc): the loaded model as
// plain structs, the normalizer and the four segmentation algorithms. Private to model/src; the
// generated protobuf classes stay inside sentencepiece_adapter.cc.
//
// Behaviour follows the upstream C++ library (google/sentencepiece: normalizer.cc, bpe_model.cc,
// unigram_model.cc, word_model.cc, char_model.cc, sentencepiece_processor.cc) as of 0.2.x, the
// release the goldens come from, so ids and decoded text match what `sentencepiece` produces for
// the same .model file. (Debian's 0.1.97 differs only in corners: unigram ties and the
// user-defined-symbol bonus, models without <unk>, UNUSED pieces in WORD/CHAR models.)
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/string_view.h"

namespace cleave::model::spm_internal {

inline constexpr std::string_view kSpaceSymbol = "\xe2\x96\x81";  // U+2581, escaped ' '
inline constexpr std::string_view kReplacementUtf8 = "\xef\xbf\xbd";  // U+FFFD

// Debian's Abseil has its own absl::string_view class (not std::string_view), which is what
// the hash maps' heterogeneous lookup accepts.
inline absl::string_view Key(std::string_view s) { return {s.data(), s.size()}; }

// Upstream's string_util::OneCharLen: the length a UTF-8 lead byte announces (1 for stray
// continuation bytes). Callers clamp it to the bytes left.
inline int OneCharLen(char c) {
  return "\1\1\1\1\1\1\1\1\1\1\1\1\2\2\3\4"[static_cast<unsigned char>(c) >> 4];
}

// Upstream's IsValidDecodeUTF8: true when s starts with a well-formed UTF-8 character (length in
// *len); false with *len = 1 otherwise. s must not be empty.
bool DecodeOneUtf8(std::string_view s, size_t* len);

// A byte trie over piece strings, id at the end of each key. Plays the role of upstream's
// darts-clone tries (piece lookup, user-defined prefix matching, the unigram lattice).
class PieceTrie {
 public:
  static constexpr int kRoot = 0;
  PieceTrie() : values_(1, -1) {}
  void Insert(std::string_view key, int value);
  // The node reached from `node` by `byte`, or -1.
  int Next(int node, unsigned char byte) const {
    const auto it = edges_.find((static_cast<uint64_t>(node) << 8) | byte);
    return it == edges_.end() ? -1 : it->second;
  }
  int Value(int node) const { return values_[node]; }  // -1 when no key ends here
  bool empty() const { return values_.size() == 1; }

 private:
  std::vector<int> values_;
  absl::flat_hash_map<uint64_t, int> edges_;  // (node << 8 | byte) -> child
};

enum class PieceType { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5,
                       kByte = 6 };
enum class ModelKind { kUnigram = 1, kBpe = 2, kWord = 3, kChar = 4 };

// NormalizerSpec plus the decoded precompiled_charsmap: a darts-clone double array (read in
// place, every index bounds-checked, since the file is untrusted) whose values index NUL-
// terminated replacement strings.
struct Normalizer {
  bool add_dummy_prefix = true;
  bool remove_extra_whitespaces = true;
  bool escape_whitespaces = true;
  bool treat_whitespace_as_suffix = false;
  std::vector<uint32_t> trie;  // empty: identity (no character rules)
  std::string replacements;

  // Parses and validates precompiled_charsmap as upstream does (so every index a lookup can
  // reach is in bounds); false with *error on a malformed blob.
  bool LoadCharsMap(std::string_view blob, std::string* error);
  // The longest rule matching a prefix of input: (replacement, bytes consumed); consumed is 0
  // when no rule matches.
  std::pair<std::string_view, size_t> MatchRule(std::string_view input) const;
};

struct Model {
  ModelKind kind = ModelKind::kUnigram;
  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<PieceType> types;
  // As upstream: NORMAL / USER_DEFINED / UNUSED pieces take part in segmentation; the others
  // (UNKNOWN, CONTROL, BYTE) are reserved, found only by PieceToId. BPE keeps every piece in
  // normal_ids (upstream's use_reserved_id_map = false) and skips reserved ones when merging.
  absl::flat_hash_map<std::string, int> normal_ids;
  absl::flat_hash_map<std::string, int> reserved_ids;
  PieceTrie normal_trie;        // unigram lattice
  PieceTrie user_defined_trie;  // user-defined symbols, matched before anything else
  int unk_id = -1;              // the UNKNOWN piece; -1 only in a byte_fallback model
  int unk_piece_id = -1;        // upstream's processor-level unk_id() (by trainer_spec.unk_piece)
  bool byte_fallback = false;
  std::array<int, 256> byte_ids{};  // byte -> id of its <0xXX> piece, when byte_fallback
  float min_score = 0;              // over NORMAL pieces: the unigram <unk> score's base
  Normalizer normalizer;
  bool has_denormalizer = false;
  Normalizer denormalizer;
  std::string unk_surface;

  int PieceToIdNoReserved(std::string_view piece) const;  // unk_id when not a normal piece
  int PieceToId(std::string_view piece) const;            // reserved pieces too
  bool Is(int id, PieceType t) const {
    return id >= 0 && id < static_cast<int>(types.size()) && types[id] == t;
  }
  bool IsReserved(int id) const {
    return !Is(id, PieceType::kNormal) && !Is(id, PieceType::kUserDefined) &&
           !Is(id, PieceType::kUnused);
  }
  bool IsUnknown(int id) const { return id == unk_piece_id || Is(id, PieceType::kUnknown); }
  // Upstream's PrefixMatcher: the byte length of the longest user-defined symbol at the start
  // of s (*found = true), else of one UTF-8 character. s must not be empty.
  size_t PrefixMatch(std::string_view s, bool* found) const;
};

// One segment of normalized text and its piece id (before byte fallback / unknown merging).
using Segments = std::vector<std::pair<std::string_view, int>>;

// Text -> normalized text, as upstream's Normalizer::Normalize (the user-defined symbols of
// `model`, if given, bypass the character rules).
std::string Normalize(const Normalizer& n, const Model* model, std::string_view input);

Segments EncodeBpe(const Model& m, std::string_view normalized);
Segments EncodeUnigram(const Model& m, std::string_view normalized);
Segments EncodeWord(const Model& m, std::string_view normalized);
Segments EncodeChar(const Model& m, std::string_view normalized);

}  // namespace cleave::model::spm_internal
