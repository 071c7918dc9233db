// The elementwise kernels of the CUDA MoE (row gather, SwiGLU, weighted un-permute, sigmoid-gated
// add), the helpers the entry points share, and the two small ops MoeCombine and SigmoidGatedAdd.
//
// Every kernel walks a [rows, cols] matrix with a 2-D grid-stride loop: grid.y over rows,
// grid.x * blockDim.x over columns (coalesced), 64-bit indices. Arithmetic pins its roundings
// with __fmul_rn / __fmaf_rn / __fadd_rn so nvcc cannot contract it differently between the
// MoeExperts and MoeCombine instantiations (they must agree bit for bit).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "../common/cuda_check.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_backend.h"
#include "moe_internal.h"

namespace cleave::kernels::cuda {
namespace moe {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T From(float v);
template <>
__device__ __forceinline__ float From<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 From<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half From<__half>(float v) {
  return __float2half_rn(v);
}

template <typename T>
__global__ void GatherRowsKernel(const float* __restrict__ x, int64_t ldx, const int32_t* __restrict__ slots, int k,
                                 int64_t rows, int64_t d, T* __restrict__ out) {
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* src = x + static_cast<int64_t>(slots[r] / k) * ldx;
    T* dst = out + r * d;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < d; c += col_step) {
      dst[c] = From<T>(src[c]);
    }
  }
}

// silu(g) * u as the CPU (and cuda::SwiGlu) compute it: g / (1 + exp(-g)) * u, accurate expf,
// IEEE division, the 1 + rounded on its own.
template <typename T>
__global__ void SwiGluRowsKernel(const float* __restrict__ gate_up, int64_t rows, int64_t f, T* __restrict__ act) {
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* gate = gate_up + r * 2 * f;
    T* dst = act + r * f;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < f; c += col_step) {
      const float g = gate[c];
      dst[c] = From<T>(__fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), gate[f + c]));
    }
  }
}

__global__ void WeightedCombineKernel(const float* __restrict__ rows, const int32_t* __restrict__ slot_rows,
                                      const float* __restrict__ weights, int64_t t, int k, int64_t d,
                                      float* __restrict__ out, int64_t ldo) {
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t token = blockIdx.y; token < t; token += gridDim.y) {
    const int64_t s0 = token * k;
    float* dst = out + token * ldo;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < d; c += col_step) {
      const int64_t r0 = slot_rows != nullptr ? slot_rows[s0] : s0;
      float acc = __fmul_rn(weights[s0], rows[r0 * d + c]);
      for (int j = 1; j < k; ++j) {
        const int64_t r = slot_rows != nullptr ? slot_rows[s0 + j] : s0 + j;
        acc = __fmaf_rn(weights[s0 + j], rows[r * d + c], acc);
      }
      dst[c] = acc;
    }
  }
}

// out[i, c] = fma(sigmoid(g[i]), y[i, c], out[i, c]).
__global__ void SigmoidGatedAddKernel(const float* __restrict__ g, int64_t ldg, const float* __restrict__ y,
                                      int64_t ldy, float* __restrict__ out, int64_t ldo, int64_t t, int64_t d) {
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.y; i < t; i += gridDim.y) {
    const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g[i * ldg])));
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < d; c += col_step) {
      out[i * ldo + c] = __fmaf_rn(s, y[i * ldy + c], out[i * ldo + c]);
    }
  }
}

// Enough blocks to cover a row in one pass (up to 1024 * 256 columns), and rows up to ~8K blocks
// in all; the loops stride over the rest.
dim3 RowsGrid(int64_t rows, int64_t cols) {
  const unsigned int gx = GridFor(cols, kThreads, 1024);
  const int64_t max_gy = std::max<int64_t>(1, std::min<int64_t>(65535, 8192 / gx));
  return dim3(gx, static_cast<unsigned int>(std::max<int64_t>(1, std::min(rows, max_gy))), 1);
}

}  // namespace

