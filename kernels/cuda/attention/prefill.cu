// CUDA PagedAttentionPrefill (the tile kernel is described in prefill_kernel.cuh).
//
// Work list. Sequence b contributes ceil(q_len_b * group / kBM) row tiles per KV head, but q_len_b
// lives on the device. The grid therefore holds an upper bound of tiles, ceil(T * group / kBM) + B
// per KV head (each sequence wastes less than one tile), and PlanPrefillKernel, one block, writes the
// prefix sums tile_start[b] of the real counts; each tile block finds its sequence by binary search
// and the slots past the last tile exit at once. Within a sequence the tiles run last first, so
// the causal tiles that see the most keys start earliest.
//
// Blocking: the batch metadata is validated on the device (paged_attention.cuh) and the verdict is
// read back after the kernels, which synchronises the stream once.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_attention_ops.h"
#include "paged_attention.cuh"
#include "prefill_kernel.cuh"

namespace cleave::kernels::cuda {
namespace {

using attention::Batch;
using attention::PrefillParams;

constexpr int kPlanThreads = 1024;

// tile_start[b] = sum of the tile counts of sequences before b; tile_start[B] = all tiles. A
// sequence whose metadata cannot be followed (LoadSeqRange) gets no tiles. Block-wide
// Hillis-Steele scan, kPlanThreads sequences per round.
__global__ void __launch_bounds__(kPlanThreads) PlanPrefillKernel(Batch bt, int group, int tile_rows,
                                                                  int64_t* tile_start) {
  __shared__ int64_t scan[kPlanThreads];
  __shared__ int64_t carry;
  const int tid = threadIdx.x;
  if (tid == 0) carry = 0;
  __syncthreads();
  for (int base = 0; base < bt.num_seqs; base += kPlanThreads) {
    const int b = base + tid;
    int64_t count = 0;
    attention::SeqRange sr;
    if (b < bt.num_seqs && attention::LoadSeqRange(bt, b, &sr)) {
      count = (static_cast<int64_t>(sr.q_len) * group + tile_rows - 1) / tile_rows;
    }
    scan[tid] = count;
    __syncthreads();
    for (int offset = 1; offset < kPlanThreads; offset *= 2) {
      const int64_t add = tid >= offset ? scan[tid - offset] : 0;
      __syncthreads();
      scan[tid] += add;
      __syncthreads();
    }
    if (b < bt.num_seqs) tile_start[b] = carry + scan[tid] - count;
    __syncthreads();  // every thread has read carry
    if (tid == kPlanThreads - 1) carry += scan[tid];
    __syncthreads();
  }
  if (tid == 0) tile_start[bt.num_seqs] = carry;
}

absl::Status Launch(const PagedAttentionArgs& a, const attention::CallShape& cs, const Batch& bt, cudaStream_t s) {
  constexpr const char* kOp = "PagedAttentionPrefill";
  if (cs.num_seqs == 0 || cs.num_tokens == 0) return absl::OkStatus();  // no query to compute
  const int dh_pad = cs.head_dim <= 64 ? 64 : cs.head_dim <= 128 ? 128 : 256;
  const int tile_rows = attention::PrefillTileRows(dh_pad);
  const int64_t slots = (cs.num_tokens * cs.group + tile_rows - 1) / tile_rows + cs.num_seqs;
  if (slots > std::numeric_limits<int32_t>::max() || cs.num_kv_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": q ", a.q.DebugString(), " with k_cache ",
                                                   a.k_cache.DebugString(), " exceeds the CUDA grid"));
  }
  StreamScratch scratch(s);
  CLEAVE_RETURN_IF_ERROR(scratch.Allocate(static_cast<size_t>(cs.num_seqs + 1) * sizeof(int64_t)));
  PlanPrefillKernel<<<1, kPlanThreads, 0, s>>>(bt, static_cast<int>(cs.group), tile_rows, scratch.as<int64_t>());
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("PagedAttentionPrefill plan launch");

  PrefillParams p;
  p.batch = bt;
  p.tile_start = scratch.as<const int64_t>();
  attention::FillQueryKvOut(p, a, cs);
  const bool dh4 = cs.head_dim % 4 == 0;
  p.q_vec = dh4 && Aligned16(a.q.data()) && (cs.num_tokens <= 1 || a.q.stride(0) % 4 == 0) &&
            (cs.num_q_heads <= 1 || a.q.stride(1) % 4 == 0);
  const bool bf16 = cs.cache_dtype == DType::kBF16;
  const uintptr_t align = bf16 ? 8 : 16;
  p.kv_vec = dh4 && reinterpret_cast<uintptr_t>(a.k_cache.data()) % align == 0 &&
             reinterpret_cast<uintptr_t>(a.v_cache.data()) % align == 0;
  const unsigned int grid = static_cast<unsigned int>(slots);
  return bf16 ? attention::LaunchPrefillBf16(p, dh_pad, grid, s) : attention::LaunchPrefillF32(p, dh_pad, grid, s);
}

}  // namespace

// Blocking: synchronises `stream` to report bad batch metadata.
absl::Status PagedAttentionPrefill(const PagedAttentionArgs& args, Stream* stream) {
  return attention::RunChecked("PagedAttentionPrefill", args, stream, /*decode=*/false, Launch);
}

}  // namespace cleave::kernels::cuda
