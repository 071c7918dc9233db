// The per-request state of one worker: for each attention layer, K and V pools of fixed-size
// blocks (paged KV); for each Mamba layer, a pool of state slots (one per running request) holding
// that layer's conv state and SSM state. A request owns blocks and, for models with Mamba layers,
// one slot index that is the same in every Mamba layer.
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

// Owns the cache memory. Attention layer l's K and V are f32 [num_blocks, block_size, Hk, Dh];
// Mamba layer l's conv state is f32 [num_state_slots, d_inner, d_conv - 1] and its SSM state f32
// [num_state_slots, d_inner, d_state]. A layer's tensors of the other kind are empty. Which blocks
// and slots belong to which request is not known here: that is the block manager's business (the
// scheduler in serving, BlockPool in offline generation). Not thread-safe; one forward pass at a
// time writes it.
class KvCache {
 public:
  // num_state_slots is ignored (0 slots) for models without Mamba layers and must be >= 1 for
  // models with them.
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(const ModelConfig& config, int num_blocks,
                                                         int block_size, kernels::Backend& backend,
                                                         int num_state_slots = 0);

  kernels::Tensor k(int layer) const { return k_[layer]; }
  kernels::Tensor v(int layer) const { return v_[layer]; }
  kernels::Tensor conv_state(int layer) const { return conv_[layer]; }
  kernels::Tensor ssm_state(int layer) const { return ssm_[layer]; }
  bool is_attention(int layer) const { return !k_[layer].empty(); }
  bool is_mamba(int layer) const { return !ssm_[layer].empty(); }
  int num_layers() const { return static_cast<int>(k_.size()); }
  int num_blocks() const { return num_blocks_; }
  int block_size() const { return block_size_; }
  int num_state_slots() const { return num_state_slots_; }
  // Where the pools live (the backend's device given to Create).
  kernels::Device device() const { return device_; }
  size_t bytes() const;

 private:
  KvCache() = default;
  int num_blocks_ = 0;
  int block_size_ = 0;
  int num_state_slots_ = 0;
  kernels::Device device_ = kernels::Device::Cpu();
  std::vector<std::unique_ptr<kernels::Buffer>> buffers_;
  std::vector<kernels::Tensor> k_, v_, conv_, ssm_;
};

// Bytes one block takes across all attention layers (K and V), for sizing a cache from a memory
// budget; 0 for a model without attention.
size_t KvBytesPerBlock(const ModelConfig& config, int block_size);
// Bytes of one slot's conv state (f32 [d_inner, d_conv - 1]) and SSM state (f32 [d_inner,
// d_state]) in one Mamba layer, and across all Mamba layers (0 without Mamba layers).
size_t ConvStateBytes(const ModelConfig& config);
size_t SsmStateBytes(const ModelConfig& config);
size_t StateBytesPerSlot(const ModelConfig& config);

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
