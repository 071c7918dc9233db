// CUDA WriteKvCache: one thread per 4 consecutive elements of one (token, head) row (float4 loads,
// and float4 / packed-bf16 stores, where every row is 16-byte aligned; one element per thread
// otherwise), grid-stride. f32 caches receive the values bit for bit; bf16 caches receive them
// rounded to nearest even exactly as F32ToBf16 does on the host.
//
// Slots live on the device, so their range check is too: a slot past the cache is skipped (nothing
// is written for that token) and the first such token is recorded; the host reads the record back
// after the kernel, which synchronises the stream. Unlike the CPU op, the valid rows are still
// written when another token's slot is bad.
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_attention_ops.h"
#include "paged_attention.cuh"

namespace cleave::kernels::cuda {
namespace {

using attention::ToBf16;

constexpr int kThreads = 256;

// A [T, Hk, Dh] source with unit inner stride.
struct Rows {
  const float* data;
  int64_t stride_token, stride_head;
};

__device__ __forceinline__ void Store4(float* dst, float4 x) { *reinterpret_cast<float4*>(dst) = x; }
__device__ __forceinline__ void Store4(uint16_t* dst, float4 x) {
  uint2 packed;
  packed.x = static_cast<uint32_t>(ToBf16(x.x)) | (static_cast<uint32_t>(ToBf16(x.y)) << 16);
  packed.y = static_cast<uint32_t>(ToBf16(x.z)) | (static_cast<uint32_t>(ToBf16(x.w)) << 16);
  *reinterpret_cast<uint2*>(dst) = packed;
}
__device__ __forceinline__ void Store1(float* dst, float x) { *dst = x; }
__device__ __forceinline__ void Store1(uint16_t* dst, float x) { *dst = ToBf16(x); }

// T: float (f32 cache) or uint16_t (bf16 cache). kVec: Dh % 4 == 0 and every row 16-byte aligned
// in k / v (8-byte aligned in a bf16 cache).
template <typename T, bool kVec>
__global__ void WriteKvKernel(Rows k, Rows v, const int32_t* slots, int64_t tokens, int64_t heads, int64_t dh,
                              int64_t num_slots, T* k_cache, T* v_cache, unsigned long long* bad) {
  constexpr int64_t kChunk = kVec ? 4 : 1;
  const int64_t chunks = dh / kChunk;
  const int64_t n = tokens * heads * chunks;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % chunks, th = idx / chunks;
    const int64_t h = th % heads, t = th / heads;
    const int32_t slot = slots[t];
    if (slot < 0) continue;  // padding row
    if (slot >= num_slots) {
      if (h == 0 && c == 0) atomicMin(bad, static_cast<unsigned long long>(t));
      continue;
    }
    const int64_t d = c * kChunk;
    const int64_t dst = (static_cast<int64_t>(slot) * heads + h) * dh + d;
    const float* ks = k.data + t * k.stride_token + h * k.stride_head + d;
    const float* vs = v.data + t * v.stride_token + h * v.stride_head + d;
    if constexpr (kVec) {
      Store4(k_cache + dst, *reinterpret_cast<const float4*>(ks));
      Store4(v_cache + dst, *reinterpret_cast<const float4*>(vs));
    } else {
      Store1(k_cache + dst, *ks);
      Store1(v_cache + dst, *vs);
    }
  }
}

template <typename T>
void Launch(bool vec, unsigned int blocks, cudaStream_t s, Rows k, Rows v, const int32_t* slots, int64_t tokens,
            int64_t heads, int64_t dh, int64_t num_slots, void* kc, void* vc, unsigned long long* bad) {
  T* kp = static_cast<T*>(kc);
  T* vp = static_cast<T*>(vc);
  if (vec) {
    WriteKvKernel<T, true><<<blocks, kThreads, 0, s>>>(k, v, slots, tokens, heads, dh, num_slots, kp, vp, bad);
  } else {
    WriteKvKernel<T, false><<<blocks, kThreads, 0, s>>>(k, v, slots, tokens, heads, dh, num_slots, kp, vp, bad);
  }
}

// Every (token, head) row of t starts 16-byte aligned when Dh % 4 == 0.
bool RowsAligned16(const Tensor& t) {
  return Aligned16(t.data()) && (t.dim(0) <= 1 || t.stride(0) % 4 == 0) && (t.dim(1) <= 1 || t.stride(1) % 4 == 0);
}

}  // namespace

// Blocking: synchronises `stream` to report a slot past the cache.
absl::Status WriteKvCache(const Tensor& k, const Tensor& v, const Tensor& slot_mapping, Tensor& k_cache,
                          Tensor& v_cache, Stream* stream) {
  constexpr const char* kOp = "WriteKvCache";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "k_cache", k_cache));
  const Device dev = k_cache.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "k", k, dev, DType::kF32, {kAnyDim, kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "k", k));
  const int64_t tokens = k.dim(0), hk = k.dim(1), dh = k.dim(2);
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "v", v, dev, DType::kF32, {tokens, hk, dh}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "v", v));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "slot_mapping", slot_mapping, dev, DType::kI32, {tokens}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(kOp, "slot_mapping", slot_mapping));
  CLEAVE_RETURN_IF_ERROR(attention::CheckCaches(kOp, k_cache, v_cache, dev));
  if (hk != k_cache.dim(2) || dh != k_cache.dim(3)) {
    return ArgError(kOp, "k", k, absl::StrCat("must be [T, Hk, Dh] of k_cache ", k_cache.DebugString()));
  }
  if (tokens == 0) return absl::OkStatus();

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  FirstBadIndex bad(s);
  CLEAVE_RETURN_IF_ERROR(bad.Init());
  const bool bf16 = k_cache.dtype() == DType::kBF16;
  const bool vec = dh % 4 == 0 && RowsAligned16(k) && RowsAligned16(v) &&
                   (bf16 ? reinterpret_cast<uintptr_t>(k_cache.data()) % 8 == 0 &&
                               reinterpret_cast<uintptr_t>(v_cache.data()) % 8 == 0
                         : Aligned16(k_cache.data()) && Aligned16(v_cache.data()));
  const unsigned int blocks = GridFor(tokens * hk * (vec ? dh / 4 : dh), kThreads);
  const Rows kr{k.data_as<const float>(), k.stride(0), k.stride(1)};
  const Rows vr{v.data_as<const float>(), v.stride(0), v.stride(1)};
  const int32_t* slots = slot_mapping.data_as<const int32_t>();
  const int64_t num_slots = k_cache.dim(0) * k_cache.dim(1);
  if (bf16) {
    Launch<uint16_t>(vec, blocks, s, kr, vr, slots, tokens, hk, dh, num_slots, k_cache.data(), v_cache.data(),
                     bad.slot());
  } else {
    Launch<float>(vec, blocks, s, kr, vr, slots, tokens, hk, dh, num_slots, k_cache.data(), v_cache.data(),
                  bad.slot());
  }
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("WriteKvCache launch");
  int64_t t = -1;
  CLEAVE_RETURN_IF_ERROR(bad.Read(&t));
  if (t < 0) return absl::OkStatus();
  int32_t slot = 0;
  CLEAVE_RETURN_IF_ERROR(ReadI32(slots + t, s, &slot));
  return absl::InvalidArgumentError(absl::StrCat(kOp, ": slot_mapping[", t, "] = ", slot, " is past the cache's ",
                                                 num_slots, " slots"));
}

}  // namespace cleave::kernels::cuda