bool Overlap(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto span = [](const Tensor& t) {
    const char* begin = static_cast<const char*>(t.data());
    const int64_t elems = (t.dim(0) - 1) * RowStride(t) + t.dim(1);
    return std::pair{begin, begin + elems * static_cast<int64_t>(sizeof(float))};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

absl::Status CheckDeviceExists(const char* op, const char* name, const Tensor& t) {
  const int count = CudaDeviceCount();
  if (t.device().index < 0 || t.device().index >= count) {
    return ArgError(op, name, t, absl::StrCat("is on ", t.device().ToString(), " but ", count,
                                              " CUDA device(s) are visible"));
  }
  return absl::OkStatus();
}

RoutingArrays MirrorArrays(const MoeRouting& routing, Device device) {
  if (routing.device == nullptr || !(routing.device->device() == device)) return {};
  const RoutingLayout l = MakeRoutingLayout(routing.topk_weights.size(), routing.num_experts);
  if (routing.device_topk_ids != l.ids || routing.device_topk_weights != l.weights ||
      routing.device_slot_rows != l.slot_rows || routing.device_permuted_slots != l.permuted_slots ||
      routing.device_expert_offsets != l.expert_offsets || routing.device->size() < l.total) {
    return {};  // laid out for other sizes: not this routing's mirror
  }
  const char* base = static_cast<const char*>(routing.device->data());
  return {reinterpret_cast<const float*>(base + l.weights), reinterpret_cast<const int32_t*>(base + l.slot_rows),
          reinterpret_cast<const int32_t*>(base + l.permuted_slots)};
}

absl::Status LaunchGatherRows(const float* x, int64_t ldx, const int32_t* permuted_slots, int k, int64_t rows,
                              int64_t d, DType type, void* out, cudaStream_t stream) {
  const dim3 grid = RowsGrid(rows, d);
  if (type == DType::kBF16) {
    GatherRowsKernel<<<grid, kThreads, 0, stream>>>(x, ldx, permuted_slots, k, rows, d,
                                                     static_cast<__nv_bfloat16*>(out));
  } else if (type == DType::kF16) {
    GatherRowsKernel<<<grid, kThreads, 0, stream>>>(x, ldx, permuted_slots, k, rows, d, static_cast<__half*>(out));
  } else {
    GatherRowsKernel<<<grid, kThreads, 0, stream>>>(x, ldx, permuted_slots, k, rows, d, static_cast<float*>(out));
  }
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("MoeExperts: GatherRowsKernel launch");
  return absl::OkStatus();
}

absl::Status LaunchSwiGluRows(const float* gate_up, int64_t rows, int64_t f, DType type, void* act,
                              cudaStream_t stream) {
  const dim3 grid = RowsGrid(rows, f);
  if (type == DType::kBF16) {
    SwiGluRowsKernel<<<grid, kThreads, 0, stream>>>(gate_up, rows, f, static_cast<__nv_bfloat16*>(act));
  } else if (type == DType::kF16) {
    SwiGluRowsKernel<<<grid, kThreads, 0, stream>>>(gate_up, rows, f, static_cast<__half*>(act));
  } else {
    SwiGluRowsKernel<<<grid, kThreads, 0, stream>>>(gate_up, rows, f, static_cast<float*>(act));
  }
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("MoeExperts: SwiGluRowsKernel launch");
  return absl::OkStatus();
}

absl::Status LaunchWeightedCombine(const float* rows, const int32_t* slot_rows, const float* weights, int64_t t,
                                   int k, int64_t d, float* out, int64_t ldo, cudaStream_t stream) {
  WeightedCombineKernel<<<RowsGrid(t, d), kThreads, 0, stream>>>(rows, slot_rows, weights, t, k, d, out, ldo);
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("MoE: WeightedCombineKernel launch");
  return absl::OkStatus();
}

}  // namespace moe

absl::Status MoeCombine(const Tensor& slot_out, const MoeRouting& routing, Tensor& out, Stream* stream) {
  constexpr const char* kOp = "MoeCombine";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "out", out));
  const Device dev = out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, dev, DType::kF32, {kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "out", out));
  const int64_t t = out.dim(0), d = out.dim(1);
  if (t > 1 && out.stride(0) < d) return ArgError(kOp, "out", out, "has overlapping rows");
  const int64_t k = routing.top_k;
  if (routing.num_tokens != t || k < 1 || routing.topk_weights.size() != static_cast<size_t>(t * k)) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": routing is for ", routing.num_tokens, " tokens with top_k ",
                                                   k, ", out has ", t, " rows"));
  }
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "slot_out", slot_out, dev, DType::kF32, {t * k, d}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(kOp, "slot_out", slot_out));
  if (moe::Overlap(slot_out, out)) return ArgError(kOp, "out", out, "must not alias slot_out");
  CLEAVE_RETURN_IF_ERROR(moe::CheckDeviceExists(kOp, "out", out));
  if (t == 0 || d == 0) return absl::OkStatus();

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  const float* weights = moe::MirrorArrays(routing, dev).weights;
  if (weights != nullptr) {
    return moe::LaunchWeightedCombine(slot_out.data_as<const float>(), nullptr, weights, t, static_cast<int>(k), d,
                                      out.data_as<float>(), moe::RowStride(out), s);
  }
  // No device mirror (the routing was built or edited on the host): a stream-ordered copy of the
  // weights for this call.
  const size_t bytes = routing.topk_weights.size() * sizeof(float);
  float* tmp = nullptr;
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaMallocAsync(reinterpret_cast<void**>(&tmp), bytes, s));
  const absl::Status status = [&]() -> absl::Status {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(tmp, routing.topk_weights.data(), bytes, cudaMemcpyHostToDevice, s));
    return moe::LaunchWeightedCombine(slot_out.data_as<const float>(), nullptr, tmp, t, static_cast<int>(k), d,
                                      out.data_as<float>(), moe::RowStride(out), s);
  }();
  const cudaError_t freed = cudaFreeAsync(tmp, s);
  if (status.ok() && freed != cudaSuccess) return CudaError(freed, "cudaFreeAsync(weights)");
  return status;
}

absl::Status SigmoidGatedAdd(const Tensor& gate_logit, const Tensor& y, Tensor& out, Stream* stream) {
  constexpr const char* kOp = "SigmoidGatedAdd";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "out", out));
  const Device dev = out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "y", y, dev, DType::kF32, {kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "y", y));
  const int64_t t = y.dim(0), d = y.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "gate_logit", gate_logit, dev, DType::kF32, {t, 1}));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, dev, DType::kF32, {t, d}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "out", out));
  if (t > 1 && out.stride(0) < d) return ArgError(kOp, "out", out, "has overlapping rows");
  CLEAVE_RETURN_IF_ERROR(moe::CheckDeviceExists(kOp, "out", out));
  if (t == 0 || d == 0) return absl::OkStatus();

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const int64_t ldg = t > 1 ? gate_logit.stride(0) : 1;
  moe::SigmoidGatedAddKernel<<<moe::RowsGrid(t, d), moe::kThreads, 0, NativeStream(stream)>>>(
      gate_logit.data_as<const float>(), ldg, y.data_as<const float>(), moe::RowStride(y), out.data_as<float>(),
      moe::RowStride(out), t, d);
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("SigmoidGatedAdd launch");
  return absl::OkStatus();
}

}  // namespace cleave::kernels::cuda
