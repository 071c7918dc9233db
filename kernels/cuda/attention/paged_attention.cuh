// Internal to kernels/cuda/attention: what the three paged-attention ops share. The host-side
// argument checks (the CPU's messages, kernels/cpu/attention_plan.cc, with CUDA device rules and
// bf16 caches), the batch metadata as the kernels see it, and the device-side validation of that
// metadata, which the host reads back after the op's kernels (one stream synchronisation).
//
// Cache element types in device code: `float` (f32) or `uint16_t` (bf16 bits), as embedding.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_check.h"
#include "absl/status/status.h"
#include "cleave/kernels/attention.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cuda::attention {

// Per-thread registers and shared-memory tiles are sized for it; every current model fits.
constexpr int64_t kMaxHeadDim = 256;

// ---- Element conversions ----------------------------------------------------------------------

__device__ __forceinline__ float Widen(float x) { return x; }
// bf16 -> f32 is exact: the bits are the high half of the f32.
__device__ __forceinline__ float Widen(uint16_t x) { return __uint_as_float(static_cast<uint32_t>(x) << 16); }
// The low / high bf16 of a 32-bit word (little endian: element 2i is the low half).
__device__ __forceinline__ float Bf16Lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float Bf16Hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// F32ToBf16 of dtype.h, bit for bit: round to nearest even, NaN kept quiet.
__device__ __forceinline__ uint16_t ToBf16(float f) {
  uint32_t bits = __float_as_uint(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// ---- The batch ----------------------------------------------------------------------------------

// The varlen batch metadata (device pointers) and the cache geometry the kernels index with.
struct Batch {
  const int32_t* qsl = nullptr;           // [num_seqs + 1]
  const int32_t* seq_lens = nullptr;      // [num_seqs]
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks]
  int num_seqs = 0;
  int num_tokens = 0;
  int max_blocks = 0;  // block-table row length
  int block_size = 0;
  int window = 0;          // sliding window, 0: none
  int64_t num_blocks = 0;  // blocks in the cache
  int64_t max_kv = 0;      // max_blocks * block_size: no seq_len may exceed it
};

// First KV position a query at `pos` sees.
__host__ __device__ __forceinline__ int FirstVisible(int pos, int window) {
  return window > 0 ? (pos - window + 1 > 0 ? pos - window + 1 : 0) : 0;
}

// The cache row (block_id * block_size + offset) of sequence b's position `pos` (0 <= pos <
// max_kv, so the table read is in bounds), or -1 when the block id is outside the cache: bad
// metadata, which ValidateBatch reports; the kernels skip such positions.
__device__ __forceinline__ int64_t CacheRow(const Batch& bt, int b, int pos) {
  const int32_t id = bt.block_tables[static_cast<int64_t>(b) * bt.max_blocks + pos / bt.block_size];
  if (id < 0 || id >= bt.num_blocks) return -1;
  return static_cast<int64_t>(id) * bt.block_size + pos % bt.block_size;
}

// ---- Host side ---------------------------------------------------------------------------------


// A paged-attention call after CheckAttentionArgs: sizes as plain integers.
struct CallShape {
  Device device;
  int64_t num_tokens = 0, num_seqs = 0;
  int64_t num_q_heads = 0, num_kv_heads = 0, group = 0, head_dim = 0;
  DType cache_dtype = DType::kF32;
};

// k_cache / v_cache: f32 or bf16 [num_blocks, block_size, Hk, Dh] on `dev`, contiguous, same shape
// and dtype, block_size / Hk / Dh > 0, Dh <= kMaxHeadDim.
[[nodiscard]] absl::Status CheckCaches(const char* op, const Tensor& k_cache, const Tensor& v_cache, Device dev);

// Everything the CPU's CheckShapes checks (attention_plan.cc), on `out`'s CUDA device, plus the
// CUDA limits (head_dim, int ranges); decode also needs T == B. Reads no device memory.
[[nodiscard]] absl::Status CheckAttentionArgs(const char* op, const PagedAttentionArgs& a, Stream* stream,
                                              bool decode, CallShape* shape);

Batch MakeBatch(const PagedAttentionArgs& a);

// Checks every index the attention kernels follow, as the CPU's CheckBatchIndex does, on the
// device: lowers *bad to the first offending sequence (0 also for a query_start_loc that does not
// run from 0 to T). Asynchronous.
[[nodiscard]] absl::Status LaunchValidateBatch(const Batch& batch, bool decode, unsigned long long* bad,
                                               cudaStream_t stream);

// The CPU op's InvalidArgument message for the first bad sequence `first_bad` that ValidateBatch
// found: copies that sequence's metadata to the host (synchronises `stream`) and rechecks it there.
[[nodiscard]] absl::Status DescribeBadBatch(const char* op, const Batch& batch, bool decode, int64_t first_bad,
                                            cudaStream_t stream);

// The fields prefill and decode parameters share: q, the caches, out, their strides and the head
// geometry (both params structs name them alike).
template <typename Params>
void FillQueryKvOut(Params& p, const PagedAttentionArgs& a, const CallShape& cs) {
  p.q = a.q.data_as<const float>();
  p.q_stride_token = a.q.stride(0);
  p.q_stride_head = a.q.stride(1);
  p.k_cache = a.k_cache.data();
  p.v_cache = a.v_cache.data();
  p.pos_stride = cs.num_kv_heads * cs.head_dim;
  p.num_q_heads = static_cast<int>(cs.num_q_heads);
  p.num_kv_heads = static_cast<int>(cs.num_kv_heads);
  p.group = static_cast<int>(cs.group);
  p.head_dim = static_cast<int>(cs.head_dim);
  p.scale = a.scale;
  p.out = a.out.data_as<float>();
  p.out_stride_token = a.out.stride(0);
  p.out_stride_head = a.out.stride(1);
}

// One attention call, as both public ops run it: host checks, the device check of the batch
// metadata queued next to `launch`'s kernels, then the verdict read back (synchronises the
// stream) and turned into the CPU's message when something was out of range.
using LaunchFn = absl::Status (*)(const PagedAttentionArgs& a, const CallShape& cs, const Batch& bt,
                                  cudaStream_t s);
[[nodiscard]] absl::Status RunChecked(const char* op, const PagedAttentionArgs& args, Stream* stream, bool decode,
                                      LaunchFn launch);

}  // namespace cleave::kernels::cuda::attention
