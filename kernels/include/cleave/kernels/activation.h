// Gated activations of the FFN.
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// SwiGLU: out = silu(gate) * up, where gate_up: f32 [T, 2F] holds gate in columns [0, F) and up in
// [F, 2F) (the model fuses gate_proj and up_proj into one GEMM). out: f32 [T, F].
[[nodiscard]] absl::Status SwiGlu(const Tensor& gate_up, Tensor& out, Stream* stream = nullptr);

}  // namespace cleave::kernels
