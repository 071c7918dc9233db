#include "cleave/model/bpe_model.h"

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <queue>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/model/unicode_text.h"

namespace cleave::model {
namespace {

constexpr size_t kCacheCapacity = 10000;
constexpr size_t kMaxCachedWordBytes = 256;

absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// A pending merge. Ordered so the priority queue pops the lowest rank, then the leftmost
// position — the order `tokenizers` merges in, which parity depends on.
struct MergeCandidate {
  int32_t rank;
  int32_t pos;
  int32_t new_id;
  bool operator<(const MergeCandidate& o) const {
    return rank != o.rank ? rank > o.rank : pos > o.pos;
  }
};

struct Symbol {
  int32_t id;
  int32_t prev;
  int32_t next;
  bool alive;
};

}  // namespace

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::Create(BpeModelOptions options) {
  auto model = std::unique_ptr<BpeModel>(new BpeModel());
  int64_t max_id = -1;
  for (const auto& [token, id] : options.vocab) {
    if (id < 0)
      return absl::InvalidArgumentError(absl::StrCat("BPE vocab id ", id, " is negative"));
    max_id = std::max<int64_t>(max_id, id);
  }
  // Ids index a table; a hostile file with one id of 2^31 must not allocate gigabytes.
  if (max_id >= 2 * static_cast<int64_t>(options.vocab.size()) + 1024) {
    return absl::InvalidArgumentError(absl::StrCat(
        "BPE vocab ids are too sparse: ", options.vocab.size(), " tokens, max id ", max_id));
  }
  model->id_to_token_.resize(max_id + 1);
  model->has_token_.assign(max_id + 1, false);
  model->vocab_.reserve(options.vocab.size());
  for (auto& [token, id] : options.vocab) {
    if (!model->has_token_[id]) {
      model->has_token_[id] = true;
      model->id_to_token_[id] = token;
    }
    model->vocab_.emplace(std::move(token), id);
  }

  model->merges_.reserve(options.merges.size());
  for (size_t rank = 0; rank < options.merges.size(); ++rank) {
    const auto& [a, b] = options.merges[rank];
    auto ia = model->TokenToId(a), ib = model->TokenToId(b), inew = model->TokenToId(a + b);
    if (!ia || !ib) {
      return absl::InvalidArgumentError(absl::StrCat("BPE merge ", rank, " (\"", a, "\" \"", b,
                                                     "\") names a token not in the vocab"));
    }
    if (!inew) {
      return absl::InvalidArgumentError(
          absl::StrCat("BPE merge ", rank, " produces \"", a, b, "\", which is not in the vocab"));
    }
    // A later duplicate overrides an earlier one, as in `tokenizers` (it builds a HashMap).
    model->merges_[PairKey(*ia, *ib)] = MergeRule{static_cast<int32_t>(rank), *inew};
  }

  if (options.unk_token) {
    auto unk = model->TokenToId(*options.unk_token);
    if (!unk) {
      return absl::InvalidArgumentError(
          absl::StrCat("BPE unk_token \"", *options.unk_token, "\" is not in the vocab"));
    }
    model->unk_id_ = *unk;
  }
  model->fuse_unk_ = options.fuse_unk;
  model->ignore_merges_ = options.ignore_merges;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto id = options.byte_fallback ? model->TokenToId(name) : std::nullopt;
    model->byte_ids_[b] = id ? *id : -1;
  }
  return model;
}

