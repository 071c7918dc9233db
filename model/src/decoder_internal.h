// Internal to the model library: small helpers shared by the decoder's source files
// (decoder.cc, decoder_mamba.cc, decoder_moe.cc).
#pragma once

#include <cstdint>
#include <vector>

#include "cleave/kernels/tensor.h"

namespace cleave::model::internal {

// A [rows, cols] f32 view of a workspace vector (which must already be large enough).
inline kernels::Tensor F32(std::vector<float>& v, int64_t rows, int64_t cols) {
  return kernels::Tensor(v.data(), kernels::DType::kF32, {rows, cols});
}

inline kernels::Tensor I32(const std::vector<int32_t>& v) {
  return kernels::Tensor(const_cast<int32_t*>(v.data()), kernels::DType::kI32,
                         {static_cast<int64_t>(v.size())});
}

// Workspaces only grow, so a steady decode loop stops allocating after its first step.
template <typename T>
void Grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace cleave::model::internal
