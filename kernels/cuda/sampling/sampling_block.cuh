// Internal to kernels/cuda/sampling: the block-wide building blocks of the sampler kernels (one
// block of kThreads threads per row). Reductions and scans are CUB's; the k-th best element is
// found by radix select (no sort); the draw and the top-p cut are inverse CDFs over a block scan.
// Conventions (they mirror kernels/cpu/sampling.cc):
//  - order: higher logit first, ties to the lower id. Logits are compared as order-preserving
//    u32 keys (-0.0 folded into +0.0, as float == does), so "ranked at or ahead of (key, id)" is
//    one test, Kept();
//  - weights: the CPU's f32 (logit - max) / temperature, then exp rounded once to f32 (taken in
//    double: correctly rounded, as glibc's expf is to within its 0.502 ulp); sums in double.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "sampling_cuda.h"

namespace cleave::kernels::cuda::sampling {

constexpr int kThreads = 512;
constexpr int32_t kNoId = INT32_MAX;

struct Best {
  float v;
  int32_t id;
};

struct BetterOp {  // argmax, ties to the lower id
  __device__ Best operator()(const Best& a, const Best& b) const {
    return (b.v > a.v || (b.v == a.v && b.id < a.id)) ? b : a;
  }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const { return b > a ? b : a; }
};
struct MinOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const { return b < a ? b : a; }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(const T& a, const T& b) const { return a + b; }
};

struct Shared {
  union {
    cub::BlockReduce<float, kThreads>::TempStorage f;
    cub::BlockReduce<double, kThreads>::TempStorage d;
    cub::BlockReduce<int, kThreads>::TempStorage i;
    cub::BlockReduce<unsigned, kThreads>::TempStorage u;
    cub::BlockReduce<Best, kThreads>::TempStorage best;
    cub::BlockScan<double, kThreads>::TempStorage scan_d;
    cub::BlockScan<int, kThreads>::TempStorage scan_i;
  } cub;
  int hist[256];
  int idmin[256];
  float bf;  // broadcast slots of AllReduce
  double bd;
  int bi;
  unsigned bu;
  Best bb;
  int sel_bin, sel_above, sel_id, picked, ncol;
  int col_id[kMaxDeviceTopLogprobs];
  float col_v[kMaxDeviceTopLogprobs];
};

// Reduces over the block and hands every thread the result; all threads must call it.
template <typename T, typename Op>
__device__ T AllReduce(T v, Op op, typename cub::BlockReduce<T, kThreads>::TempStorage& ts, T& slot) {
  const T r = cub::BlockReduce<T, kThreads>(ts).Reduce(v, op);
  if (threadIdx.x == 0) slot = r;
  __syncthreads();
  const T all = slot;
  __syncthreads();
  return all;
}

