// Internal to kernels/cuda/attention: the flash-attention tile kernel of PagedAttentionPrefill,
// instantiated once per cache dtype (prefill_f32.cu, prefill_bf16.cu).
//
// One block = (row tile, KV head h). A sequence's query rows for head h are its new tokens x the
// group's query heads, token-major (row r = token * group + g); a tile is kBM consecutive rows, so
// it may span several tokens and every head of the group shares each K/V tile it loads. The block
// walks the keys its rows may see, [first visible of its first token, last token's position], in
// tiles of kBN = 32 positions, keeping per-row (max, sum, output) online: nothing of size
// rows x keys is materialised beyond one 64 x 32 tile. Everything is f32 on the CUDA cores.
//
// 128 threads = 16 (ty) x 8 (tx). Thread (ty, tx) owns rows ty + 16 i (i < kRM) of the tile:
//   S:  columns tx + 8 j (j < 4) of the key tile, from Q and K in shared memory (float4 reads;
//       rows padded by 4 floats, so the 8 tx of a warp hit 8 distinct bank quads);
//   row max / sum: over the 8 tx lanes of the row (3 shuffles; they are one 8-lane group);
//   O:  columns 4 tx + 32 k (k < kDh / 32, 4 floats each): acc += P (shared) x V (shared).
// Q is staged once per block; K, V (widened to f32) once per key tile, read by every row.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/status/status.h"
#include "paged_attention.cuh"

namespace cleave::kernels::cuda::attention {

constexpr int kPrefillThreads = 128;
constexpr int kPrefillBN = 32;  // keys per tile

struct PrefillParams {
  Batch batch;
  // [B + 1]: sequence b's row tiles are grid slots [tile_start[b], tile_start[b + 1]) (PlanPrefill).
  const int64_t* tile_start = nullptr;
  const float* q = nullptr;  // [T, Hq, Dh], unit inner stride
  int64_t q_stride_token = 0, q_stride_head = 0;
  const void* k_cache = nullptr;  // float or bf16 bits, [num_blocks, block_size, Hk, Dh]
  const void* v_cache = nullptr;
  int64_t pos_stride = 0;  // Hk * Dh
  int num_q_heads = 0, num_kv_heads = 0, group = 0, head_dim = 0;
  float scale = 1.0f;
  float* out = nullptr;  // [T, Hq, Dh], unit inner stride
  int64_t out_stride_token = 0, out_stride_head = 0;
  bool q_vec = false;   // q rows 16-byte aligned, Dh % 4 == 0
  bool kv_vec = false;  // cache rows aligned for 4-element loads, Dh % 4 == 0
};

// Sequence b's new tokens, when its metadata can be followed safely: rows [q_start, q_start +
// q_len) of q / out, positions [seq_len - q_len, seq_len) within max_kv. False otherwise (reported by
// ValidateBatch); PlanPrefill gives such a sequence no tiles.
struct SeqRange {
  int q_start = 0, q_len = 0, seq_len = 0;
};

__device__ __forceinline__ bool LoadSeqRange(const Batch& bt, int b, SeqRange* s) {
  const int32_t qs = bt.qsl[b], qe = bt.qsl[b + 1], sl = bt.seq_lens[b];
  if (qs < 0 || qs > qe || qe > bt.num_tokens || qe - qs > sl || sl > bt.max_kv) return false;
  s->q_start = qs;
  s->q_len = qe - qs;
  s->seq_len = sl;
  return true;
}

// Query rows per tile: 64 (4 per thread), 32 at head_dim 256 to keep the accumulators in registers.
__host__ __device__ constexpr int PrefillTileRows(int dh_pad) { return dh_pad > 128 ? 32 : 64; }

// Elements [0, 4) of a row at src (fewer than 4 left: zeros past the end).
__device__ __forceinline__ float4 Load4(const float* src, bool vec, int left) {
  if (vec) return *reinterpret_cast<const float4*>(src);
  return make_float4(src[0], left > 1 ? src[1] : 0.0f, left > 2 ? src[2] : 0.0f, left > 3 ? src[3] : 0.0f);
}
__device__ __forceinline__ float4 Load4(const uint16_t* src, bool vec, int left) {
  if (vec) {
    const uint2 w = *reinterpret_cast<const uint2*>(src);
    return make_float4(Bf16Lo(w.x), Bf16Hi(w.x), Bf16Lo(w.y), Bf16Hi(w.y));
  }
  return make_float4(Widen(src[0]), left > 1 ? Widen(src[1]) : 0.0f, left > 2 ? Widen(src[2]) : 0.0f,
                     left > 3 ? Widen(src[3]) : 0.0f);
}

__device__ __forceinline__ float Comp(const float4& v, int e) { return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w; }

// Shared memory of one block, in floats.
__host__ __device__ constexpr int PrefillSmemFloats(int dh_pad) {
  return (PrefillTileRows(dh_pad) + 2 * kPrefillBN) * (dh_pad + 4) + PrefillTileRows(dh_pad) * (kPrefillBN + 4);
}

// kDh: head_dim rounded up to 64, 128 or 256 (padding columns are zeros). Rows per thread: kBM / 16.
template <typename T, int kDh>
__global__ void __launch_bounds__(kPrefillThreads) PrefillKernel(const PrefillParams p) {
  constexpr int kBM = PrefillTileRows(kDh), kRM = kBM / 16, kBN = kPrefillBN;
  constexpr int kLd = kDh + 4, kLdP = kBN + 4, kC = kDh / 32, kD4 = kDh / 4;
  extern __shared__ float4 smem4[];
  float* sQ = reinterpret_cast<float*>(smem4);  // [kBM][kLd]
  float* sK = sQ + kBM * kLd;                   // [kBN][kLd]
  float* sV = sK + kBN * kLd;                   // [kBN][kLd]
  float* sP = sV + kBN * kLd;                   // [kBM][kLdP]

  const Batch& bt = p.batch;
  const int64_t slot = blockIdx.x;
  const int h = blockIdx.y;
  if (bt.num_seqs == 0 || slot >= p.tile_start[bt.num_seqs]) return;
  int lo = 0, hi = bt.num_seqs - 1;  // the last sequence whose first slot is <= slot
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.tile_start[mid] <= slot) lo = mid; else hi = mid - 1;
  }
  const int b = lo;
  SeqRange sr;
  if (!LoadSeqRange(bt, b, &sr)) return;
  const int group = p.group, dh = p.head_dim;
  const int64_t rows = static_cast<int64_t>(sr.q_len) * group;
  // Tiles of a sequence run last first: the late tiles see the most keys.
  const int64_t tile = p.tile_start[b + 1] - 1 - slot;
  const int64_t r0 = tile * kBM;
  if (r0 < 0 || r0 >= rows) return;
  const int64_t row_end = rows < r0 + kBM ? rows : r0 + kBM;
  const int start_pos = sr.seq_len - sr.q_len;
  const int kv_lo = FirstVisible(start_pos + static_cast<int>(r0 / group), bt.window);
  const int kv_hi = start_pos + static_cast<int>((row_end - 1) / group) + 1;

  const int tid = threadIdx.x, tx = tid & 7, ty = tid >> 3;
  for (int idx = tid; idx < kBM * kD4; idx += kPrefillThreads) {
    const int r = idx / kD4, d = (idx % kD4) * 4;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (r0 + r < rows && d < dh) {
      const int64_t token = (r0 + r) / group, g = (r0 + r) % group;
      const float* src = p.q + (sr.q_start + token) * p.q_stride_token + (h * group + g) * p.q_stride_head + d;
      v = Load4(src, p.q_vec, dh - d);
    }
    *reinterpret_cast<float4*>(sQ + r * kLd + d) = v;
  }
  int pos[kRM];
  float m[kRM], l[kRM], acc[kRM][kC][4];
