// SentencePiece segmentation of normalized text into pieces, one function per model type, each
// following its upstream counterpart (bpe_model.cc, unigram_model.cc's EncodeOptimized,
// word_model.cc, char_model.cc) down to tie-breaking, so ids match the reference library.
#include <algorithm>
#include <cstring>
#include <functional>
#include <queue>

#include "sentencepiece_internal.h"

namespace cleave::model::spm_internal {

void PieceTrie::Insert(std::string_view key, int value) {
  int node = kRoot;
  for (char c : key) {
    const uint64_t edge = (static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(c);
    auto [it, inserted] = edges_.try_emplace(edge, static_cast<int>(values_.size()));
    if (inserted) values_.push_back(-1);
    node = it->second;
  }
  values_[node] = value;
}

int Model::PieceToIdNoReserved(std::string_view piece) const {
  const auto it = normal_ids.find(Key(piece));
  return it != normal_ids.end() ? it->second : unk_id;
}

int Model::PieceToId(std::string_view piece) const {
  if (auto it = reserved_ids.find(Key(piece)); it != reserved_ids.end()) return it->second;
  return PieceToIdNoReserved(piece);
}

size_t Model::PrefixMatch(std::string_view s, bool* found) const {
  constexpr int kMaxResults = 64;  // upstream looks at the 64 shortest matches
  size_t longest = 0;
  int node = PieceTrie::kRoot;
  for (size_t i = 0, results = 0; i < s.size() && results < kMaxResults; ++i) {
    node = user_defined_trie.Next(node, static_cast<unsigned char>(s[i]));
    if (node < 0) break;
    if (user_defined_trie.Value(node) >= 0) {
      longest = i + 1;
      ++results;
    }
  }
  *found = longest > 0;
  if (*found) return longest;
  return std::min<size_t>(s.size(), OneCharLen(s[0]));
}

Segments EncodeBpe(const Model& m, std::string_view normalized) {
  struct Symbol {
    int prev, next;
    bool freeze;  // a user-defined symbol: never merged
    std::string_view piece;
  };
  struct Pair {
    float score;
    int left, right;
    size_t size;  // bytes of the merged piece; a mismatch later means the pair went stale
  };
  // Highest score first, the leftmost pair on equal scores. Upstream orders scores by their
  // bit patterns (a total order, NaN and -0 included); so do we.
  const auto worse = [](const Pair& a, const Pair& b) {
    int32_t i1, i2;
    std::memcpy(&i1, &a.score, 4);
    std::memcpy(&i2, &b.score, 4);
    if ((i1 & i2) < 0) return i1 > i2 || (i1 == i2 && a.left > b.left);  // both negative
    const bool less = (i1 ^ i2) < 0 ? i1 < 0 : i1 < i2;
    return less || (i1 == i2 && a.left > b.left);
  };
  std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> agenda(worse);
  std::vector<Symbol> symbols;
  // Merged UNUSED pieces are split back into what they were merged from (upstream's
  // resegmentation: an unused piece may be an intermediate merge but never an output).
  absl::flat_hash_map<absl::string_view, std::pair<std::string_view, std::string_view>> rev_merge;

  const auto maybe_add_pair = [&](int left, int right) {
    if (left == -1 || right == -1 || symbols[left].freeze || symbols[right].freeze) return;
    const std::string_view piece(symbols[left].piece.data(),
                                 symbols[left].piece.size() + symbols[right].piece.size());
    const int id = m.PieceToIdNoReserved(piece);
    if (id == m.unk_id || m.IsReserved(id)) return;  // only normal pieces are merge results
    agenda.push(Pair{m.scores[id], left, right, piece.size()});
    if (m.types[id] == PieceType::kUnused) {
      rev_merge[Key(piece)] = {symbols[left].piece, symbols[right].piece};
    }
  };

  // Characters (user-defined symbols as one unit).
  for (int index = 0; !normalized.empty(); ++index) {
    Symbol s;
    const size_t len = m.PrefixMatch(normalized, &s.freeze);
    s.piece = normalized.substr(0, len);
    s.prev = index - 1;
    normalized.remove_prefix(len);
    s.next = normalized.empty() ? -1 : index + 1;
    symbols.push_back(s);
  }
  if (symbols.empty()) return {};
  for (size_t i = 1; i < symbols.size(); ++i) maybe_add_pair(static_cast<int>(i) - 1, i);

  while (!agenda.empty()) {
    const Pair top = agenda.top();
    agenda.pop();
    Symbol& left = symbols[top.left];
    Symbol& right = symbols[top.right];
    if (left.piece.empty() || right.piece.empty() ||
        left.piece.size() + right.piece.size() != top.size) {
      continue;  // one side was merged away since this pair was queued
    }
    left.piece = std::string_view(left.piece.data(), left.piece.size() + right.piece.size());
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.left;
    right.piece = {};
    maybe_add_pair(left.prev, top.left);
    maybe_add_pair(top.left, left.next);
  }

  Segments out;
  constexpr int kMaxDepth = 100;  // upstream's bound on resegmentation (hostile merge chains)
  std::function<void(std::string_view, int)> resegment = [&](std::string_view w, int depth) {
    const int id = m.PieceToIdNoReserved(w);
    if (depth > kMaxDepth) {
      out.emplace_back(w, id);
    } else if (id == m.unk_id || m.IsReserved(id)) {
      out.emplace_back(w, m.unk_id);
    } else if (m.types[id] != PieceType::kUnused) {
      out.emplace_back(w, id);
    } else if (const auto it = rev_merge.find(Key(w)); it == rev_merge.end()) {
      out.emplace_back(w, m.unk_id);
    } else {
      resegment(it->second.first, depth + 1);
      resegment(it->second.second, depth + 1);
    }
  };
  for (int i = 0; i != -1; i = symbols[i].next) resegment(symbols[i].piece, 0);
  return out;
}

Segments EncodeUnigram(const Model& m, std::string_view normalized) {
  // Viterbi over the lattice of every vocabulary piece starting at every character, positions in
  // bytes (upstream's EncodeOptimized, its default encoder). A character no piece of one
  // character covers gets an <unk> node scored below every real piece. Scores are floats, added
  // in float, as upstream: exact ties then break the same way (first path found wins).
  struct Best {
    int id = -1;
    float score = 0;
    int starts_at = -1;
  };
  constexpr float kUnkPenalty = 10.0f;
  // Long inputs: path scores are re-based once they pass this, so floats keep their precision
  // (upstream does the same, and where it does changes which near-ties win).
  constexpr float kScoreResetThreshold = 100000.0f;
  const float unk_score = m.min_score - kUnkPenalty;
  const size_t size = normalized.size();
  std::vector<Best> best(size + 1);
  size_t max_frontier = 0;
  for (size_t start = 0; start < size;) {
    float score_here = best[start].score;
    if (score_here < -kScoreResetThreshold || score_here > kScoreResetThreshold) {
      const float offset = score_here;
      for (size_t i = start; i <= max_frontier; ++i) {
        if (i == start || best[i].starts_at != -1) best[i].score -= offset;
      }
      score_here = 0.0f;
    }
    const size_t mblen = std::min<size_t>(OneCharLen(normalized[start]), size - start);
    bool has_single_node = false;
    int node = PieceTrie::kRoot;
    for (size_t end = start; end < size;) {
      node = m.normal_trie.Next(node, static_cast<unsigned char>(normalized[end]));
      if (node < 0) break;
      ++end;
      const int id = m.normal_trie.Value(node);
      if (id < 0 || m.types[id] == PieceType::kUnused) continue;
      max_frontier = std::max(max_frontier, end);
      const size_t length = end - start;
      // User-defined symbols get a bonus so they are always chosen (upstream's
      // GetUserDefinedScore: 0.1 per byte beyond the first, as a float).
      const float score = m.types[id] == PieceType::kUserDefined
                              ? static_cast<float>(0.1 * (static_cast<int>(length) - 1))
                              : m.scores[id];
      const float candidate = score + score_here;
      Best& target = best[end];
      if (target.starts_at == -1 || candidate > target.score) {
        target = Best{id, candidate, static_cast<int>(start)};
      }
      if (length == mblen) has_single_node = true;
    }
    if (!has_single_node) {
      max_frontier = std::max(max_frontier, start + mblen);
      Best& target = best[start + mblen];
      const float candidate = unk_score + score_here;
      if (target.starts_at == -1 || candidate > target.score) {
        target = Best{m.unk_id, candidate, static_cast<int>(start)};
      }
    }
    start += mblen;
  }
  Segments out;
  for (size_t end = size; end > 0;) {
    const Best& b = best[end];
    out.emplace_back(normalized.substr(b.starts_at, end - b.starts_at), b.id);
    end = b.starts_at;
  }
  std::reverse(out.begin(), out.end());
  return out;
}

namespace {

// WORD and CHAR models look pieces up among normal pieces only; an UNUSED one is unknown.
int WordOrCharId(const Model& m, std::string_view w) {
  const int id = m.PieceToIdNoReserved(w);
  return id != m.unk_id && m.Is(id, PieceType::kUnused) ? m.unk_id : id;
}

}  // namespace

Segments EncodeWord(const Model& m, std::string_view text) {
  // Upstream's SplitIntoWords with its defaults: a word starts at the text's start and at every
  // "▁", which it keeps as its prefix. (Upstream's word model ignores
  // treat_whitespace_as_suffix / allow_whitespace_only_pieces here.)
  Segments out;
  const char* begin = text.data();
  const char* const end = text.data() + text.size();
  while (begin < end) {
    const size_t len = std::min<size_t>(OneCharLen(*begin), end - begin);
    if (begin == text.data() || std::string_view(begin, len) == kSpaceSymbol) {
      out.emplace_back(std::string_view(begin, 0), 0);
    }
    out.back().first = std::string_view(out.back().first.data(), out.back().first.size() + len);
    begin += len;
  }
  for (auto& [w, id] : out) id = WordOrCharId(m, w);
  return out;
}

Segments EncodeChar(const Model& m, std::string_view normalized) {
  Segments out;
  while (!normalized.empty()) {
    bool found = false;
    const size_t len = m.PrefixMatch(normalized, &found);
    out.emplace_back(normalized.substr(0, len), WordOrCharId(m, normalized.substr(0, len)));
    normalized.remove_prefix(len);
  }
  return out;
}

}  // namespace cleave::model::spm_internal
