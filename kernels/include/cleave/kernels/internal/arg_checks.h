// Internal to the kernel library (both backends): the argument checks every op runs before
// touching memory. Each failure is InvalidArgument naming the op, the argument and its
// DebugString(), so a caller sees "RmsNorm: weight f32[7] must have shape [8]" rather than a
// crash or silent garbage. kernels/cpu/check.h and kernels/cuda/common/cuda_check.h add each
// backend's device rules on top.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/kernels/device.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::checks {

// Wildcard for CheckTensor's shape: any extent is accepted in that position.
inline constexpr int64_t kAnyDim = -1;

inline absl::Status ArgError(const char* op, const char* name, const Tensor& t,
                             const std::string& problem) {
  return absl::InvalidArgumentError(
      absl::StrCat(op, ": ", name, " ", t.DebugString(), " ", problem));
}

inline absl::Status CheckOnDevice(const char* op, const char* name, const Tensor& t, Device device) {
  if (!(t.device() == device)) {
    return ArgError(op, name, t,
                    absl::StrCat("is on ", t.device().ToString(), ", expected ", device.ToString()));
  }
  return absl::OkStatus();
}

// Device, dtype, rank and shape in one call. `shape` entries may be kAnyDim.
inline absl::Status CheckTensor(const char* op, const char* name, const Tensor& t, Device device,
                                DType dtype, std::initializer_list<int64_t> shape) {
  if (absl::Status s = CheckOnDevice(op, name, t, device); !s.ok()) return s;
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

// Linear's (gemm.h) tensors on `device`: x f32 [M, K] and y f32 [M, N] with packed rows that do not
// overlap, w f32/bf16/f16 contiguous [N, K], bias f32 [N]; every size and row stride within BLAS's
// int range (OpenBLAS and cuBLAS both take int). The stream is each backend's business.
inline absl::Status CheckLinearTensors(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor& y,
                                       Device device) {
  constexpr const char* kOp = "Linear";
  if (absl::Status s = CheckTensor(kOp, "x", x, device, DType::kF32, {kAnyDim, kAnyDim}); !s.ok()) return s;
  if (absl::Status s = CheckUnitInnerStride(kOp, "x", x); !s.ok()) return s;
  const int64_t m = x.dim(0), k = x.dim(1);
  if (absl::Status s = CheckOnDevice(kOp, "w", w, device); !s.ok()) return s;
  if (w.dtype() != DType::kF32 && w.dtype() != DType::kBF16 && w.dtype() != DType::kF16) {
    return ArgError(kOp, "w", w, "must be f32, bf16 or f16");
  }
  if (absl::Status s = CheckTensor(kOp, "w", w, device, w.dtype(), {kAnyDim, k}); !s.ok()) return s;
  if (absl::Status s = CheckContiguous(kOp, "w", w); !s.ok()) return s;
  const int64_t n = w.dim(0);
  if (absl::Status s = CheckTensor(kOp, "y", y, device, DType::kF32, {m, n}); !s.ok()) return s;
  if (absl::Status s = CheckUnitInnerStride(kOp, "y", y); !s.ok()) return s;
  if (bias != nullptr) {
    if (absl::Status s = CheckTensor(kOp, "bias", *bias, device, DType::kF32, {n}); !s.ok()) return s;
  }
  constexpr int64_t kIntMax = 0x7fffffff;
  if (m > kIntMax || n > kIntMax || k > kIntMax || (m > 1 && x.stride(0) > kIntMax) ||
      (m > 1 && y.stride(0) > kIntMax)) {
    return absl::InvalidArgumentError(absl::StrCat("Linear: x ", x.DebugString(), " / y ",
                                                   y.DebugString(), " exceed BLAS's int range"));
  }
  if (m > 1 && (x.stride(0) < k || y.stride(0) < n)) {
    return absl::InvalidArgumentError(absl::StrCat("Linear: rows of x ", x.DebugString(), " or y ",
                                                   y.DebugString(),
                                                   " overlap (row stride too small)"));
  }
  return absl::OkStatus();
}

}  // namespace cleave::kernels::checks
