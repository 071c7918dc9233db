// One worker's paged KV pool as the scheduler sees it: which blocks are free, which are held (and
// by how many requests: prefix-cache hits share blocks), and which hold a cached, reusable prefix.
//
// Block life:   free --Allocate--> used (refs >= 1) --Free, refs -> 0--> free
//                                   |  Cache (a full block whose KV is computed)
//                                   v
//               cached+used (refs >= 1) --Free, refs -> 0--> cached+evictable (LRU)
//               cached+evictable --hit (Allocate as shared)--> cached+used
//               cached+evictable --evicted by Allocate when no never-used block is left--> used
//
// Cached blocks are keyed by chained block hash (block_hash.h) and verified token by token on a
// hit, so a 64-bit collision can cost a hit but never hand out a wrong block.
// Not thread-safe: owned by SchedulerCore, called under its caller's lock.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace cleave::scheduler {

class BlockManager {
 public:
  BlockManager(int num_blocks, int block_size);

  int num_blocks() const { return static_cast<int>(blocks_.size()); }
  int block_size() const { return block_size_; }
  // Never used, or cached with no user (evictable).
  int num_free() const { return static_cast<int>(free_.size()) + num_evictable_; }
  // In the prefix cache, with or without users.
  int num_cached() const { return num_cached_; }
  // Held by at least one request.
  int num_used() const { return num_blocks() - num_free(); }
  int refs(int32_t block) const { return blocks_[block].refs; }
  bool is_cached(int32_t block) const { return blocks_[block].cached; }
  // Frees of a block with no reference (a caller bug); kept for tests, never fatal.
  int64_t num_bad_frees() const { return num_bad_frees_; }

  // Appends to *hit the leading blocks of a sequence found in the cache, at most max_blocks.
  // block_hashes: ExtendBlockHashes of `tokens`; only its full blocks are looked at. Takes no
  // reference: the blocks stay valid until the next Allocate. Returns the number found.
  int MatchPrefix(std::span<const uint64_t> block_hashes, std::span<const int32_t> tokens,
                  int max_blocks, std::vector<int32_t>* hit) const;

  // Free blocks left after a request takes `shared` (cached blocks, e.g. a MatchPrefix hit) and
  // enough new ones to hold num_total blocks. Negative: it does not fit.
  int HeadroomAfter(std::span<const int32_t> shared, int num_total) const;

  // Takes one reference on each of `shared`, then num_new fresh blocks (never-used first, then
  // the least recently used evictable ones), appending all to *table in that order. Returns false,
  // changing nothing, when too few blocks are free.
  [[nodiscard]] bool Allocate(std::span<const int32_t> shared, int num_new,
                              std::vector<int32_t>* table);

  // Drops one reference from each block; at zero a cached block becomes evictable (most
  // recently used end), any other becomes free.
  void Free(std::span<const int32_t> blocks);

  // Enters table[i], i in [first, last), in the prefix cache under block_hashes[i]; tokens holds
  // the sequence (at least last * block_size ids). The blocks must be held (refs > 0) and their KV
  // computed. Blocks already cached, or whose hash another block already holds, are skipped.
  void Cache(std::span<const uint64_t> block_hashes, std::span<const int32_t> tokens,
             std::span<const int32_t> table, int first, int last);

 private:
  struct Block {
    int32_t refs = 0;
    bool cached = false;
    int32_t lru_prev = -1;
    int32_t lru_next = -1;
    uint64_t hash = 0;
    uint64_t parent = 0;
  };

  int32_t TakeFreeBlock();
  void LruPushBack(int32_t b);
  void LruUnlink(int32_t b);
  void Uncache(int32_t b);

  const int block_size_;
  std::vector<Block> blocks_;
  std::vector<int32_t> free_;  // refs 0, not cached; a stack, block 0 on top at first
  int32_t lru_head_ = -1;      // oldest evictable block
  int32_t lru_tail_ = -1;
  int num_evictable_ = 0;
  int num_cached_ = 0;
  int64_t num_bad_frees_ = 0;
  absl::flat_hash_map<uint64_t, int32_t> by_hash_;
  std::vector<int32_t> cached_tokens_;  // block b's ids at [b * block_size, ...); lazily sized
};

}  // namespace cleave::scheduler
