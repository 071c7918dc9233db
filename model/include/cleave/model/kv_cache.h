// The paged KV cache of one worker: per layer, K and V pools of fixed-size blocks.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"
#include "cleave/model/config.h"

namespace cleave::model {

// Owns the cache memory. Layer l's K and V are f32 [num_blocks, block_size, Hk, Dh]. Which
// blocks belong to which request is not known here: that is the block manager's business
// (the scheduler in serving, BlockPool in offline generation). Not thread-safe; one forward pass
// at a time writes it.
class KvCache {
 public:
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const ModelConfig& config, int num_blocks,
                                                         int block_size, kernels::Backend& backend);

  kernels::Tensor k(int layer) const { return k_[layer]; }
  kernels::Tensor v(int layer) const { return v_[layer]; }
  int num_layers() const { return static_cast<int>(k_.size()); }
  int num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  size_t bytes() const;

 private:
  KvCache() = default;
  int num_blocks_ = 0;
  int block_size_ = 0;
  std::vector<std::unique_ptr<kernels::Buffer>> buffers_;
  std::vector<kernels::Tensor> k_, v_;
};

// Bytes one block takes across all layers (K and V), for sizing a cache from a memory budget.
size_t KvBytesPerBlock(const ModelConfig& config, int block_size);

// A free list of block ids, for offline generation and tests. LIFO so recently freed (cache-warm)
// blocks are reused first. Not thread-safe.
class BlockPool {
 public:
  explicit BlockPool(int num_blocks);
  // n blocks, or ResourceExhausted (and nothing taken) when fewer are free.
  absl::StatusOr<std::vector<int32_t>> Allocate(int n);
  void Free(std::span<const int32_t> blocks);
  int num_free() const { return static_cast<int>(free_.size()); }
  int num_blocks() const { return num_blocks_; }

 private:
  int num_blocks_;
  std::vector<int32_t> free_;
};

}  // namespace cleave::model