__device__ __forceinline__ uint32_t OrderKey(float v) {
  const uint32_t b = __float_as_uint(v == 0.0f ? 0.0f : v);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float KeyToFloat(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// A filter's cut: keeps the (key, id) pairs ranked at or ahead of it.
struct Cut {
  uint32_t key;
  int32_t id;
};
// Keeps everything: every non-NaN key is > 0.
__device__ __forceinline__ Cut KeepAll() { return Cut{0u, kNoId}; }
__device__ __forceinline__ bool Kept(uint32_t key, int32_t id, Cut c) {
  return key > c.key || (key == c.key && id <= c.id);
}

__device__ __forceinline__ float ExpF(float x) { return static_cast<float>(exp(static_cast<double>(x))); }

__device__ __forceinline__ float Weight(float logit, float max_logit, float temperature) {
  return ExpF(__fdiv_rn(__fsub_rn(logit, max_logit), temperature));
}

// f(index, value, ok) for every element of row[0, n), float4 loads where aligned, kUnroll of
// them in flight per thread (one block streams a whole row, so it needs the memory parallelism).
// Trip counts are the same for every thread (ok = false past the end), so f may use
// warp-synchronous intrinsics.
constexpr int kUnroll = 4;
template <typename F>
__device__ __forceinline__ void ForRow(const float* row, int n, F&& f) {
  const bool vec = (reinterpret_cast<uintptr_t>(row) & 15u) == 0;
  const int n4 = vec ? n / 4 : 0;
  const float4* row4 = reinterpret_cast<const float4*>(row);
  const int threads = static_cast<int>(blockDim.x);
  for (int base = 0; base < n4; base += kUnroll * threads) {
    float4 v[kUnroll];
    int j[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      j[u] = base + u * threads + static_cast<int>(threadIdx.x);
      v[u] = j[u] < n4 ? row4[j[u]] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool ok = j[u] < n4;
      f(4 * j[u], v[u].x, ok);
      f(4 * j[u] + 1, v[u].y, ok);
      f(4 * j[u] + 2, v[u].z, ok);
      f(4 * j[u] + 3, v[u].w, ok);
    }
  }
  for (int base = 4 * n4; base < n; base += blockDim.x) {
    const int j = base + static_cast<int>(threadIdx.x);
    const bool ok = j < n;
    f(j, ok ? row[j] : 0.0f, ok);
  }
}

// This thread's contiguous slice [begin, end) of [0, n), for passes that must follow id order.
__device__ __forceinline__ void ChunkOf(int n, int& begin, int& end) {
  const int chunk = (n + static_cast<int>(blockDim.x) - 1) / static_cast<int>(blockDim.x);
  begin = min(n, static_cast<int>(threadIdx.x) * chunk);
  end = min(n, begin + chunk);
}

// Warp 0: the bin, scanning hist from 255 down, where the running count reaches `remaining`;
// writes it and the count of the bins above it.
__device__ inline void FindBin(Shared& sm, int remaining) {
  const int lane = static_cast<int>(threadIdx.x);
  int c[8];
  int s = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    c[i] = sm.hist[255 - (lane * 8 + i)];
    s += c[i];
  }
  int incl = s;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += t;
  }
  int cum = incl - s;
  if (cum < remaining && remaining <= incl) {
    for (int i = 0; i < 8; ++i) {
      if (cum + c[i] >= remaining) {
        sm.sel_bin = 255 - (lane * 8 + i);
        sm.sel_above = cum;
        break;
      }
      cum += c[i];
    }
  }
}

// The nth (1-based) lowest id whose key is `key`.
__device__ inline int32_t NthIdWithKey(const float* row, int n, uint32_t key, int nth, Shared& sm) {
  int begin, end;
  ChunkOf(n, begin, end);
  int local = 0;
  for (int j = begin; j < end; ++j) local += OrderKey(row[j]) == key ? 1 : 0;
  int before, total;
  cub::BlockScan<int, kThreads>(sm.cub.scan_i).ExclusiveSum(local, before, total);
  if (before < nth && nth <= before + local) {
    int seen = before;
    for (int j = begin; j < end; ++j) {
      if (OrderKey(row[j]) == key && ++seen == nth) {
        sm.sel_id = j;
        break;
      }
    }
  }
  __syncthreads();
  const int32_t id = sm.sel_id;
  __syncthreads();
  return id;
}

// The k-th (1-based, k <= n) element of row[0, n) in (value desc, id asc) order, as a Cut: a
// radix select over the keys (four 8-bit passes, warp-aggregated shared-memory histograms), then
// the rank among equal keys by id. No sort: O(n) per pass for any k.
__device__ inline Cut SelectKth(const float* row, int n, int k, Shared& sm) {
  uint32_t prefix = 0, mask = 0;
  int remaining = k;
  int32_t lowest_id = kNoId;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      sm.hist[i] = 0;
      sm.idmin[i] = kNoId;
    }
    __syncthreads();
    const bool last = shift == 0;
    ForRow(row, n, [&](int j, float v, bool ok) {
      const uint32_t key = OrderKey(v);
      const bool match = ok && (key & mask) == prefix;
      if (!__any_sync(0xffffffffu, match)) return;  // later passes: most warps match nothing
      const uint32_t bin = match ? (key >> shift) & 0xffu : 0xffffffffu;
      const unsigned peers = __match_any_sync(0xffffffffu, bin);
      if (match) {
        if (__ffs(peers) - 1 == static_cast<int>(threadIdx.x & 31)) atomicAdd(&sm.hist[bin], __popc(peers));
        if (last) atomicMin(&sm.idmin[bin], j);
      }
    });
    __syncthreads();
    if (threadIdx.x < 32) FindBin(sm, remaining);
    __syncthreads();
    const int bin = sm.sel_bin;
    remaining -= sm.sel_above;
    prefix |= static_cast<uint32_t>(bin) << shift;
    mask |= 0xffu << shift;
    if (last) lowest_id = sm.idmin[bin];
    __syncthreads();  // hist, idmin and sel_* are rewritten next
  }
  if (remaining == 1) return Cut{prefix, lowest_id};
  return Cut{prefix, NthIdWithKey(row, n, prefix, remaining, sm)};
}

