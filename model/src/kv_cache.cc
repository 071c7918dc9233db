#include "cleave/model/kv_cache.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"

namespace cleave::model {

using kernels::DType;
using kernels::Tensor;

size_t KvBytesPerBlock(const ModelConfig& config, int block_size) {
  return 2ull * config.num_hidden_layers * block_size * config.kv_size() * sizeof(float);
}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const ModelConfig& config, int num_blocks,
                                                         int block_size, kernels::Backend& backend) {
  CLEAVE_CHECK_ARG(num_blocks > 0, "KV cache needs at least one block");
  CLEAVE_CHECK_ARG(block_size > 0, "KV block size must be positive");
  auto cache = std::unique_ptr<KvCache>(new KvCache());
  cache->num_blocks_ = num_blocks;
  cache->block_size_ = block_size;
  const int64_t hk = config.num_key_value_heads, dh = config.head_dim;
  const size_t layer_bytes = static_cast<size_t>(num_blocks) * block_size * hk * dh * sizeof(float);
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    for (int kv = 0; kv < 2; ++kv) {
      CLEAVE_ASSIGN_OR_RETURN(auto buf, backend.Allocate(layer_bytes));
      // Zeroed so a bug that reads an unwritten slot gives a stable wrong answer, not NaNs.
      if (backend.device().is_cpu()) std::memset(buf->data(), 0, layer_bytes);
      Tensor t(buf->data(), DType::kF32, {num_blocks, block_size, hk, dh}, backend.device());
      (kv == 0 ? cache->k_ : cache->v_).push_back(t);
      cache->buffers_.push_back(std::move(buf));
    }
  }
  return cache;
}

size_t KvCache::bytes() const {
  size_t n = 0;
  for (const auto& b : buffers_) n += b->size();
  return n;
}

BlockPool::BlockPool(int num_blocks) : num_blocks_(num_blocks) {
  free_.reserve(num_blocks);
  for (int i = num_blocks - 1; i >= 0; --i) free_.push_back(i);
}

absl::StatusOr<std::vector<int32_t>> BlockPool::Allocate(int n) {
  if (n < 0 || n > num_free()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("need ", n, " KV blocks, ", num_free(), " of ", num_blocks_, " free"));
  }
  std::vector<int32_t> out(free_.end() - n, free_.end());
  free_.resize(free_.size() - n);
  return out;
}

void BlockPool::Free(std::span<const int32_t> blocks) {
  for (int32_t b : blocks) free_.push_back(b);
}

}  // namespace cleave::model
