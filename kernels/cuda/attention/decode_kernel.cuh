// Internal to kernels/cuda/attention: the split-K (flash-decoding) partition kernel of
// PagedAttentionDecode, instantiated once per cache dtype (decode_f32.cu, decode_bf16.cu).
//
// One block = (sequence b, partition of b's visible context, KV head h, chunk of up to kG <= 8 of
// the group's query heads): the block reads each K and V row of its partition from memory once and
// applies it to all its query heads, so with group <= 8 (every GQA model) each KV head's cache is
// read once per decode step. The 128 threads form teams of kTPR lanes; a team covers one cache row
// (head_dim elements, 16 bytes per lane per load) and takes positions team, team + kTeams, ...,
// with kU rows in flight per lane. The partition is at most kMaxPartition positions, so its scores
// fit in shared memory and its softmax is exact (max first, then exp): no rescaling inside a block.
//
//   pass 1: score[g][t] = (q_g . k_t) * scale. Each lane holds its slice of the kG query vectors in
//           registers; a team's kG partial dots are reduced with a reduce-scatter butterfly
//           (kG - 1 + log2(kTPR / kG) shuffles per row rather than kG * log2(kTPR)).
//   softmax: one warp per query head: m = max, p = exp(score - m), l = sum p (in shared memory).
//   pass 2: acc[g] += p[g][t] * v_t per lane over its rows, then summed over the teams of a warp
//           (shuffles) and over the warps (shared memory, in warp order: deterministic).
//   A sequence whose context fits one partition writes acc / l to `out`; otherwise the partition's
//   (m, l, acc) go to the partial-state buffers that DecodeReduceKernel (decode.cu) merges.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "paged_attention.cuh"

