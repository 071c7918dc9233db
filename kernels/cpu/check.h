// Internal to the CPU backend: the argument checks every host wrapper runs before touching memory
// (internal/arg_checks.h, with the CPU as the device).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/internal/arg_checks.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cpu {

using checks::ArgError;
using checks::CheckContiguous;
using checks::CheckUnitInnerStride;
using checks::kAnyDim;

// The CPU kernels run synchronously on host memory; a CUDA stream or tensor reaching them means
// the caller dispatched to the wrong backend, which must not be papered over with a copy.
inline absl::Status CheckStream(const char* op, const Stream* stream) {
  if (stream != nullptr && !stream->device().is_cpu()) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": stream on ", stream->device().ToString(), " passed to the CPU kernel"));
  }
  return absl::OkStatus();
}

inline absl::Status CheckOnCpu(const char* op, const char* name, const Tensor& t) {
  return checks::CheckOnDevice(op, name, t, Device::Cpu());
}

// Device (the CPU), dtype, rank and shape in one call. `shape` entries may be kAnyDim.
inline absl::Status CheckTensor(const char* op, const char* name, const Tensor& t, DType dtype,
                                std::initializer_list<int64_t> shape) {
  return checks::CheckTensor(op, name, t, Device::Cpu(), dtype, shape);
}

}  // namespace cleave::kernels::cpu
