// Internal to the CPU backend: the argument checks every host wrapper runs before touching memory.
// Each failure is InvalidArgument naming the op, the argument and its DebugString(), so a caller
// sees "RmsNorm: weight f32[7] must have shape [8]" rather than a crash or silent garbage.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cpu {

// Wildcard for CheckTensor's shape: any extent is accepted in that position.
inline constexpr int64_t kAnyDim = -1;

inline absl::Status ArgError(const char* op, const char* name, const Tensor& t,
                             const std::string& problem) {
  return absl::InvalidArgumentError(
      absl::StrCat(op, ": ", name, " ", t.DebugString(), " ", problem));
}

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
  if (!t.device().is_cpu()) {
    return ArgError(op, name, t, absl::StrCat("is on ", t.device().ToString(), ", expected cpu"));
  }
  return absl::OkStatus();
}

// Device, dtype, rank and shape in one call. `shape` entries may be kAnyDim.
inline absl::Status CheckTensor(const char* op, const char* name, const Tensor& t, DType dtype,
                                std::initializer_list<int64_t> shape) {
  if (absl::Status s = CheckOnCpu(op, name, t); !s.ok()) return s;
  if (t.dtype() != dtype) {
    return ArgError(op, name, t, absl::StrCat("must be ", std::string(DTypeName(dtype))));
  }
  bool shape_ok = t.ndim() == static_cast<int>(shape.size());
  int i = 0;
  for (int64_t want : shape) {
    if (!shape_ok) break;
    shape_ok = want == kAnyDim || t.dim(i) == want;
    ++i;
  }
  if (!shape_ok) {
    std::string want;
    for (int64_t d : shape)
      absl::StrAppend(&want, want.empty() ? "" : ", ", d == kAnyDim ? "*" : absl::StrCat(d));
    return ArgError(op, name, t, absl::StrCat("must have shape [", want, "]"));
  }
  for (int d = 0; d < t.ndim(); ++d) {
    if (t.dim(d) < 0) return ArgError(op, name, t, "has a negative extent");
  }
  if (t.data() == nullptr && t.numel() > 0) return ArgError(op, name, t, "has no data");
  return absl::OkStatus();
}

// The kernels walk each row with unit stride and step between rows by stride(-2) (for 2-D) or
// by the strides of every leading dim; only the innermost dim must be packed.
inline absl::Status CheckUnitInnerStride(const char* op, const char* name, const Tensor& t) {
  if (t.ndim() > 0 && t.dim(-1) > 1 && t.stride(-1) != 1) {
    return ArgError(op, name, t, "must have unit stride in its last dim");
  }
  return absl::OkStatus();
}

inline absl::Status CheckContiguous(const char* op, const char* name, const Tensor& t) {
  if (!t.is_contiguous()) return ArgError(op, name, t, "must be contiguous");
  return absl::OkStatus();
}

}  // namespace cleave::kernels::cpu
