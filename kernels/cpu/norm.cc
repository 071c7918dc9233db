// CPU RMSNorm, computed as Hugging Face's LlamaRMSNorm does in f32:
//   out = weight * (x * rsqrt(mean(x^2) + eps))
// (the normalised row is rounded before the weight multiply, the same order as transformers).
#include "cleave/kernels/norm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ops.h"
#include "parallel.h"
#include "simd.h"

namespace cleave::kernels {
namespace {

// out[i] = w[i] * (x[i] * inv_rms) over one row of d elements; out may equal x.
void NormalizeRow(const float* x, const float* w, float eps, int64_t d, float* out) {
  const float mean_square = cpu::SumSquares(x, d) / static_cast<float>(d);
  const float inv_rms = 1.0f / std::sqrt(mean_square + eps);
  for (int64_t i = 0; i < d; ++i) out[i] = w[i] * (x[i] * inv_rms);
}

// Rows are independent; a chunk of at least ~16K elements is worth a pool hand-off.
int64_t MinRowsPerChunk(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

int64_t RowStride(const Tensor& t) { return t.dim(0) > 1 ? t.stride(0) : t.dim(1); }

absl::Status CheckRows(const char* op, const char* name, const Tensor& t, int64_t rows, int64_t d) {
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(op, name, t, DType::kF32, {rows, d}));
  return cpu::CheckUnitInnerStride(op, name, t);
}

}  // namespace

absl::Status RmsNorm(const Tensor& x, const Tensor& weight, float eps, Tensor& out,
                     Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!out.device().is_cpu()) return cuda::RmsNorm(x, weight, eps, out, stream);
#endif
  constexpr const char* kOp = "RmsNorm";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "x", x, cpu::kAnyDim, cpu::kAnyDim));
  const int64_t t = x.dim(0), d = x.dim(1);
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "weight", weight, DType::kF32, {d}));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "out", out, t, d));
  if (t == 0 || d == 0) return absl::OkStatus();

  const float* xp = x.data_as<const float>();
  const float* wp = weight.data_as<const float>();
  float* op = out.data_as<float>();
  const int64_t ldx = RowStride(x), ldo = RowStride(out);
  cpu::ParallelFor(t, MinRowsPerChunk(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) NormalizeRow(xp + r * ldx, wp, eps, d, op + r * ldo);
  });
  return absl::OkStatus();
}

absl::Status AddRmsNorm(const Tensor& x, Tensor& residual, const Tensor& weight, float eps,
                        Tensor& out, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!out.device().is_cpu()) return cuda::AddRmsNorm(x, residual, weight, eps, out, stream);
#endif
  constexpr const char* kOp = "AddRmsNorm";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "x", x, cpu::kAnyDim, cpu::kAnyDim));
  const int64_t t = x.dim(0), d = x.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "residual", residual, t, d));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "weight", weight, DType::kF32, {d}));
  CLEAVE_RETURN_IF_ERROR(CheckRows(kOp, "out", out, t, d));
  if (t == 0 || d == 0) return absl::OkStatus();
  // Writing the normalised row over the residual would lose the residual stream itself.
  if (out.data() == residual.data()) {
    return cpu::ArgError(kOp, "out", out, "must not alias residual");
  }

  const float* xp = x.data_as<const float>();
  float* rp = residual.data_as<float>();
  const float* wp = weight.data_as<const float>();
  float* op = out.data_as<float>();
  const int64_t ldx = RowStride(x), ldr = RowStride(residual), ldo = RowStride(out);
  cpu::ParallelFor(t, MinRowsPerChunk(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* res = rp + r * ldr;
      const float* xr = xp + r * ldx;
      // Row by row, so out may alias x: x's row is consumed before out's row is written.
      for (int64_t i = 0; i < d; ++i) res[i] += xr[i];
      NormalizeRow(res, wp, eps, d, op + r * ldo);
    }
  });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