std::optional<int32_t> BpeModel::TokenToId(std::string_view token) const {
  auto it = vocab_.find(AbslView(token));
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* BpeModel::IdToToken(int32_t id) const {
  if (id < 0 || id >= static_cast<int32_t>(id_to_token_.size()) || !has_token_[id]) return nullptr;
  return &id_to_token_[id];
}

void BpeModel::InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const {
  // Mirrors tokenizers' BPE::merge_word, quirks included: a pending <unk> is not flushed before
  // byte-fallback tokens, so it lands after them.
  bool unk_pending = false;
  size_t pos = 0;
  while (pos < word.size()) {
    char32_t cp;
    int len = DecodeUtf8(word, pos, &cp);
    if (len == 0) len = 1;  // cannot happen for validated text; keep going rather than loop
    const std::string_view ch = word.substr(pos, len);
    pos += len;
    if (auto id = TokenToId(ch)) {
      if (unk_pending) symbols->push_back(unk_id_);
      unk_pending = false;
      symbols->push_back(*id);
      continue;
    }
    const bool bytes_known = std::all_of(
        ch.begin(), ch.end(), [this](char c) { return byte_ids_[static_cast<uint8_t>(c)] >= 0; });
    if (bytes_known) {
      for (char c : ch) symbols->push_back(byte_ids_[static_cast<uint8_t>(c)]);
      continue;
    }
    if (unk_id_ < 0) continue;  // no <unk>: the character is dropped, as in `tokenizers`
    if (unk_pending && !fuse_unk_) symbols->push_back(unk_id_);
    unk_pending = true;
  }
  if (unk_pending) symbols->push_back(unk_id_);
}

std::vector<int32_t> BpeModel::MergeWord(std::string_view word) const {
  std::vector<int32_t> ids;
  InitialSymbols(word, &ids);
  const int32_t n = static_cast<int32_t>(ids.size());
  if (n < 2 || merges_.empty()) return ids;
  std::vector<Symbol> sym(n);
  for (int32_t i = 0; i < n; ++i) sym[i] = Symbol{ids[i], i - 1, i + 1 < n ? i + 1 : -1, true};

  auto rule_for = [this](int32_t a, int32_t b) -> const MergeRule* {
    auto it = merges_.find(PairKey(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  std::priority_queue<MergeCandidate> queue;
  for (int32_t i = 0; i + 1 < n; ++i) {
    if (const MergeRule* r = rule_for(sym[i].id, sym[i + 1].id))
      queue.push({r->rank, i, r->new_id});
  }
  while (!queue.empty()) {
    const MergeCandidate top = queue.top();
    queue.pop();
    Symbol& cur = sym[top.pos];
    if (!cur.alive || cur.next < 0) continue;
    const int32_t right_pos = cur.next;
    const Symbol right = sym[right_pos];
    // Stale entry: one side merged since it was queued.
    const MergeRule* r = rule_for(cur.id, right.id);
    if (r == nullptr || r->new_id != top.new_id) continue;
    cur.id = top.new_id;
    cur.next = right.next;
    sym[right_pos].alive = false;
    if (right.next >= 0) sym[right.next].prev = top.pos;
    if (cur.prev >= 0) {
      if (const MergeRule* p = rule_for(sym[cur.prev].id, cur.id)) {
        queue.push({p->rank, cur.prev, p->new_id});
      }
    }
    if (cur.next >= 0) {
      if (const MergeRule* q = rule_for(cur.id, sym[cur.next].id)) {
        queue.push({q->rank, top.pos, q->new_id});
      }
    }
  }
  ids.clear();
  for (int32_t i = 0; i >= 0; i = sym[i].next) ids.push_back(sym[i].id);
  return ids;
}

void BpeModel::Tokenize(std::string_view word, std::vector<int32_t>* ids) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    if (auto id = TokenToId(word)) {
      ids->push_back(*id);
      return;
    }
  }
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    std::shared_lock lock(cache_mu_);
    auto it = cache_.find(AbslView(word));
    if (it != cache_.end()) {
      ids->insert(ids->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> merged = MergeWord(word);
  ids->insert(ids->end(), merged.begin(), merged.end());
  if (cacheable) {
    std::unique_lock lock(cache_mu_);
    if (cache_.size() < kCacheCapacity) cache_.emplace(std::string(word), std::move(merged));
  }
}

}  // namespace cleave::model
