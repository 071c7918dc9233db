// CUDA ApplyRope: one thread per rotated pair (token, head, i), grid-stride. The rotation is the
// CPU reference's (kernels/cpu/rope.cc, built with -ffp-contract=off) operation for operation:
// every product and sum is an explicitly rounded __fmul_rn / __fadd_rn / __fsub_rn, which nvcc
// never fuses into an FMA, so with the same cos/sin tables the result is bit-identical.
//
// Positions live on the device, so their range check is too: the kernel records the first
// out-of-range token (and leaves that token's q/k untouched, reading no table row for it); the
// host reads the record back, which synchronises the stream. Unlike the CPU op, tokens with valid
// positions are still rotated when another token's position is bad.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/cuda_check.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ops.h"

namespace cleave::kernels::cuda {
namespace {

constexpr int kThreads = 256;

struct Heads {
  float* data;
  int64_t stride_token, stride_head, count;
};

// Pairs (x[i], x[i + half]) for kHalves, (x[2i], x[2i + 1]) otherwise.
template <bool kHalves>
__global__ void RopeKernel(const int32_t* pos, int64_t tokens, const float* cos, const float* sin,
                           int64_t max_positions, int64_t half, Heads q, Heads k, unsigned long long* bad) {
  const int64_t heads = q.count + k.count;
  const int64_t pairs = tokens * heads * half;
  // Positions are checked even when there is nothing to rotate (no heads, rotary_dim 0), as on CPU.
  const int64_t n = pairs > tokens ? pairs : tokens;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (idx < tokens) {
      const int32_t p = pos[idx];
      if (p < 0 || p >= max_positions) atomicMin(bad, static_cast<unsigned long long>(idx));
    }
    if (idx >= pairs) continue;
    const int64_t i = idx % half;
    const int64_t th = idx / half;
    const int64_t h = th % heads, t = th / heads;
    const int32_t p = pos[t];
    if (p < 0 || p >= max_positions) continue;
    float* x = h < q.count ? q.data + t * q.stride_token + h * q.stride_head
                           : k.data + t * k.stride_token + (h - q.count) * k.stride_head;
    const float c = cos[static_cast<int64_t>(p) * half + i];
    const float s = sin[static_cast<int64_t>(p) * half + i];
    const int64_t a = kHalves ? i : 2 * i;
    const int64_t b = kHalves ? i + half : 2 * i + 1;
    const float xa = x[a], xb = x[b];
    x[a] = __fsub_rn(__fmul_rn(xa, c), __fmul_rn(xb, s));
    x[b] = __fadd_rn(__fmul_rn(xb, c), __fmul_rn(xa, s));
  }
}

absl::Status CheckHeads(const char* name, const Tensor& t, Device dev, int64_t tokens, int64_t rotary_dim) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor("ApplyRope", name, t, dev, DType::kF32, {tokens, kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride("ApplyRope", name, t));
  if (t.dim(2) < rotary_dim) {
    return ArgError("ApplyRope", name, t, absl::StrCat("has head_dim below the tables' rotary_dim ", rotary_dim));
  }
  return absl::OkStatus();
}

Heads HeadsOf(Tensor& t) { return {t.data_as<float>(), t.stride(0), t.stride(1), t.dim(1)}; }

}  // namespace

// Blocking: synchronises `stream` to report an out-of-range position.
absl::Status ApplyRope(const Tensor& positions, const Tensor& cos, const Tensor& sin, RopeStyle style, Tensor& q,
                       Tensor& k, Stream* stream) {
  constexpr const char* kOp = "ApplyRope";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "q", q));
  const Device dev = q.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "positions", positions, dev, DType::kI32, {kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(kOp, "positions", positions));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "cos", cos, dev, DType::kF32, {kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(kOp, "cos", cos));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "sin", sin, dev, DType::kF32, {cos.dim(0), cos.dim(1)}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(kOp, "sin", sin));
  if (style != RopeStyle::kHalves && style != RopeStyle::kInterleaved) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": unknown RopeStyle ", static_cast<int>(style)));
  }
  const int64_t tokens = positions.dim(0), max_positions = cos.dim(0), half = cos.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckHeads("q", q, dev, tokens, 2 * half));
  CLEAVE_RETURN_IF_ERROR(CheckHeads("k", k, dev, tokens, 2 * half));
  if (tokens == 0) return absl::OkStatus();

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  FirstBadIndex bad(s);
  CLEAVE_RETURN_IF_ERROR(bad.Init());
  const int64_t pairs = tokens * (q.dim(1) + k.dim(1)) * half;
  const unsigned int blocks = GridFor(pairs > tokens ? pairs : tokens, kThreads);
  const int32_t* pos = positions.data_as<const int32_t>();
  const float* cp = cos.data_as<const float>();
  const float* sp = sin.data_as<const float>();
  if (style == RopeStyle::kHalves) {
    RopeKernel<true><<<blocks, kThreads, 0, s>>>(pos, tokens, cp, sp, max_positions, half, HeadsOf(q), HeadsOf(k),
                                                 bad.slot());
  } else {
    RopeKernel<false><<<blocks, kThreads, 0, s>>>(pos, tokens, cp, sp, max_positions, half, HeadsOf(q), HeadsOf(k),
                                                  bad.slot());
  }
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("ApplyRope launch");
  int64_t t = -1;
  CLEAVE_RETURN_IF_ERROR(bad.Read(&t));
  if (t < 0) return absl::OkStatus();
  int32_t p = 0;
  CLEAVE_RETURN_IF_ERROR(ReadI32(pos + t, s, &p));
  return absl::InvalidArgumentError(absl::StrCat(kOp, ": positions[", t, "] = ", p, " is outside the tables' [0, ",
                                                 max_positions, ") (cos ", cos.DebugString(), ")"));
}

}  // namespace cleave::kernels::cuda