#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    const int64_t gr = r0 + ty + 16 * i;
    pos[i] = gr < rows ? start_pos + static_cast<int>(gr / group) : -1;
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int k = 0; k < kC; ++k) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][k][e] = 0.0f;
    }
  }

  const T* k_head = static_cast<const T*>(p.k_cache) + static_cast<int64_t>(h) * dh;
  const T* v_head = static_cast<const T*>(p.v_cache) + static_cast<int64_t>(h) * dh;
  for (int kv0 = kv_lo; kv0 < kv_hi; kv0 += kBN) {
    for (int idx = tid; idx < kBN * kD4; idx += kPrefillThreads) {
      const int j = idx / kD4, d = (idx % kD4) * 4, kp = kv0 + j;
      float4 kx = make_float4(0.0f, 0.0f, 0.0f, 0.0f), vx = kx;
      if (kp < kv_hi && d < dh) {
        const int64_t row = CacheRow(bt, b, kp);
        if (row >= 0) {
          kx = Load4(k_head + row * p.pos_stride + d, p.kv_vec, dh - d);
          vx = Load4(v_head + row * p.pos_stride + d, p.kv_vec, dh - d);
        }
      }
      *reinterpret_cast<float4*>(sK + j * kLd + d) = kx;
      *reinterpret_cast<float4*>(sV + j * kLd + d) = vx;
    }
    __syncthreads();

    float s[kRM][4];
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
    }
