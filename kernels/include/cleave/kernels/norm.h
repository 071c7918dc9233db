// RMSNorm (Llama family): out = x / sqrt(mean(x^2) + eps) * weight.
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// x, out: f32 [T, D] (out may alias x). weight: f32 [D]. Accumulates in f32.
[[nodiscard]] absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                                   Stream* stream = nullptr);

// The residual-stream update fused with the next norm, as every decoder layer does it:
//   residual += x;  out = RmsNorm(residual, weight, eps)
// x, residual, out: f32 [T, D]; weight: f32 [D]. out must not alias residual.
[[nodiscard]] absl::Status AddRmsNorm(const Tensor& x, Tensor& residual, const Tensor& weight,
                                      float eps, Tensor& out, Stream* stream = nullptr);

}  // namespace cleave::kernels
