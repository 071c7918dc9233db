// CUDA SwiGLU over the fused gate/up projection: out = silu(gate) * up, elementwise, grid-stride,
// float4 loads/stores when every row is 16-byte aligned. silu(g) = g / (1 + exp(-g)) as the CPU
// reference writes it, with the accurate expf (not __expf) and IEEE division (no fast math).
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ops.h"

namespace cleave::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// __fadd_rn keeps nvcc from fusing the 1 + into the last multiply inside expf: the sum is rounded
// on its own, as on the CPU.
__device__ float SwiGluOne(float g, float u) { return g / __fadd_rn(1.0f, expf(-g)) * u; }

// kVec: f % 4 == 0 and both tensors' rows are 16-byte aligned; items are then groups of 4.
// In place (out over the gate columns) is safe: each item is read and written by one thread.
template <bool kVec>
__global__ void SwiGluKernel(const float* in, int64_t ldi, float* out, int64_t ldo, int64_t rows, int64_t f) {
  const int64_t per_row = kVec ? f / 4 : f;
  const int64_t n = rows * per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / per_row, c = idx % per_row;
    const float* gate = in + r * ldi;
    if constexpr (kVec) {
      const float4 g = reinterpret_cast<const float4*>(gate)[c];
      const float4 u = reinterpret_cast<const float4*>(gate + f)[c];
      reinterpret_cast<float4*>(out + r * ldo)[c] =
          make_float4(SwiGluOne(g.x, u.x), SwiGluOne(g.y, u.y), SwiGluOne(g.z, u.z), SwiGluOne(g.w, u.w));
    } else {
      out[r * ldo + c] = SwiGluOne(gate[c], gate[f + c]);
    }
  }
}

}  // namespace

absl::Status SwiGlu(const Tensor& gate_up, Tensor& out, Stream* stream) {
  constexpr const char* kOp = "SwiGlu";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "out", out));
  const Device dev = out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "gate_up", gate_up, dev, DType::kF32, {kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "gate_up", gate_up));
  if (gate_up.dim(1) % 2 != 0) return ArgError(kOp, "gate_up", gate_up, "must have an even last dim [T, 2F]");
  const int64_t t = gate_up.dim(0), f = gate_up.dim(1) / 2;
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, dev, DType::kF32, {t, f}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "out", out));
  if (t == 0 || f == 0) return absl::OkStatus();

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  const float* in = gate_up.data_as<const float>();
  float* o = out.data_as<float>();
  const int64_t ldi = t > 1 ? gate_up.stride(0) : 2 * f;
  const int64_t ldo = t > 1 ? out.stride(0) : f;
  const bool vec = f % 4 == 0 && ldi % 4 == 0 && ldo % 4 == 0 && Aligned16(in) && Aligned16(o);
  const int64_t n = vec ? t * (f / 4) : t * f;
  if (vec) {
    SwiGluKernel<true><<<GridFor(n, kThreads), kThreads, 0, s>>>(in, ldi, o, ldo, t, f);
  } else {
    SwiGluKernel<false><<<GridFor(n, kThreads), kThreads, 0, s>>>(in, ldi, o, ldo, t, f);
  }
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("SwiGlu launch");
  return absl::OkStatus();
}

}  // namespace cleave::kernels::cuda
