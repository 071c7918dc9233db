// Token embedding lookup.
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// out[t, :] = table[ids[t], :].  ids: i32 [T]; table: f32/bf16/f16 [V, D]; out: f32 [T, D].
// An id outside [0, V) is InvalidArgument (nothing written past out).
[[nodiscard]] absl::Status EmbeddingLookup(const Tensor& ids, const Tensor& table, Tensor& out,
                                           Stream* stream = nullptr);

}  // namespace cleave::kernels
