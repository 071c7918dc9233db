// CPU softmax / log-softmax: one online pass for (max, sum of exp), one pass to write.
// Masked scores (-inf) contribute exactly 0; a row that is entirely -inf (or holds a NaN) comes
// out NaN, as torch.softmax does: there is no distribution to return.
#include "cleave/kernels/softmax.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "check.h"
#include "cleave/common/status.h"
#include "parallel.h"
#include "simd.h"

namespace cleave::kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// OnlineSoftmaxState::Add for one score, except that -inf is skipped: with the running max
// still -inf, Add would evaluate exp(-inf - -inf) = NaN for a merely masked score.
void AddScore(OnlineSoftmaxState& st, float x) {
  if (x != kNegInf) st.Add(x);
}

// Running (max, sum) of one row. Each of the 8 lanes keeps its own state (so the loop needs one
// vector exp per rescale instead of a branch per element); the lanes are merged at the end.
OnlineSoftmaxState RowState(const float* x, int64_t c) {
  OnlineSoftmaxState st;
  int64_t i = 0;
#if CLEAVE_CPU_AVX2
  if (c >= 8) {
    const __m256 neg_inf = _mm256_set1_ps(kNegInf);
    __m256 m = neg_inf;
    __m256 s = _mm256_setzero_ps();
    for (; i + 8 <= c; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      const __m256 m_new = _mm256_max_ps(m, v);  // NaN in v becomes the lane max, then the sum
      // While a lane has seen only -inf, subtract 0 instead so exp(-inf - -inf) never happens.
      const __m256 ref = _mm256_andnot_ps(_mm256_cmp_ps(m_new, neg_inf, _CMP_EQ_OQ), m_new);
      s = _mm256_fmadd_ps(s, cpu::Exp8(_mm256_sub_ps(m, ref)), cpu::Exp8(_mm256_sub_ps(v, ref)));
      m = m_new;
    }
    alignas(32) float lane_max[8];
    alignas(32) float lane_sum[8];
    _mm256_store_ps(lane_max, m);
    _mm256_store_ps(lane_sum, s);
    // A NaN lane sum survives Merge (it is scaled and added, never compared).
    for (int l = 0; l < 8; ++l) st.Merge(OnlineSoftmaxState{lane_max[l], lane_sum[l]});
  }
#endif
  for (; i < c; ++i) AddScore(st, x[i]);
  return st;
}

// out[i] = exp(x[i] - max) * scale  (softmax: scale = 1 / sum).
void WriteSoftmax(const float* x, int64_t c, float max, float scale, float* out) {
  int64_t i = 0;
#if CLEAVE_CPU_AVX2
  const __m256 vm = _mm256_set1_ps(max), vs = _mm256_set1_ps(scale);
  for (; i + 8 <= c; i += 8) {
    const __m256 e = cpu::Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(e, vs));
  }
#endif
  for (; i < c; ++i) out[i] = std::exp(x[i] - max) * scale;
}

// out[i] = x[i] - max - log(sum).
void WriteLogSoftmax(const float* x, int64_t c, float max, float log_sum, float* out) {
  for (int64_t i = 0; i < c; ++i) out[i] = (x[i] - max) - log_sum;
}

template <typename RowFn>
absl::Status RunRows(const char* op, const Tensor& x, Tensor& out, Stream* stream, RowFn row_fn) {
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(op, stream));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(op, "x", x, DType::kF32, {cpu::kAnyDim, cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(op, "x", x));
  const int64_t r = x.dim(0), c = x.dim(1);
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(op, "out", out, DType::kF32, {r, c}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(op, "out", out));
  if (r == 0 || c == 0) return absl::OkStatus();

  const float* xp = x.data_as<const float>();
  float* op_data = out.data_as<float>();
  const int64_t ldx = r > 1 ? x.stride(0) : c;
  const int64_t ldo = r > 1 ? out.stride(0) : c;
  cpu::ParallelFor(r, std::max<int64_t>(1, 8192 / c), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* row = xp + i * ldx;
      // Row by row, and the state is complete before the row is written: out may alias x.
      row_fn(row, c, RowState(row, c), op_data + i * ldo);
    }
  });
  return absl::OkStatus();
}

}  // namespace

absl::Status Softmax(const Tensor& x, Tensor& out, Stream* stream) {
  return RunRows("Softmax", x, out, stream,
                 [](const float* row, int64_t c, const OnlineSoftmaxState& st, float* o) {
                   WriteSoftmax(row, c, st.max, 1.0f / st.sum, o);
                 });
}

absl::Status LogSoftmax(const Tensor& x, Tensor& out, Stream* stream) {
  return RunRows("LogSoftmax", x, out, stream,
                 [](const float* row, int64_t c, const OnlineSoftmaxState& st, float* o) {
                   WriteLogSoftmax(row, c, st.max, std::log(st.sum), o);
                 });
}

}  // namespace cleave::kernels
