#include "cleave/model/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"

namespace cleave::model {

using kernels::DType;
using kernels::Tensor;

size_t KvBytesPerBlock(const ModelConfig& config, int block_size) {
  return 2ull * config.num_layers_of(MixerKind::kAttention) * block_size * config.kv_size() *
         sizeof(float);
}

size_t ConvStateBytes(const ModelConfig& config) {
  return static_cast<size_t>(config.mamba.d_inner) * (config.mamba.d_conv - 1) * sizeof(float);
}

size_t SsmStateBytes(const ModelConfig& config) {
  return static_cast<size_t>(config.mamba.d_inner) * config.mamba.d_state * sizeof(float);
}

size_t StateBytesPerSlot(const ModelConfig& config) {
  return static_cast<size_t>(config.num_layers_of(MixerKind::kMamba)) *
         (ConvStateBytes(config) + SsmStateBytes(config));
}

namespace {

// One zeroed f32 pool: a bug that reads an unwritten slot gives a stable wrong answer, not NaNs.
absl::StatusOr<Tensor> Pool(kernels::Backend& backend, std::initializer_list<int64_t> shape,
                            std::vector<std::unique_ptr<kernels::Buffer>>& buffers) {
  size_t bytes = sizeof(float);
  for (int64_t d : shape) bytes *= static_cast<size_t>(d);
  CLEAVE_ASSIGN_OR_RETURN(auto buf, backend.Allocate(std::max<size_t>(bytes, 1)));
  CLEAVE_RETURN_IF_ERROR(backend.Zero(buf->data(), bytes, nullptr));
  Tensor t(buf->data(), DType::kF32, shape, backend.device());
  buffers.push_back(std::move(buf));
  return t;
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const ModelConfig& config, int num_blocks,
                                                         int block_size, kernels::Backend& backend,
                                                         int num_state_slots) {
  CLEAVE_CHECK_ARG(num_blocks > 0, "KV cache needs at least one block");
  CLEAVE_CHECK_ARG(block_size > 0, "KV block size must be positive");
  CLEAVE_CHECK_ARG(static_cast<int>(config.layer_mixer.size()) == config.num_hidden_layers,
                   "model config has no per-layer mixer kinds");
  const bool has_state = config.has_ssm_state();
  CLEAVE_CHECK_ARG(!has_state || num_state_slots > 0,
                   "a model with Mamba layers needs at least one state slot");
  auto cache = std::unique_ptr<KvCache>(new KvCache());
  cache->num_blocks_ = num_blocks;
  cache->block_size_ = block_size;
  cache->num_state_slots_ = has_state ? num_state_slots : 0;
  cache->device_ = backend.device();
  const int64_t hk = config.num_key_value_heads, dh = config.head_dim;
  const MambaConfig& m = config.mamba;
  const int n = config.num_hidden_layers;
  cache->k_.resize(n);
  cache->v_.resize(n);
  cache->conv_.resize(n);
  cache->ssm_.resize(n);
  for (int l = 0; l < n; ++l) {
    if (config.layer_mixer[l] == MixerKind::kAttention) {
      CLEAVE_ASSIGN_OR_RETURN(cache->k_[l], Pool(backend, {num_blocks, block_size, hk, dh}, cache->buffers_));
      CLEAVE_ASSIGN_OR_RETURN(cache->v_[l], Pool(backend, {num_blocks, block_size, hk, dh}, cache->buffers_));
    } else {
      CLEAVE_ASSIGN_OR_RETURN(cache->conv_[l], Pool(backend, {num_state_slots, m.d_inner, m.d_conv - 1},
                                                    cache->buffers_));
      CLEAVE_ASSIGN_OR_RETURN(cache->ssm_[l], Pool(backend, {num_state_slots, m.d_inner, m.d_state},
                                                   cache->buffers_));
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