#pragma unroll 4
    for (int d = 0; d < kDh; d += 4) {
      float4 qv[kRM], kv[4];
#pragma unroll
      for (int i = 0; i < kRM; ++i) qv[i] = *reinterpret_cast<const float4*>(sQ + (ty + 16 * i) * kLd + d);
#pragma unroll
      for (int j = 0; j < 4; ++j) kv[j] = *reinterpret_cast<const float4*>(sK + (tx + 8 * j) * kLd + d);
#pragma unroll
      for (int i = 0; i < kRM; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          s[i][j] = fmaf(qv[i].x, kv[j].x, s[i][j]);
          s[i][j] = fmaf(qv[i].y, kv[j].y, s[i][j]);
          s[i][j] = fmaf(qv[i].z, kv[j].z, s[i][j]);
          s[i][j] = fmaf(qv[i].w, kv[j].w, s[i][j]);
        }
      }
    }

    // Online softmax per row; masked scores are -inf and contribute exp(-inf) = 0.
#pragma unroll
    for (int i = 0; i < kRM; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int kp = kv0 + tx + 8 * j;
        const bool visible = pos[i] >= 0 && kp <= pos[i] && (bt.window == 0 || kp > pos[i] - bt.window);
        s[i][j] = visible ? s[i][j] * p.scale : -INFINITY;
        mx = fmaxf(mx, s[i][j]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      const float m_new = fmaxf(m[i], mx);
      // A row that has seen nothing yet keeps m = -inf: no exp(-inf - -inf).
      const bool none = m_new == -INFINITY;
      const float alpha = none ? 1.0f : expf(m[i] - m_new);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e = none ? 0.0f : expf(s[i][j] - m_new);
        sP[(ty + 16 * i) * kLdP + tx + 8 * j] = e;
        sum += e;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      sum += __shfl_xor_sync(0xffffffffu, sum, 4);
      l[i] = l[i] * alpha + sum;
      m[i] = m_new;
#pragma unroll
      for (int k = 0; k < kC; ++k) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][k][e] *= alpha;
      }
    }
    __syncthreads();

#pragma unroll 2
    for (int c = 0; c < kBN; c += 4) {
      float4 pv[kRM];
#pragma unroll
      for (int i = 0; i < kRM; ++i) pv[i] = *reinterpret_cast<const float4*>(sP + (ty + 16 * i) * kLdP + c);
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
#pragma unroll
        for (int k = 0; k < kC; ++k) {
          const float4 v = *reinterpret_cast<const float4*>(sV + (c + cc) * kLd + tx * 4 + 32 * k);
#pragma unroll
          for (int i = 0; i < kRM; ++i) {
            const float pr = Comp(pv[i], cc);
            acc[i][k][0] = fmaf(pr, v.x, acc[i][k][0]);
            acc[i][k][1] = fmaf(pr, v.y, acc[i][k][1]);
            acc[i][k][2] = fmaf(pr, v.z, acc[i][k][2]);
            acc[i][k][3] = fmaf(pr, v.w, acc[i][k][3]);
          }
        }
      }
    }
    __syncthreads();  // sK, sV, sP are refilled next
  }

#pragma unroll
  for (int i = 0; i < kRM; ++i) {
    if (pos[i] < 0) continue;
    const int64_t gr = r0 + ty + 16 * i;
    const int64_t token = gr / group, g = gr % group;
    float* dst = p.out + (sr.q_start + token) * p.out_stride_token + (h * group + g) * p.out_stride_head;
    const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
#pragma unroll
    for (int k = 0; k < kC; ++k) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = tx * 4 + 32 * k + e;
        if (d < dh) dst[d] = acc[i][k][e] * inv;
      }
    }
  }
}

// Launches PrefillKernel<T, dh_pad> on grid (slots, Hk); dh_pad: 64, 128 or 256.
template <typename T>
absl::Status LaunchPrefill(const PrefillParams& p, int dh_pad, unsigned int slots, cudaStream_t s) {
  const dim3 grid(slots, static_cast<unsigned int>(p.num_kv_heads));
  const size_t smem = static_cast<size_t>(PrefillSmemFloats(dh_pad)) * sizeof(float);
  const auto launch = [&](auto kernel) -> absl::Status {
    // Above 48 KiB of dynamic shared memory a kernel must opt in (per device; cheap to repeat).
    CLEAVE_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<grid, kPrefillThreads, smem, s>>>(p);
    CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("PagedAttentionPrefill launch");
    return absl::OkStatus();
  };
  if (dh_pad <= 64) return launch(PrefillKernel<T, 64>);
  if (dh_pad <= 128) return launch(PrefillKernel<T, 128>);
  return launch(PrefillKernel<T, 256>);
}

// Defined in prefill_f32.cu / prefill_bf16.cu: LaunchPrefill<float> / <uint16_t>.
[[nodiscard]] absl::Status LaunchPrefillF32(const PrefillParams& p, int dh_pad, unsigned int slots, cudaStream_t s);
[[nodiscard]] absl::Status LaunchPrefillBf16(const PrefillParams& p, int dh_pad, unsigned int slots, cudaStream_t s);

}  // namespace cleave::kernels::cuda::attention
