// CPU SwiGLU over the fused gate/up projection.
#include "cleave/kernels/activation.h"

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

// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)) as torch computes it.
void SwiGluRow(const float* gate, const float* up, int64_t f, float* out) {
  int64_t i = 0;
#if CLEAVE_CPU_AVX2
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (; i + 8 <= f; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = cpu::Exp8(_mm256_xor_ps(g, sign));
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)));
  }
#endif
  for (; i < f; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

}  // namespace

absl::Status SwiGlu(const Tensor& gate_up, Tensor& out, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!out.device().is_cpu()) return cuda::SwiGlu(gate_up, out, stream);
#endif
  constexpr const char* kOp = "SwiGlu";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(
      cpu::CheckTensor(kOp, "gate_up", gate_up, DType::kF32, {cpu::kAnyDim, cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "gate_up", gate_up));
  if (gate_up.dim(1) % 2 != 0)
    return cpu::ArgError(kOp, "gate_up", gate_up, "must have an even last dim [T, 2F]");
  const int64_t t = gate_up.dim(0), f = gate_up.dim(1) / 2;
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "out", out, DType::kF32, {t, f}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "out", out));
  if (t == 0 || f == 0) return absl::OkStatus();

  const float* in = gate_up.data_as<const float>();
  float* o = out.data_as<float>();
  const int64_t ldi = t > 1 ? gate_up.stride(0) : 2 * f;
  const int64_t ldo = t > 1 ? out.stride(0) : f;
  const int64_t min_rows = std::max<int64_t>(1, 8192 / f);
  cpu::ParallelFor(t, min_rows, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) SwiGluRow(in + r * ldi, in + r * ldi + f, f, o + r * ldo);
  });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
