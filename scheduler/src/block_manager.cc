#include "cleave/scheduler/block_manager.h"

#include <algorithm>

#include "cleave/scheduler/block_hash.h"

namespace cleave::scheduler {

BlockManager::BlockManager(int num_blocks, int block_size)
    : block_size_(block_size), blocks_(num_blocks) {
  free_.reserve(num_blocks);
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);
}

int BlockManager::MatchPrefix(std::span<const uint64_t> block_hashes,
                              std::span<const int32_t> tokens, int max_blocks,
                              std::vector<int32_t>* hit) const {
  const size_t limit = std::min<size_t>({static_cast<size_t>(std::max(max_blocks, 0)),
                                         block_hashes.size(), tokens.size() / block_size_});
  int found = 0;
  for (size_t i = 0; i < limit; ++i) {
    auto it = by_hash_.find(block_hashes[i]);
    if (it == by_hash_.end()) break;
    const int32_t b = it->second;
    const uint64_t parent = i == 0 ? kRootBlockHash : block_hashes[i - 1];
    if (blocks_[b].parent != parent) break;
    const int32_t* want = tokens.data() + i * block_size_;
    const int32_t* have = cached_tokens_.data() + static_cast<size_t>(b) * block_size_;
    if (!std::equal(want, want + block_size_, have)) break;
    hit->push_back(b);
    ++found;
  }
  return found;
}

int BlockManager::HeadroomAfter(std::span<const int32_t> shared, int num_total) const {
  int evictable_shared = 0;
  for (int32_t b : shared) evictable_shared += blocks_[b].refs == 0 ? 1 : 0;
  const int num_new = std::max(0, num_total - static_cast<int>(shared.size()));
  return num_free() - evictable_shared - num_new;
}

bool BlockManager::Allocate(std::span<const int32_t> shared, int num_new,
                            std::vector<int32_t>* table) {
  if (num_new < 0 || HeadroomAfter(shared, static_cast<int>(shared.size()) + num_new) < 0) {
    return false;
  }
  for (int32_t b : shared) {
    if (blocks_[b].refs++ == 0) LruUnlink(b);
    table->push_back(b);
  }
  for (int i = 0; i < num_new; ++i) {
    const int32_t b = TakeFreeBlock();
    blocks_[b].refs = 1;
    table->push_back(b);
  }
  return true;
}

void BlockManager::Free(std::span<const int32_t> blocks) {
  for (int32_t b : blocks) {
    if (b < 0 || b >= num_blocks() || blocks_[b].refs <= 0) {
      ++num_bad_frees_;
      continue;
    }
    if (--blocks_[b].refs > 0) continue;
    if (blocks_[b].cached) {
      LruPushBack(b);
    } else {
      free_.push_back(b);
    }
  }
}

void BlockManager::Cache(std::span<const uint64_t> block_hashes, std::span<const int32_t> tokens,
                         std::span<const int32_t> table, int first, int last) {
  if (cached_tokens_.empty()) {
    cached_tokens_.resize(static_cast<size_t>(num_blocks()) * block_size_);
  }
  last = std::min<int>({last, static_cast<int>(block_hashes.size()), static_cast<int>(table.size()),
                        static_cast<int>(tokens.size() / block_size_)});
  for (int i = std::max(first, 0); i < last; ++i) {
    const int32_t b = table[i];
    Block& block = blocks_[b];
    if (block.cached || block.refs <= 0) continue;
    auto [it, inserted] = by_hash_.try_emplace(block_hashes[i], b);
    if (!inserted) continue;  // the same prefix, computed twice: keep the older block
    block.cached = true;
    block.hash = block_hashes[i];
    block.parent = i == 0 ? kRootBlockHash : block_hashes[i - 1];
    std::copy_n(tokens.data() + static_cast<size_t>(i) * block_size_, block_size_,
                cached_tokens_.data() + static_cast<size_t>(b) * block_size_);
    ++num_cached_;
  }
}

int32_t BlockManager::TakeFreeBlock() {
  if (!free_.empty()) {
    const int32_t b = free_.back();
    free_.pop_back();
    return b;
  }
  const int32_t b = lru_head_;  // Allocate checked there is one
  LruUnlink(b);
  Uncache(b);
  return b;
}

void BlockManager::LruPushBack(int32_t b) {
  blocks_[b].lru_prev = lru_tail_;
  blocks_[b].lru_next = -1;
  if (lru_tail_ >= 0) {
    blocks_[lru_tail_].lru_next = b;
  } else {
    lru_head_ = b;
  }
  lru_tail_ = b;
  ++num_evictable_;
}

void BlockManager::LruUnlink(int32_t b) {
  Block& block = blocks_[b];
  if (block.lru_prev >= 0) {
    blocks_[block.lru_prev].lru_next = block.lru_next;
  } else {
    lru_head_ = block.lru_next;
  }
  if (block.lru_next >= 0) {
    blocks_[block.lru_next].lru_prev = block.lru_prev;
  } else {
    lru_tail_ = block.lru_prev;
  }
  block.lru_prev = block.lru_next = -1;
  --num_evictable_;
}

void BlockManager::Uncache(int32_t b) {
  Block& block = blocks_[b];
  auto it = by_hash_.find(block.hash);
  if (it != by_hash_.end() && it->second == b) by_hash_.erase(it);
  block.cached = false;
  --num_cached_;
}

}  // namespace cleave::scheduler