namespace cleave::kernels::cuda::attention {

constexpr int kDecodeThreads = 128;
constexpr int kMaxPartition = 512;  // positions; the score buffer is kG * kMaxPartition floats
constexpr int kMinPartition = 64;
// Row stride of the score buffer: one float of padding puts the kG scores a team writes for one
// position in different banks.
constexpr int kScoreLd = kMaxPartition + 1;

struct DecodeParams {
  Batch batch;
  const float* q = nullptr;  // [B, Hq, Dh], unit inner stride
  int64_t q_stride_token = 0, q_stride_head = 0;
  const void* k_cache = nullptr;  // float or bf16 bits, [num_blocks, block_size, Hk, Dh]
  const void* v_cache = nullptr;
  int64_t pos_stride = 0;  // Hk * Dh: elements from one cache row (slot) to the next
  int num_q_heads = 0, num_kv_heads = 0, group = 0, head_dim = 0;
  int q_chunks = 0;   // ceil(group / kG): blocks per KV head
  int partition = 0;  // positions per partition, <= kMaxPartition
  int num_parts = 0;  // partitions per (sequence, KV head) in the grid
  float scale = 1.0f;
  float* out = nullptr;  // [B, Hq, Dh], unit inner stride
  int64_t out_stride_token = 0, out_stride_head = 0;
  // Partial states, [B, Hq, num_parts] (m, l) and [B, Hq, num_parts, Dh] (acc); null when
  // num_parts == 1.
  float* part_m = nullptr;
  float* part_l = nullptr;
  float* part_acc = nullptr;
};

// Sequence b's decode query sits at seq_len - 1 and sees [lo, hi = seq_len), cut into `parts`
// partitions of `partition` positions starting at lo. parts == 0 for a seq_len outside
// [1, max_kv] (bad metadata, reported by ValidateBatch): nothing is read or written for it.
struct DecodeSpan {
  int lo = 0, hi = 0, parts = 0;
};

__device__ __forceinline__ DecodeSpan SpanOf(const DecodeParams& p, int b) {
  DecodeSpan s;
  const int seq_len = p.batch.seq_lens[b];
  if (seq_len < 1 || seq_len > p.batch.max_kv) return s;
  s.hi = seq_len;
  s.lo = FirstVisible(seq_len - 1, p.batch.window);
  const int parts = (s.hi - s.lo + p.partition - 1) / p.partition;
  s.parts = parts < p.num_parts ? parts : p.num_parts;  // never more than the grid holds
  return s;
}

// kVE cache elements loaded at once (16 bytes, or 1 element on the unaligned path) and read as f32.
template <typename T, int kVE>
struct Vec;
template <>
struct Vec<float, 4> {
  using Raw = float4;
  static __device__ __forceinline__ float Get(const Raw& r, int e) {
    return e == 0 ? r.x : e == 1 ? r.y : e == 2 ? r.z : r.w;
  }
};
template <>
struct Vec<uint16_t, 8> {
  using Raw = uint4;
  static __device__ __forceinline__ float Get(const Raw& r, int e) {
    const int w = e >> 1;
    const uint32_t word = w == 0 ? r.x : w == 1 ? r.y : w == 2 ? r.z : r.w;
    return (e & 1) != 0 ? Bf16Hi(word) : Bf16Lo(word);
  }
};
template <typename T>
struct Vec<T, 1> {
  using Raw = T;
  static __device__ __forceinline__ float Get(const Raw& r, int) { return Widen(r); }
};

// Sums kG values over the kTPR lanes of a team; returns, in every lane, the total of value
// lr / (kTPR / kG) (lr: the lane's index in its team). Reduce-scatter over the top log2(kG) bits
// of lr (each step halves the values a lane carries), then a butterfly over the rest.
template <int kG, int kTPR>
__device__ __forceinline__ float TeamReduceScatter(float (&v)[kG], int lr) {
  constexpr int kLogG = kG == 1 ? 0 : kG == 2 ? 1 : kG == 4 ? 2 : 3;
#pragma unroll
  for (int step = 0; step < kLogG; ++step) {
    const int half = (kG >> step) / 2;
    const int offset = kTPR >> (step + 1);
    const bool upper = (lr & offset) != 0;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const float send = upper ? v[j] : v[j + half];
      const float keep = upper ? v[j + half] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
  }
  float s = v[0];
#pragma unroll
  for (int offset = kTPR / (2 * kG); offset > 0; offset /= 2) s += __shfl_xor_sync(0xffffffffu, s, offset);
  return s;
}

__device__ __forceinline__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Loads, for kU positions (team + u * kTeams of this step), the lane's kNV vectors of a cache row;
// positions past the partition or in a block outside the cache load zeros and clear ok[u].
template <typename T, int kVE, int kTPR, int kNV, int kU, int kTeams>
__device__ __forceinline__ void LoadRows(const DecodeParams& p, const T* cache, int b, int start, int n, int base,
                                         int team, int lr, int nvec, typename Vec<T, kVE>::Raw (&raw)[kU][kNV],
                                         bool (&ok)[kU]) {
  using Raw = typename Vec<T, kVE>::Raw;
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int t = base + u * kTeams + team;
    const int64_t row = t < n ? CacheRow(p.batch, b, start + t) : -1;
    ok[u] = row >= 0;
    const T* src = cache + (row >= 0 ? row : 0) * p.pos_stride;
#pragma unroll
    for (int i = 0; i < kNV; ++i) {
      const int vi = lr + kTPR * i;
      Raw r{};
      if (ok[u] && vi < nvec) r = __ldg(reinterpret_cast<const Raw*>(src + static_cast<int64_t>(vi) * kVE));
      raw[u][i] = r;
    }
  }
}