// Inverse CDF in id order, as the CPU's Draw: the first surviving token whose running weight
// exceeds u * (total surviving weight); when rounding leaves none, the last one with weight > 0.
// weight_of(j, v) is token j's weight, or negative when a filter drops it. Each thread sums its
// id slice, a block scan gives every slice its running start, and the slice the target falls in
// walks its tokens. Should rounding make that walk miss (the scan and the walk add in different
// orders), the next slices bid their first token and the lowest id wins.
template <typename WeightOf>
__device__ int32_t Draw(const float* pen, int n, double u, WeightOf weight_of, Shared& sm) {
  int begin, end;
  ChunkOf(n, begin, end);
  double local = 0.0;
  int last = -1;
  for (int j = begin; j < end; ++j) {
    const float w = weight_of(j, pen[j]);
    if (w >= 0.0f) local += w;
    if (w > 0.0f) last = j;
  }
  double before, total;
  cub::BlockScan<double, kThreads>(sm.cub.scan_d).ExclusiveSum(local, before, total);
  if (threadIdx.x == 0) sm.picked = kNoId;
  __syncthreads();
  const double target = u * total;
  if (local > 0.0 && before <= target && before + local > target) {
    double cum = before;
    for (int j = begin; j < end; ++j) {
      const float w = weight_of(j, pen[j]);
      if (w > 0.0f) {
        cum += w;
        if (cum > target) {
          atomicMin(&sm.picked, j);
          break;
        }
      }
    }
  }
  __syncthreads();
  const bool missed = sm.picked == kNoId;
  __syncthreads();  // every thread has read `picked` before anyone bids again
  if (missed && local > 0.0 && before > target) {
    for (int j = begin; j < end; ++j) {
      if (weight_of(j, pen[j]) > 0.0f) {
        atomicMin(&sm.picked, j);
        break;
      }
    }
  }
  last = AllReduce(last, MaxOp{}, sm.cub.i, sm.bi);
  const int32_t picked = sm.picked;
  __syncthreads();
  return picked != kNoId ? picked : last;
}

// The top-p cut on a segment sorted best first: the first position where the running weight
// reaches `target`; keep-all when the segment's mass falls short (the CPU keeps everything then).
__device__ inline Cut TopPCut(const uint32_t* keys, const int32_t* ids, int count, float max_logit, float temperature,
                       double target, Shared& sm) {
  int begin, end;
  ChunkOf(count, begin, end);
  double local = 0.0;
  for (int p = begin; p < end; ++p) local += Weight(KeyToFloat(keys[p]), max_logit, temperature);
  double before, total;
  cub::BlockScan<double, kThreads>(sm.cub.scan_d).ExclusiveSum(local, before, total);
  if (threadIdx.x == 0) sm.picked = kNoId;
  __syncthreads();
  if (local > 0.0 && before < target && before + local >= target) {
    double cum = before;
    for (int p = begin; p < end; ++p) {
      const float w = Weight(KeyToFloat(keys[p]), max_logit, temperature);
      if (w > 0.0f) {
        cum += w;
        if (cum >= target) {
          atomicMin(&sm.picked, p);
          break;
        }
      }
    }
  }
  __syncthreads();
  const bool missed = sm.picked == kNoId;
  __syncthreads();  // every thread has read `picked` before anyone bids again
  if (missed && local > 0.0 && before >= target) {  // rounding: as in Draw
    for (int p = begin; p < end; ++p) {
      if (Weight(KeyToFloat(keys[p]), max_logit, temperature) > 0.0f) {
        atomicMin(&sm.picked, p);
        break;
      }
    }
  }
  __syncthreads();
  const int pos = sm.picked;
  __syncthreads();
  return pos == kNoId ? KeepAll() : Cut{keys[pos], ids[pos]};
}

}  // namespace cleave::kernels::cuda::sampling
