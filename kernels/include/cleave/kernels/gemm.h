// Dense matrix products on the CPU through OpenBLAS (and cuBLAS on CUDA, later).
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// The projection of every linear layer, in PyTorch nn.Linear layout:
//   y[M, N] = x[M, K] · w[N, K]^T (+ bias[N])
// x, y: f32, contiguous rows (row stride may exceed K / N for x / y).
// w:    f32, bf16 or f16, contiguous [N, K]. 16-bit weights are widened to f32 in cache-sized
//       panels and multiplied with f32 accumulation; memory stays 16-bit.
// bias: optional f32 [N].
// Thread-safe; parallelised over the OpenBLAS thread pool.
[[nodiscard]] absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                                  Stream* stream = nullptr);

// Sets the number of threads the CPU kernels use (OpenBLAS and the library's own loops).
// 0 = all cores. Call before serving traffic; not meant to change while ops run.
void SetCpuThreads(int n);
int CpuThreads();

}  // namespace cleave::kernels