// kVE elements per load; kTPR lanes per cache row (a power of two, kG <= kTPR <= 32); kNV loads
// per lane per row (head_dim <= kTPR * kVE * kNV); kG query heads per block.
template <typename T, int kVE, int kTPR, int kNV, int kG>
__global__ void __launch_bounds__(kDecodeThreads) DecodePartitionKernel(const DecodeParams p) {
  using V = Vec<T, kVE>;
  using Raw = typename V::Raw;
  constexpr int kTeams = kDecodeThreads / kTPR;
  constexpr int kWarps = kDecodeThreads / 32;
  constexpr int kU = kNV >= 8 ? 1 : 8 / kNV;  // rows in flight per lane
  constexpr int kStep = kTeams * kU;
  constexpr int kDhPad = kTPR * kVE * kNV;
  constexpr int kLanesPerQuery = kTPR / kG;
  static_assert(kTPR >= kG && kTPR <= 32 && (kTPR & (kTPR - 1)) == 0, "team size");
  static_assert(kDhPad <= kMaxPartition, "the cross-warp sum reuses the score buffer");
  __shared__ float s_buf[kG * kScoreLd];  // scores, then probabilities, then [kG][kDhPad] sums
  __shared__ float s_m[kG], s_l[kG];

  int64_t x = blockIdx.x;
  const int qc = static_cast<int>(x % p.q_chunks);
  x /= p.q_chunks;
  const int h = static_cast<int>(x % p.num_kv_heads);
  x /= p.num_kv_heads;
  const int part = static_cast<int>(x % p.num_parts);
  const int b = static_cast<int>(x / p.num_parts);
  const DecodeSpan sp = SpanOf(p, b);
  if (part >= sp.parts) return;  // the whole block: before any barrier
  const int start = sp.lo + part * p.partition;
  const int n = min(p.partition, sp.hi - start);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int lr = tid % kTPR, team = tid / kTPR;
  const int nvec = p.head_dim / kVE;
  const int g0 = qc * kG;

  float q[kG][kNV][kVE];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
    const bool valid = g0 + g < p.group;
    const float* qrow = p.q + static_cast<int64_t>(b) * p.q_stride_token +
                        static_cast<int64_t>(valid ? h * p.group + g0 + g : 0) * p.q_stride_head;
#pragma unroll
    for (int i = 0; i < kNV; ++i) {
      const int vi = lr + kTPR * i;
#pragma unroll
      for (int e = 0; e < kVE; ++e) q[g][i][e] = valid && vi < nvec ? qrow[vi * kVE + e] : 0.0f;
    }
  }

  // Pass 1: scores. The loop bounds are uniform over the block (every lane joins the shuffles).
  const T* k_head = static_cast<const T*>(p.k_cache) + static_cast<int64_t>(h) * p.head_dim;
  const T* v_head = static_cast<const T*>(p.v_cache) + static_cast<int64_t>(h) * p.head_dim;
  for (int base = 0; base < n; base += kStep) {
    Raw raw[kU][kNV];
    bool ok[kU];
    LoadRows<T, kVE, kTPR, kNV, kU, kTeams>(p, k_head, b, start, n, base, team, lr, nvec, raw, ok);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float dot[kG];
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < kNV; ++i) {
#pragma unroll
          for (int e = 0; e < kVE; ++e) s = fmaf(q[g][i][e], V::Get(raw[u][i], e), s);
        }
        dot[g] = s;
      }
      const float total = TeamReduceScatter<kG, kTPR>(dot, lr);
      const int t = base + u * kTeams + team;
      if (t < n && lr % kLanesPerQuery == 0) {
        s_buf[(lr / kLanesPerQuery) * kScoreLd + t] = ok[u] ? total * p.scale : -INFINITY;
      }
    }
  }
  // The first V rows do not depend on the softmax: their loads overlap it.
  Raw vraw[kU][kNV];
  bool vok[kU];
  LoadRows<T, kVE, kTPR, kNV, kU, kTeams>(p, v_head, b, start, n, 0, team, lr, nvec, vraw, vok);
  __syncthreads();

  // Softmax over the partition, one warp per query head.
  for (int g = warp; g < kG; g += kWarps) {
    float* sg = s_buf + g * kScoreLd;
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, sg[t]);
    m = WarpMax(m);
    float sum = 0.0f;
    for (int t = lane; t < n; t += 32) {
      const float e = m == -INFINITY ? 0.0f : expf(sg[t] - m);
      sg[t] = e;
      sum += e;
    }
    sum = WarpSum(sum);
    if (lane == 0) {
      s_m[g] = m;
      s_l[g] = sum;
    }
  }
  __syncthreads();

  // Pass 2: acc[g] = sum_t p[g][t] * v_t over this lane's rows.
  float acc[kG][kNV][kVE];
#pragma unroll
  for (int g = 0; g < kG; ++g) {
#pragma unroll
    for (int i = 0; i < kNV; ++i) {
#pragma unroll
      for (int e = 0; e < kVE; ++e) acc[g][i][e] = 0.0f;
    }
  }
  for (int base = 0; base < n; base += kStep) {
    if (base > 0) LoadRows<T, kVE, kTPR, kNV, kU, kTeams>(p, v_head, b, start, n, base, team, lr, nvec, vraw, vok);
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int t = base + u * kTeams + team;
      if (t >= n) continue;  // vraw is zero there; the score buffer ends at n
#pragma unroll
      for (int g = 0; g < kG; ++g) {
        const float pr = s_buf[g * kScoreLd + t];
#pragma unroll
        for (int i = 0; i < kNV; ++i) {
#pragma unroll
          for (int e = 0; e < kVE; ++e) acc[g][i][e] = fmaf(pr, V::Get(vraw[u][i], e), acc[g][i][e]);
        }
      }
    }
  }
  // Teams of a warp hold the same elements for different rows: sum them (all lanes end equal).
