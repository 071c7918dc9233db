// CUDA RMSNorm / AddRmsNorm: one block per row (grid-stride over rows). The sum of squares is
// reduced in f32 (warp shuffles, then one value per warp through shared memory); everything
// after it is the CPU reference's arithmetic (kernels/cpu/norm.cc) element for element:
//   inv_rms = 1 / sqrt(sum / d + eps);  out = w * (x * inv_rms)
// so only the summation order differs from the CPU.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ops.h"

namespace cleave::kernels::cuda {
namespace {

constexpr int kMaxThreads = 512;

// Sum of v over the block; every thread of the block must call it. blockDim.x is a multiple of 32.
__device__ float BlockSum(float v, float* scratch /* [33] */) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  const float total = scratch[32];
  // The next row's BlockSum must not overwrite scratch before every thread has read the total.
  __syncthreads();
  return total;
}

__device__ float4 Add4(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }

// kAdd: res[row] += x[row] first, then normalise res (AddRmsNorm); otherwise normalise x.
// kVec: rows are float4-aligned and d % 4 == 0. out may alias x: every thread finishes reading
// its x elements (pass 1) before the BlockSum barrier, and pass 2 only touches the elements the
// same thread owns.
template <bool kAdd, bool kVec>
__global__ void RmsNormKernel(const float* x, int64_t ldx, float* res, int64_t ldr, const float* w,
                              float* out, int64_t ldo, int64_t rows, int64_t d, float eps) {
  __shared__ float scratch[33];
  const int64_t n = kVec ? d / 4 : d;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* xr = x + row * ldx;
    float* rr = kAdd ? res + row * ldr : nullptr;
    const float* src = kAdd ? rr : xr;  // the row that is normalised
    float* orow = out + row * ldo;
    float ss = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      if constexpr (kVec) {
        float4 v = reinterpret_cast<const float4*>(xr)[j];
        if constexpr (kAdd) {
          v = Add4(reinterpret_cast<const float4*>(rr)[j], v);
          reinterpret_cast<float4*>(rr)[j] = v;
        }
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
      } else {
        float v = xr[j];
        if constexpr (kAdd) {
          v = rr[j] + v;
          rr[j] = v;
        }
        ss += v * v;
      }
    }
    const float mean_square = BlockSum(ss, scratch) / static_cast<float>(d);
    const float inv_rms = 1.0f / sqrtf(mean_square + eps);  // IEEE div and sqrt (no fast math)
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      if constexpr (kVec) {
        const float4 v = reinterpret_cast<const float4*>(src)[j];
        const float4 g = reinterpret_cast<const float4*>(w)[j];
        reinterpret_cast<float4*>(orow)[j] =
            make_float4(g.x * (v.x * inv_rms), g.y * (v.y * inv_rms), g.z * (v.z * inv_rms), g.w * (v.w * inv_rms));
      } else {
        orow[j] = w[j] * (src[j] * inv_rms);
      }
    }
  }
}

int64_t RowStride(const Tensor& t) { return t.dim(0) > 1 ? t.stride(0) : t.dim(1); }

absl::Status CheckRows(const char* op, const char* name, const Tensor& t, Device dev, int64_t rows, int64_t d) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, name, t, dev, DType::kF32, {rows, d}));
  return CheckUnitInnerStride(op, name, t);
}

bool RowsAligned(const Tensor& t) { return Aligned16(t.data()) && RowStride(t) % 4 == 0; }

// res is null for RmsNorm.
absl::Status Launch(const Tensor& x, Tensor* res, const Tensor& w, float eps, Tensor& out, Stream* stream) {
  const int64_t rows = x.dim(0), d = x.dim(1);
  const bool vec = d % 4 == 0 && RowsAligned(x) && RowsAligned(out) && Aligned16(w.data()) &&
                   (res == nullptr || RowsAligned(*res));
  const int64_t n = vec ? d / 4 : d;
  const int threads = static_cast<int>(n >= kMaxThreads ? kMaxThreads : (n + 31) / 32 * 32);
  const unsigned int blocks = GridFor(rows, 1, int64_t{1} << 30);
  const cudaStream_t s = NativeStream(stream);
  const float* xp = x.data_as<const float>();
  float* rp = res != nullptr ? res->data_as<float>() : nullptr;
  const int64_t ldr = res != nullptr ? RowStride(*res) : 0;
  const float* wp = w.data_as<const float>();
  float* op = out.data_as<float>();
  const int64_t ldx = RowStride(x), ldo = RowStride(out);
  if (res != nullptr) {
    if (vec) {
      RmsNormKernel<true, true><<<blocks, threads, 0, s>>>(xp, ldx, rp, ldr, wp, op, ldo, rows, d, eps);
    } else {
      RmsNormKernel<true, false><<<blocks, threads, 0, s>>>(xp, ldx, rp, ldr, wp, op, ldo, rows, d, eps);
    }
  } else if (vec) {
    RmsNormKernel<false, true><<<blocks, threads, 0, s>>>(xp, ldx, rp, ldr, wp, op, ldo, rows, d, eps);
  } else {
    RmsNormKernel<false, false><<<blocks, threads, 0, s>>>(xp, ldx, rp, ldr, wp, op, ldo, rows, d, eps);
  }
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR(res != nullptr ? "AddRmsNorm launch" : "RmsNorm launch");
  return absl::OkStatus();
}

}  // namespace

absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out, Stream* stream) {
  constexpr const char* kOp = "RmsNorm";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "out", out));
  const Device dev = out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "x", x, dev, kAnyDim, kAnyDim));
  const int64_t t = x.dim(0), d = x.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "weight", weight, dev, DType::kF32, {d}));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "out", out, dev, t, d));
  if (t == 0 || d == 0) return absl::OkStatus();
  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  return Launch(x, nullptr, weight, eps, out, stream);
}

absl::Status AddRmsNorm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps, Tensor& out,
                        Stream* stream) {
  constexpr const char* kOp = "AddRmsNorm";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "out", out));
  const Device dev = out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "x", x, dev, kAnyDim, kAnyDim));
  const int64_t t = x.dim(0), d = x.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "residual", residual, dev, t, d));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "weight", weight, dev, DType::kF32, {d}));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "out", out, dev, t, d));
  if (t == 0 || d == 0) return absl::OkStatus();
  // Writing the normalised row over the residual would lose the residual stream itself.
  if (out.data() == residual.data()) return ArgError(kOp, "out", out, "must not alias residual");
  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  return Launch(x, &residual, weight, eps, out, stream);
}

}  // namespace cleave::kernels::cuda
