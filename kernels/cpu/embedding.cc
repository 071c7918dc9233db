// CPU embedding lookup: one widened row copy per token.
#include "cleave/kernels/embedding.h"

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ops.h"
#include "parallel.h"
#include "simd.h"

namespace cleave::kernels {

absl::Status EmbeddingLookup(const Tensor& ids, const Tensor& table, Tensor& out, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!out.device().is_cpu()) return cuda::EmbeddingLookup(ids, table, out, stream);
#endif
  constexpr const char* kOp = "EmbeddingLookup";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "ids", ids, DType::kI32, {cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous(kOp, "ids", ids));
  const DType dt = table.dtype();
  if (dt != DType::kF32 && dt != DType::kBF16 && dt != DType::kF16) {
    return cpu::ArgError(kOp, "table", table, "must be f32, bf16 or f16");
  }
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "table", table, dt, {cpu::kAnyDim, cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "table", table));
  const int64_t t = ids.dim(0), v = table.dim(0), d = table.dim(1);
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "out", out, DType::kF32, {t, d}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "out", out));

  // Every id is checked before any row is written, so a bad request leaves out untouched.
  const int32_t* id = ids.data_as<const int32_t>();
  for (int64_t i = 0; i < t; ++i) {
    if (id[i] < 0 || id[i] >= v) {
      return absl::InvalidArgumentError(absl::StrCat(kOp, ": ids[", i, "] = ", id[i],
                                                     " is outside the vocabulary [0, ", v,
                                                     ") of table ", table.DebugString()));
    }
  }
  if (t == 0 || d == 0) return absl::OkStatus();

  const char* tab = static_cast<const char*>(table.data());
  const int64_t row_bytes = (v > 1 ? table.stride(0) : d) * static_cast<int64_t>(DTypeSize(dt));
  float* o = out.data_as<float>();
  const int64_t ldo = t > 1 ? out.stride(0) : d;
  cpu::ParallelFor(t, std::max<int64_t>(1, 16384 / d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      cpu::WidenRow(dt, tab + id[i] * row_bytes, o + i * ldo, d);
  });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