#pragma unroll
  for (int offset = kTPR; offset < 32; offset *= 2) {
#pragma unroll
    for (int g = 0; g < kG; ++g) {
#pragma unroll
      for (int i = 0; i < kNV; ++i) {
#pragma unroll
        for (int e = 0; e < kVE; ++e) acc[g][i][e] += __shfl_xor_sync(0xffffffffu, acc[g][i][e], offset);
      }
    }
  }
  __syncthreads();  // every probability has been read: s_buf becomes the [kG][kDhPad] sum
  float* red = s_buf;
  for (int w = 0; w < kWarps; ++w) {
    if (warp == w && lane < kTPR) {
#pragma unroll
      for (int g = 0; g < kG; ++g) {
#pragma unroll
        for (int i = 0; i < kNV; ++i) {
#pragma unroll
          for (int e = 0; e < kVE; ++e) {
            float& r = red[g * kDhPad + (lane + kTPR * i) * kVE + e];
            r = (w == 0 ? 0.0f : r) + acc[g][i][e];
          }
        }
      }
    }
    __syncthreads();
  }

  const bool direct = sp.parts == 1;
  for (int idx = tid; idx < kG * p.head_dim; idx += kDecodeThreads) {
    const int g = idx / p.head_dim, d = idx % p.head_dim;
    if (g0 + g >= p.group) continue;
    const int hq = h * p.group + g0 + g;
    const float a = red[g * kDhPad + d];
    if (direct) {
      const float l = s_l[g];
      p.out[static_cast<int64_t>(b) * p.out_stride_token + static_cast<int64_t>(hq) * p.out_stride_head + d] =
          a * (l > 0.0f ? 1.0f / l : 0.0f);
    } else {
      const int64_t state = (static_cast<int64_t>(b) * p.num_q_heads + hq) * p.num_parts + part;
      p.part_acc[state * p.head_dim + d] = a;
      if (d == 0) {
        p.part_m[state] = s_m[g];
        p.part_l[state] = s_l[g];
      }
    }
  }
}

template <typename T, int kVE, int kTPR, int kNV>
void LaunchForGroup(const DecodeParams& p, int kg, unsigned int blocks, cudaStream_t s) {
  switch (kg) {
    case 1: DecodePartitionKernel<T, kVE, kTPR, kNV, 1><<<blocks, kDecodeThreads, 0, s>>>(p); break;
    case 2: DecodePartitionKernel<T, kVE, kTPR, kNV, 2><<<blocks, kDecodeThreads, 0, s>>>(p); break;
    case 4: DecodePartitionKernel<T, kVE, kTPR, kNV, 4><<<blocks, kDecodeThreads, 0, s>>>(p); break;
    default: DecodePartitionKernel<T, kVE, kTPR, kNV, 8><<<blocks, kDecodeThreads, 0, s>>>(p); break;
  }
}

// Defined in decode_f32.cu / decode_bf16.cu (one translation unit per cache dtype, so they build in
// parallel): LaunchDecodePartitions<float> / <uint16_t>.
void LaunchDecodePartitionsF32(const DecodeParams& p, int kg, bool vec, unsigned int blocks, cudaStream_t s);
void LaunchDecodePartitionsBf16(const DecodeParams& p, int kg, bool vec, unsigned int blocks, cudaStream_t s);

// Picks the team shape for head_dim: the fewest lanes per row that cover it with one 16-byte load
// each (more lanes per row would mean more shuffles per row), or the element-wise path when rows
// are not 16-byte aligned. kg: 1, 2, 4 or 8. Asynchronous; launch errors are the caller's to check.
template <typename T>
void LaunchDecodePartitions(const DecodeParams& p, int kg, bool vec, unsigned int blocks, cudaStream_t s) {
  constexpr int kVE = 16 / static_cast<int>(sizeof(T));
  if (!vec) {
    LaunchForGroup<T, 1, 32, 8>(p, kg, blocks, s);  // head_dim <= 256
    return;
  }
  const int nvec = p.head_dim / kVE;
  if constexpr (kVE == 4) {  // f32: 4 elements per load
    if (nvec <= 16) {
      LaunchForGroup<T, 4, 16, 1>(p, kg, blocks, s);
    } else if (nvec <= 32) {
      LaunchForGroup<T, 4, 32, 1>(p, kg, blocks, s);
    } else {
      LaunchForGroup<T, 4, 32, 2>(p, kg, blocks, s);
    }
  } else {  // bf16: 8 elements per load
    if (nvec <= 8) {
      LaunchForGroup<T, 8, 8, 1>(p, kg, blocks, s);
    } else if (nvec <= 16) {
      LaunchForGroup<T, 8, 16, 1>(p, kg, blocks, s);
    } else {
      LaunchForGroup<T, 8, 32, 1>(p, kg, blocks, s);
    }
  }
}

}  // namespace cleave::kernels::cuda::attention
