// CUDA implementations of the ops of gemm.h, norm.h, rope.h, activation.h and embedding.h, behind
// the same calls: each public entry point (kernels::Linear, kernels::AddRmsNorm, ...) forwards
// here when its output tensor is on a CUDA device, in builds with CUDA (CLEAVE_WITH_CUDA). Model
// code never calls these directly. The other op families have their own headers with the same
// contract: cuda_attention_ops.h, cuda_moe_ops.h, cuda_ssm_ops.h, and device_sampling.h (a new
// batched call rather than a twin of a CPU one).
//
// Contracts are the CPU ops' (same shapes, dtypes, aliasing rules, InvalidArgument on a bad
// argument), plus: every tensor of a call is on the same CUDA device; `stream` null means that
// device's legacy default stream; ops are asynchronous on the stream unless stated (an op that must
// report a data-dependent error, like an out-of-range token id, synchronises the stream). Launch
// errors come back as Internal with the CUDA error name. Numerics: f32 accumulation everywhere;
// 16-bit weights are read as stored, not widened in memory; results match the CPU reference to
// the tolerances stated in tests/gpu/cuda_ops_test.cc (not bitwise: summation order differs).
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/rope.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cuda {

// gemm.h. cuBLAS (cublasGemmEx / cuBLASLt): f32 weights as TF32-free f32 GEMM; bf16/f16 weights
// with the activations converted to the weight's type on the device and f32 accumulation.
[[nodiscard]] absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, Stream* stream);

// norm.h
[[nodiscard]] absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out, Stream* stream);
[[nodiscard]] absl::Status AddRmsNorm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps,
                                      Tensor& out, Stream* stream);

// rope.h (the cos/sin tables on the device, built on the host by BuildRopeTables and copied).
[[nodiscard]] absl::Status ApplyRope(const Tensor& positions, const Tensor& cos, const Tensor& sin, RopeStyle style,
                                     Tensor& q, Tensor& k, Stream* stream);

// activation.h
[[nodiscard]] absl::Status SwiGlu(const Tensor& gate_up, Tensor& out, Stream* stream);

// embedding.h
[[nodiscard]] absl::Status EmbeddingLookup(const Tensor& ids, const Tensor& table, Tensor& out, Stream* stream);

}  // namespace cleave::kernels::cuda
