// CPU Linear. In batch-invariant mode (the default, see gemm.h) every call goes to the one
// kernel of linear_invariant.cc. Otherwise, the fast paths: OpenBLAS sgemm for f32 weights; for
// bf16/f16 weights either a hand-vectorised GEMV that widens weights in registers (few activation
// rows: decode is bound by reading the weights once) or panel-wise widening into an f32 scratch
// followed by sgemm (many rows: prefill is bound by FLOPs, which sgemm does better). These pick a
// different reduction order by the number of rows, so a row's result depends on its batch.
#include "cleave/kernels/gemm.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ops.h"
#include "linear_params.h"
#include "parallel.h"
#include "simd.h"

namespace cleave::kernels {
namespace {

using cpu::LinearParams;
using cpu::WElem;
using cpu::WidenOne;
#if CLEAVE_CPU_AVX2
using cpu::LoadW8;
#endif

// SetBatchInvariant(); read once per Linear call.
std::atomic<bool> g_batch_invariant{true};

// Up to this many activation rows the 16-bit weights are streamed through the GEMV kernel; each
// weight row is widened once and reused from L1 for every activation row. Above it the panel
// path's sgemm wins.
constexpr int64_t kGemvMaxRows = 4;
// f32 weights up to this many multiply-adds use the GEMV kernel instead of OpenBLAS (above it,
// sgemv's own threading pays off).
constexpr int64_t kSmallF32Macs = int64_t{1} << 20;

// Rows of W per widened panel (multiple of 16, so sgemm's N blocking has no ragged edge inside a
// panel). Every sgemm call re-packs all of x (m x k floats), so a panel of at least 2m rows keeps
// that repacking at most half the panel's own traffic, and at least 8 MiB keeps each call long
// enough to amortise OpenBLAS's thread hand-off; measured at m = 128/512, k = 4096, 4 MiB panels
// ran at ~65% of f32-weight sgemm speed, 8-16 MiB at ~90-95%. Capped at 16 MiB of scratch.
int64_t PanelRows(int64_t m, int64_t k) {
  constexpr int64_t kMinFloats = int64_t{1} << 21;
  constexpr int64_t kMaxFloats = int64_t{1} << 22;
  const int64_t kk = std::max<int64_t>(k, 1);
  const int64_t rows = std::min(std::max(kMinFloats / kk, 2 * m), kMaxFloats / kk);
  return std::max<int64_t>(16, rows / 16 * 16);
}

// out[i][r] = dot(x[i], w[r]) for MT activation rows and R weight rows. MT * R accumulators
// plus R widened weight vectors and one x vector must fit the 16 ymm registers: MT <= 2, R <= 4.
template <DType W, int MT, int R>
inline void DotTile(const float* const* x, const WElem<W>* const* w, int64_t k, float out[MT][R]) {
  int64_t i = 0;
#if CLEAVE_CPU_AVX2
  __m256 acc[MT][R];
  for (int a = 0; a < MT; ++a)
    for (int r = 0; r < R; ++r) acc[a][r] = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) {
    __m256 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = LoadW8<W>(w[r] + i);
    for (int a = 0; a < MT; ++a) {
      const __m256 xv = _mm256_loadu_ps(x[a] + i);
      for (int r = 0; r < R; ++r) acc[a][r] = _mm256_fmadd_ps(xv, wv[r], acc[a][r]);
    }
  }
  for (int a = 0; a < MT; ++a)
    for (int r = 0; r < R; ++r) out[a][r] = cpu::HSum(acc[a][r]);
#else
  for (int a = 0; a < MT; ++a)
    for (int r = 0; r < R; ++r) out[a][r] = 0.0f;
#endif
  for (; i < k; ++i) {
    for (int r = 0; r < R; ++r) {
      const float wk = WidenOne<W>(w[r][i]);
      for (int a = 0; a < MT; ++a) out[a][r] += x[a][i] * wk;
    }
  }
}

// Weight rows [r0, r0 + R) against activation rows [a0, a0 + MT).
template <DType W, int MT, int R>
void GemvBlock(const LinearParams& p, int64_t a0, int64_t r0) {
  const WElem<W>* w = static_cast<const WElem<W>*>(p.w);
  const float* xs[MT];
  const WElem<W>* ws[R];
  for (int a = 0; a < MT; ++a) xs[a] = p.x + (a0 + a) * p.ldx;
  for (int r = 0; r < R; ++r) ws[r] = w + (r0 + r) * p.k;
  float out[MT][R];
  DotTile<W, MT, R>(xs, ws, p.k, out);
  for (int a = 0; a < MT; ++a) {
    float* y = p.y + (a0 + a) * p.ldy + r0;
    for (int r = 0; r < R; ++r) y[r] = out[a][r] + (p.bias != nullptr ? p.bias[r0 + r] : 0.0f);
  }
}

// Weight rows [r0, r0 + R) against every activation row, two at a time.
template <DType W, int R>
void GemvRows(const LinearParams& p, int64_t r0) {
  int64_t a = 0;
  for (; a + 2 <= p.m; a += 2) GemvBlock<W, 2, R>(p, a, r0);
  if (a < p.m) GemvBlock<W, 1, R>(p, a, r0);
}

// Few activation rows, parallel over blocks of 4 weight rows.
template <DType W>
void Gemv(const LinearParams& p) {
  constexpr int64_t kRowBlock = 4;
  const int64_t blocks = (p.n + kRowBlock - 1) / kRowBlock;
  // ~64K multiply-adds per chunk keeps the pool's hand-off cost (a few microseconds) small.
  const int64_t min_chunk = std::max<int64_t>(1, 65536 / (kRowBlock * p.k * p.m));
  cpu::ParallelFor(blocks, min_chunk, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * kRowBlock;
      const int64_t rows = std::min(kRowBlock, p.n - r0);
      if (rows == kRowBlock) {
        GemvRows<W, 4>(p, r0);
      } else {
        for (int64_t r = r0; r < p.n; ++r) GemvRows<W, 1>(p, r);
      }
    }
  });
}

