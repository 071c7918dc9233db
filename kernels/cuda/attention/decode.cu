// CUDA PagedAttentionDecode: flash-decoding in two kernels (the partition kernel is described in
// decode_kernel.cuh), then DecodeReduceKernel merges the partitions of each (sequence, query head):
//   M = max_i m_i,  w_i = exp(m_i - M),  out = (sum_i w_i * acc_i) / (sum_i w_i * l_i)
// which is the CPU's pairwise FoldPartition up to rounding.
//
// Split policy. The host does not know the context lengths (seq_lens is on the device), only their
// bound max_kv = max_blocks_per_seq * block_size (and the sliding window). The grid holds, for each
// (sequence, KV head, query chunk), ceil(bound / P) partitions of P positions counted from the
// first visible position; a partition past its sequence's end exits at once. P is the largest of
// 512, 256, 128, 64 that still gives at least 8 blocks per SM, so a big batch reads long runs per
// block (batch 64 x 4096: 8 partitions, 4096 blocks) and a small one still fills the GPU. A grid of
// one partition (short contexts) writes `out` directly and skips the merge.
//
// Blocking: the batch metadata is validated on the device (paged_attention.cuh) and the verdict is
// read back after both kernels, which synchronises the stream once.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_attention_ops.h"
#include "decode_kernel.cuh"
#include "paged_attention.cuh"

namespace cleave::kernels::cuda {
namespace {

using attention::Batch;
using attention::DecodeParams;
using attention::DecodeSpan;
using attention::SpanOf;

constexpr int kReduceThreads = 128;

// One block per (sequence, query head), grid-stride; threads over head_dim.
__global__ void __launch_bounds__(kReduceThreads) DecodeReduceKernel(const DecodeParams p) {
  const int64_t pairs = static_cast<int64_t>(p.batch.num_seqs) * p.num_q_heads;
  for (int64_t bh = blockIdx.x; bh < pairs; bh += gridDim.x) {
    const int b = static_cast<int>(bh / p.num_q_heads);
    const int hq = static_cast<int>(bh % p.num_q_heads);
    const DecodeSpan sp = SpanOf(p, b);
    if (sp.parts <= 1) continue;  // written directly by its only partition (or not at all: bad data)
    const int64_t base = bh * p.num_parts;
    float m = -INFINITY;
    for (int i = 0; i < sp.parts; ++i) m = fmaxf(m, p.part_m[base + i]);
    float l = 0.0f;
    for (int i = 0; i < sp.parts; ++i) {
      const float mi = p.part_m[base + i];
      l += mi == -INFINITY ? 0.0f : p.part_l[base + i] * expf(mi - m);
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* out = p.out + static_cast<int64_t>(b) * p.out_stride_token + static_cast<int64_t>(hq) * p.out_stride_head;
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
      float acc = 0.0f;
      for (int i = 0; i < sp.parts; ++i) {
        const float mi = p.part_m[base + i];
        if (mi == -INFINITY) continue;
        acc = fmaf(p.part_acc[(base + i) * p.head_dim + d], expf(mi - m), acc);
      }
      out[d] = acc * inv;
    }
  }
}

// Query heads per block: the group, rounded up to a kernel instantiation (1, 2, 4, 8); larger
// groups take several blocks per KV head, 8 heads each.
int QueryChunk(int64_t group) { return group <= 1 ? 1 : group == 2 ? 2 : group <= 4 ? 4 : 8; }

int SmCount(int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
  return sms;
}

absl::Status Launch(const PagedAttentionArgs& a, const attention::CallShape& cs, const Batch& bt, cudaStream_t s) {
  constexpr const char* kOp = "PagedAttentionDecode";
  DecodeParams p;
  p.batch = bt;
  attention::FillQueryKvOut(p, a, cs);
  const int kg = QueryChunk(cs.group);
  p.q_chunks = static_cast<int>((cs.group + kg - 1) / kg);

  // Longest visible span any sequence can have (seq_len is an i32).
  int64_t span = std::min<int64_t>(bt.max_kv, std::numeric_limits<int32_t>::max());
  if (bt.window > 0) span = std::min<int64_t>(span, bt.window);
  if (span <= 0 || cs.num_seqs == 0) return absl::OkStatus();  // no valid sequence to compute
  const int64_t heads = cs.num_seqs * cs.num_kv_heads * p.q_chunks;
  const int64_t wanted = 8 * static_cast<int64_t>(SmCount(cs.device.index));
  int64_t partition = attention::kMaxPartition;
  while (partition > attention::kMinPartition && heads * ((span + partition - 1) / partition) < wanted) {
    partition /= 2;
  }
  p.partition = static_cast<int>(partition);
  const int64_t num_parts = (span + partition - 1) / partition;
  p.num_parts = static_cast<int>(num_parts);
  const int64_t blocks = heads * num_parts;
  if (blocks > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": ", blocks, " blocks (q ", a.q.DebugString(),
                                                   ", block_tables ", a.block_tables.DebugString(),
                                                   ") exceed the CUDA grid"));
  }

  StreamScratch scratch(s);
  if (num_parts > 1) {
    const int64_t states = cs.num_seqs * cs.num_q_heads * num_parts;
    CLEAVE_RETURN_IF_ERROR(scratch.Allocate(static_cast<size_t>(states * (2 + cs.head_dim)) * sizeof(float)));
    p.part_m = scratch.as<float>();
    p.part_l = p.part_m + states;
    p.part_acc = p.part_l + states;
  }
  const int esize = cs.cache_dtype == DType::kBF16 ? 2 : 4;
  const bool vec = Aligned16(a.k_cache.data()) && Aligned16(a.v_cache.data()) && (cs.head_dim * esize) % 16 == 0;
  if (cs.cache_dtype == DType::kBF16) {
    attention::LaunchDecodePartitionsBf16(p, kg, vec, static_cast<unsigned int>(blocks), s);
  } else {
    attention::LaunchDecodePartitionsF32(p, kg, vec, static_cast<unsigned int>(blocks), s);
  }
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("PagedAttentionDecode partition launch");
  if (num_parts > 1) {
    DecodeReduceKernel<<<GridFor(cs.num_seqs * cs.num_q_heads, 1, int64_t{1} << 30), kReduceThreads, 0, s>>>(p);
    CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("PagedAttentionDecode reduce launch");
  }
  return absl::OkStatus();
}

}  // namespace

// Blocking: synchronises `stream` to report bad batch metadata.
absl::Status PagedAttentionDecode(const PagedAttentionArgs& args, Stream* stream) {
  return attention::RunChecked("PagedAttentionDecode", args, stream, /*decode=*/true, Launch);
}

}  // namespace cleave::kernels::cuda
