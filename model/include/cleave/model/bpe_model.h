// BpeModel: the "model" stage of a Hugging Face BPE tokenizer — one pre-tokenized word in,
// token ids out — with the exact merge order of the `tokenizers` library (lowest merge rank
// first, leftmost on ties), byte fallback to <0xNN> tokens, <unk> fusing and ignore_merges.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace cleave::model {

struct BpeModelOptions {
  std::vector<std::pair<std::string, int32_t>> vocab;       // token -> id
  std::vector<std::pair<std::string, std::string>> merges;  // rank = index
  std::optional<std::string> unk_token;                     // must be in vocab when set
  bool fuse_unk = false;       // consecutive unknown characters become one <unk>
  bool byte_fallback = false;  // unknown characters become their UTF-8 bytes as <0xNN> tokens
  bool ignore_merges = false;  // a word that is itself in the vocab maps to it directly (Llama-3)
};

// Immutable after Create; Tokenize is thread-safe (the word cache takes a lock).
class BpeModel {
 public:
  // InvalidArgument when a merge names a token not in the vocab, the merged token is missing,
  // ids are negative or implausibly sparse, or unk_token is not in the vocab.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<BpeModel>> Create(BpeModelOptions options);

  // Appends the ids for `word` (already normalized and pre-tokenized) to `ids`.
  void Tokenize(std::string_view word, std::vector<int32_t>* ids) const;

  std::optional<int32_t> TokenToId(std::string_view token) const;
  // nullptr when no vocab entry has this id.
  const std::string* IdToToken(int32_t id) const;
  int32_t max_id() const { return static_cast<int32_t>(id_to_token_.size()) - 1; }

 private:
  struct MergeRule {
    int32_t rank;
    int32_t new_id;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  BpeModel() = default;
  // Initial symbols of a word (characters, byte-fallback bytes, <unk>s), then merged.
  std::vector<int32_t> MergeWord(std::string_view word) const;
  void InitialSymbols(std::string_view word, std::vector<int32_t>* symbols) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_token_;
  absl::flat_hash_map<uint64_t, MergeRule> merges_;
  int32_t unk_id_ = -1;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  int32_t byte_ids_[256];  // <0xNN> ids when byte_fallback is on and all 256 exist, else -1

  // Words seen before: BPE on a word is pure, and text repeats words a lot. Bounded; once full it
  // stops growing rather than evicting (as `tokenizers` does).
  mutable std::shared_mutex cache_mu_;
  mutable absl::flat_hash_map<std::string, std::vector<int32_t>> cache_;
};

}  // namespace cleave::model