// y rows start as the bias (sgemm then accumulates with beta = 1) or are overwritten (beta = 0).
float PrepareBias(const LinearParams& p) {
  if (p.bias == nullptr) return 0.0f;
  for (int64_t i = 0; i < p.m; ++i) {
    std::memcpy(p.y + i * p.ldy, p.bias, static_cast<size_t>(p.n) * sizeof(float));
  }
  return 1.0f;
}

void LinearF32(const LinearParams& p) {
  const float* w = static_cast<const float*>(p.w);
  if (p.m == 1) {
    // Always beta = 1 over an explicitly initialised y: sgemv's beta == 0 goes through sscal,
    // which newer OpenBLAS releases make propagate NaN from y (reference-BLAS semantics), and y
    // may be uninitialised.
    if (PrepareBias(p) == 0.0f) std::fill(p.y, p.y + p.n, 0.0f);
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(p.n), static_cast<int>(p.k), 1.0f, w,
                static_cast<int>(p.k), p.x, 1, 1.0f, p.y, 1);
    return;
  }
  const float beta = PrepareBias(p);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(p.m), static_cast<int>(p.n),
              static_cast<int>(p.k), 1.0f, p.x, static_cast<int>(p.ldx), w, static_cast<int>(p.k),
              beta, p.y, static_cast<int>(p.ldy));
}

// Many activation rows against 16-bit weights: widen a panel of W rows into scratch (on the
// kernel pool), then one sgemm per panel (on OpenBLAS's pool). Panels run one after another on
// purpose: the pthreads OpenBLAS serialises concurrent multi-threaded sgemm calls behind a
// global lock, and cannot be told to run one call single-threaded, so sgemm calls issued from
// several pool workers would queue rather than overlap.
void LinearWidened(const LinearParams& p) {
  const float beta = PrepareBias(p);
  const int64_t panel_rows = std::min(PanelRows(p.m, p.k), p.n);
  // Per calling thread and grown only, so steady-state serving allocates nothing. It holds one
  // panel: 8-16 MiB (16 rows of k floats when k > 256K) per thread that ever ran a prefill.
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(panel_rows * p.k);
  if (scratch.size() < need) scratch.resize(need);
  float* panel = scratch.data();
  const char* w = static_cast<const char*>(p.w);
  const int64_t w_row_bytes = p.k * static_cast<int64_t>(DTypeSize(p.w_dtype));
  const int64_t min_rows = std::max<int64_t>(1, 16384 / p.k);
  for (int64_t n0 = 0; n0 < p.n; n0 += panel_rows) {
    const int64_t rows = std::min(panel_rows, p.n - n0);
    cpu::ParallelFor(rows, min_rows, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        cpu::WidenRow(p.w_dtype, w + (n0 + r) * w_row_bytes, panel + r * p.k, p.k);
      }
    });
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(p.m),
                static_cast<int>(rows), static_cast<int>(p.k), 1.0f, p.x, static_cast<int>(p.ldx),
                panel, static_cast<int>(p.k), beta, p.y + n0, static_cast<int>(p.ldy));
  }
}

absl::Status CheckLinearArgs(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor& y,
                             Stream* stream) {
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream("Linear", stream));
  return checks::CheckLinearTensors(x, w, bias, y, Device::Cpu());
}

}  // namespace

absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                    Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!y.device().is_cpu()) return cuda::Linear(x, w, bias, y, stream);
#endif
  CLEAVE_RETURN_IF_ERROR(CheckLinearArgs(x, w, bias, y, stream));
  LinearParams p{x.data_as<const float>(), w.data(), w.dtype(),
                 bias != nullptr ? bias->data_as<const float>() : nullptr, y.data_as<float>(),
                 x.dim(0), w.dim(0), x.dim(1),
                 // A single row's stride is meaningless (it may be anything); BLAS wants >= k.
                 x.dim(0) > 1 ? x.stride(0) : std::max<int64_t>(x.dim(1), 1),
                 y.dim(0) > 1 ? y.stride(0) : std::max<int64_t>(y.dim(1), 1)};
  if (p.m == 0 || p.n == 0) return absl::OkStatus();
  if (p.k == 0) {  // empty sum: y = bias (or 0); BLAS rejects k == 0 leading dims
    for (int64_t i = 0; i < p.m; ++i) {
      for (int64_t j = 0; j < p.n; ++j) p.y[i * p.ldy + j] = p.bias != nullptr ? p.bias[j] : 0.0f;
    }
    return absl::OkStatus();
  }
  if (g_batch_invariant.load(std::memory_order_relaxed)) {
    cpu::LinearInvariant(p);
    return absl::OkStatus();
  }
  if (p.w_dtype == DType::kF32) {
    // Small f32 products take our GEMV: OpenBLAS threads sgemv from ~9K multiply-adds on, and
    // waking its workers costs more than a small model's whole projection.
    if (p.m <= kGemvMaxRows && p.m * p.n * p.k <= kSmallF32Macs) {
      Gemv<DType::kF32>(p);
    } else {
      LinearF32(p);
    }
  } else if (p.m <= kGemvMaxRows) {
    if (p.w_dtype == DType::kBF16) {
      Gemv<DType::kBF16>(p);
    } else {
      Gemv<DType::kF16>(p);
    }
  } else {
    LinearWidened(p);
  }
  return absl::OkStatus();
}

void SetBatchInvariant(bool on) { g_batch_invariant.store(on, std::memory_order_relaxed); }

bool BatchInvariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

}  // namespace cleave::kernels
