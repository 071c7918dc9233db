// CUDA Linear (gemm.h, cuda_ops.h):  y[M, N] = x[M, K] · w[N, K]^T (+ bias[N]), through cuBLAS.
//
// Layout mapping (read this first when debugging on a GPU). cuBLAS is column-major, our tensors
// are row-major. A row-major matrix R[r, c] with row stride ld is, byte for byte, the column-major
// matrix R^T (c rows x r columns) with leading dimension ld. So
//   x  row-major [M, K], row stride ldx   ==  column-major X' = x^T : K x M, ld = ldx
//   w  row-major [N, K], contiguous       ==  column-major W' = w^T : K x N, ld = K
//   y  row-major [M, N], row stride ldy   ==  column-major Y' = y^T : N x M, ld = ldy
// and  y = x · w^T  <=>  y^T = w · x^T  <=>  Y' = W'^T · X'. One cublasGemmEx call:
//   transa = CUBLAS_OP_T, transb = CUBLAS_OP_N, m = N, n = M, k = K,
//   A = w (lda = K), B = x (ldb = ldx; the 16-bit copy of x is packed, ldb = K),
//   C = y (ldc = ldy), alpha = 1, beta = 0 (cuBLAS never reads C when beta == 0, so an
//   uninitialised or NaN-filled y is fine).
// cuBLAS's requirements lda >= K, ldb >= K, ldc >= N hold because the checks below demand row
// strides >= K / N (as the CPU op does); a single row's stride is meaningless and replaced by K / N.
//
// Precision paths:
//   f32 weights:      A, B, C all CUDA_R_32F, CUBLAS_COMPUTE_32F with CUBLAS_DEFAULT_MATH: plain
//                     f32 FMA (SIMT) GEMM, no TF32 and no BF16x9 emulation (those need
//                     CUBLAS_COMPUTE_32F_FAST_TF32 / _EMULATED_16BFX9 or the matching math mode;
//                     beware the NVIDIA_TF32_OVERRIDE / CUBLAS_EMULATE_SINGLE_PRECISION env vars,
//                     which this code does not set).
//   bf16/f16 weights: x is first rounded (round-to-nearest-even) to the weight's type into a
//                     device scratch buffer, [M, K] packed; then A = w, B = x16 (both 16-bit),
//                     C = y (CUDA_R_32F), CUBLAS_COMPUTE_32F: tensor-core products with f32
//                     accumulation. The weights are read as stored, never widened in memory.
//   bias:             a separate kernel after the GEMM, y[i, j] = gemm[i, j] + bias[j] (one f32
//                     add, the same rounding as the CPU batch-invariant kernel's "sum + bias").
//   K == 0:           no GEMM; a kernel writes y[i, j] = bias[j] (or 0).
//
// Numerics against the CPU reference (f32 products of x and the widened w, f32 accumulation):
// summation order differs (cuBLAS tiles and may split K), so not bitwise. f32: error ~ a few
// ulp * sqrt(K) relative to sum_k |x_k w_k|. bf16/f16: the extra error is the rounding of x,
// |x16 - x| <= 2^-8 |x| (bf16) or 2^-11 |x| (f16, normal range), so |y_gpu - y_cpu| <=
// u * sum_k |x_k w_jk| (+ the f32 term) with u = 2^-8 / 2^-11. f16 additionally overflows x
// beyond +-65504 to +-inf and flushes |x| < 2^-25 to zero (subnormals below 2^-14 lose bits).
//
// Resources: cuBLAS handles are not safe to share between concurrent calls, so each call leases a
// Workspace (cuBLAS handle + 16-bit scratch + an event) from a per-device free list and returns it
// when done; there are as many workspaces per device as calls ever ran concurrently on it. A
// workspace may next be used on another stream while this call's GEMM still runs on the GPU, so
// every call first makes its stream wait on the event recorded after the workspace's previous
// use: the scratch buffer (and cuBLAS's own per-handle workspace) are never touched by two
// streams' work at once (a stream is preferably given back the workspace it used last, so that
// wait is free in the steady state). Scratch is stream-ordered memory (cudaMallocAsync), grown on
// demand and kept. Workspaces live for the process (never destroyed: destroying cuBLAS handles
// during exit races CUDA's own teardown).
//
// Not provided (yet): batch invariance (cuBLAS picks tiles and split-K by shape, so a row's result
// can change in the last bits with M; SetBatchInvariant() does not affect this path), and CUDA
// graph capture (the cross-stream event wait, the scratch allocation and cuBLAS's default
// workspace were not designed for it).
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "../common/cuda_check.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ops.h"

namespace cleave::kernels::cuda {
namespace {

constexpr const char* kOp = "Linear";

// ---- Kernels ------------------------------------------------------------------------------------

// Both elementwise kernels walk an [rows, cols] matrix with a 2-D grid-stride loop: grid.y over
// rows, grid.x * blockDim.x over columns. Indices are 64-bit (M * K may exceed 2^31).
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T RoundTo(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 RoundTo<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half RoundTo<__half>(float v) {
  return __float2half_rn(v);
}

// out[r, c] = T(x[r * ldx + c]); out packed [rows, cols].
template <typename T>
__global__ void RoundRowsKernel(const float* __restrict__ x, int64_t ldx, int64_t rows, int64_t cols,
                                T* __restrict__ out) {
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* xr = x + r * ldx;
    T* orow = out + r * cols;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += col_step) {
      orow[c] = RoundTo<T>(xr[c]);
    }
  }
}

// y[r, c] = (accumulate ? y[r, c] : 0) + (bias ? bias[c] : 0).
__global__ void BiasRowsKernel(float* __restrict__ y, int64_t ldy, int64_t rows, int64_t cols,
                               const float* __restrict__ bias, bool accumulate) {
  const int64_t col_step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    float* yr = y + r * ldy;
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += col_step) {
      const float b = bias != nullptr ? bias[c] : 0.0f;
      yr[c] = accumulate ? yr[c] + b : b;
    }
  }
}

// Enough blocks to cover a row in one pass (up to 1024 * 256 columns), and rows up to ~8K blocks
// in all (a few waves on an H100/H200; the loops stride over the rest).
dim3 RowsGrid(int64_t rows, int64_t cols) {
  const unsigned int gx = GridFor(cols, kThreads, 1024);
  const int64_t max_gy = std::max<int64_t>(1, std::min<int64_t>(65535, 8192 / gx));
  const unsigned int gy = static_cast<unsigned int>(std::max<int64_t>(1, std::min(rows, max_gy)));
  return dim3(gx, gy, 1);
}

absl::Status LaunchBiasRows(float* y, int64_t ldy, int64_t rows, int64_t cols, const float* bias,
                            bool accumulate, cudaStream_t stream) {
  BiasRowsKernel<<<RowsGrid(rows, cols), kThreads, 0, stream>>>(y, ldy, rows, cols, bias, accumulate);
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("Linear: BiasRowsKernel launch");
  return absl::OkStatus();
}

template <typename T>
absl::Status LaunchRoundRows(const float* x, int64_t ldx, int64_t rows, int64_t cols, void* out,
                             cudaStream_t stream) {
  RoundRowsKernel<T><<<RowsGrid(rows, cols), kThreads, 0, stream>>>(x, ldx, rows, cols, static_cast<T*>(out));
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("Linear: RoundRowsKernel launch");
  return absl::OkStatus();
}

// ---- Workspaces ---------------------------------------------------------------------------------

struct Workspace {
  cublasHandle_t handle = nullptr;
  cudaEvent_t last_use = nullptr;  // recorded on the call's stream after each use
  bool used = false;               // last_use has been recorded at least once
  cudaStream_t last_stream = nullptr;  // the stream of that record (a preference, see Acquire)
  void* scratch = nullptr;         // stream-ordered (cudaMallocAsync) 16-bit copy of x
  size_t scratch_bytes = 0;
};

// Free workspaces per device index. Leaked on purpose (see the top of the file).
struct WorkspacePool {
  std::mutex mu;
  std::map<int, std::vector<Workspace*>> free;
};

WorkspacePool& Pool() {
  static WorkspacePool* pool = new WorkspacePool();
  return *pool;
}

// A new workspace on the current device (`device`, made current by the caller).
absl::StatusOr<Workspace*> NewWorkspace() {
  auto ws = std::make_unique<Workspace>();
  CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasCreate(&ws->handle));
  absl::Status s = [&]() -> absl::Status {
    CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasSetPointerMode(ws->handle, CUBLAS_POINTER_MODE_HOST));
    // Plain f32 math (no TF32, no emulation); split-K reductions, if any, in the compute type.
    CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(
        ws->handle, static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&ws->last_use, cudaEventDisableTiming));
    return absl::OkStatus();
  }();
  if (!s.ok()) {
    cublasDestroy(ws->handle);
    return s;
  }
  return ws.release();
}

// Exclusive use of one workspace of `device` for the scope of a call.
class WorkspaceLease {
 public:
  WorkspaceLease() = default;
  WorkspaceLease(const WorkspaceLease&) = delete;
  WorkspaceLease& operator=(const WorkspaceLease&) = delete;
  ~WorkspaceLease() {
    if (ws_ == nullptr) return;
    WorkspacePool& pool = Pool();
    std::lock_guard<std::mutex> lock(pool.mu);
    pool.free[device_].push_back(ws_);
  }

  // `device` must be current. Prefers a workspace last used on `stream`, so that concurrent
  // streams each settle on their own and the wait on last_use costs nothing in the steady state
  // (another stream's workspace makes this call wait for that stream's previous GEMM).
  [[nodiscard]] absl::Status Acquire(int device, cudaStream_t stream) {
    device_ = device;
    {
      WorkspacePool& pool = Pool();
      std::lock_guard<std::mutex> lock(pool.mu);
      std::vector<Workspace*>& list = pool.free[device];
      if (!list.empty()) {
        auto it = std::find_if(list.rbegin(), list.rend(),
                               [&](const Workspace* w) { return w->used && w->last_stream == stream; });
        if (it == list.rend()) it = list.rbegin();
        ws_ = *it;
        list.erase(std::next(it).base());
        return absl::OkStatus();
      }
    }
    CLEAVE_ASSIGN_OR_RETURN(ws_, NewWorkspace());  // outside the lock: cublasCreate is slow
    return absl::OkStatus();
  }
  Workspace* get() const { return ws_; }
  // Drops the workspace instead of returning it to the pool (leaked; only after a CUDA failure).
  void Discard() { ws_ = nullptr; }

 private:
  Workspace* ws_ = nullptr;
  int device_ = 0;
};

// Makes ws->scratch hold at least `bytes`, stream-ordered on `stream` (which already waits for
// the workspace's previous use, so the old buffer may be freed here).
absl::Status EnsureScratch(Workspace* ws, size_t bytes, cudaStream_t stream) {
  if (ws->scratch_bytes >= bytes) return absl::OkStatus();
  if (ws->scratch != nullptr) {
    void* old = ws->scratch;
    ws->scratch = nullptr;
    ws->scratch_bytes = 0;
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaFreeAsync(old, stream));
  }
  // Grow by at least 1.5x so a prefill of slowly increasing length does not reallocate each call;
  // 2 MiB granularity.
  constexpr size_t kGranule = size_t{2} << 20;
  size_t want = std::max(bytes, ws->scratch_bytes + ws->scratch_bytes / 2);
  want = (want + kGranule - 1) / kGranule * kGranule;
  void* p = nullptr;
  const cudaError_t err = cudaMallocAsync(&p, want, stream);
  if (err == cudaErrorMemoryAllocation) {
    (void)cudaGetLastError();  // clear the (non-sticky) error so later launch checks don't report it
    return absl::ResourceExhaustedError(
        absl::StrCat("Linear: cudaMallocAsync of ", want, " bytes of activation scratch failed"));
  }
  CLEAVE_CUDA_RETURN_IF_ERROR(err);
  ws->scratch = p;
  ws->scratch_bytes = want;
  return absl::OkStatus();
}

// ---- Linear -------------------------------------------------------------------------------------

// The CPU's checks (internal/arg_checks.h) on y's CUDA device, and the stream of that device.
absl::Status CheckLinearArgs(const Tensor& x, const Tensor& w, const Tensor* bias, const Tensor& y,
                             Stream* stream) {
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "y", y));
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, y.device()));
  return checks::CheckLinearTensors(x, w, bias, y, y.device());
}

struct GemmArgs {
  int64_t m, n, k, ldx, ldy;
  const float* x;
  const void* w;
  DType w_dtype;
  const float* bias;
  float* y;
};

// The work of one call, enqueued on `stream` with `ws` leased and synchronised.
absl::Status Enqueue(const GemmArgs& a, Workspace* ws, cudaStream_t stream) {
  CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasSetStream(ws->handle, stream));
  const void* b = a.x;
  cudaDataType ab_type = CUDA_R_32F;
  int64_t ldb = a.ldx;
  if (a.w_dtype != DType::kF32) {
    const size_t bytes = static_cast<size_t>(a.m) * static_cast<size_t>(a.k) * 2;
    CLEAVE_RETURN_IF_ERROR(EnsureScratch(ws, bytes, stream));
    if (a.w_dtype == DType::kBF16) {
      CLEAVE_RETURN_IF_ERROR(LaunchRoundRows<__nv_bfloat16>(a.x, a.ldx, a.m, a.k, ws->scratch, stream));
      ab_type = CUDA_R_16BF;
    } else {
      CLEAVE_RETURN_IF_ERROR(LaunchRoundRows<__half>(a.x, a.ldx, a.m, a.k, ws->scratch, stream));
      ab_type = CUDA_R_16F;
    }
    b = ws->scratch;
    ldb = a.k;
  }
  const float alpha = 1.0f, beta = 0.0f;
  // Y' (N x M, ld ldy) = W'^T (N x K; W' is K x N, ld K) · X' (K x M, ld ldb). See the top.
  CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(
      ws->handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(a.n), static_cast<int>(a.m),
      static_cast<int>(a.k), &alpha, a.w, ab_type, static_cast<int>(a.k), b, ab_type,
      static_cast<int>(ldb), &beta, a.y, CUDA_R_32F, static_cast<int>(a.ldy), CUBLAS_COMPUTE_32F,
      CUBLAS_GEMM_DEFAULT));
  if (a.bias != nullptr) {
    CLEAVE_RETURN_IF_ERROR(LaunchBiasRows(a.y, a.ldy, a.m, a.n, a.bias, /*accumulate=*/true, stream));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y, Stream* stream) {
  CLEAVE_RETURN_IF_ERROR(CheckLinearArgs(x, w, bias, y, stream));
  GemmArgs a{x.dim(0),
             w.dim(0),
             x.dim(1),
             // A single row's stride is meaningless (it may be anything); cuBLAS wants >= K / N.
             x.dim(0) > 1 ? x.stride(0) : std::max<int64_t>(x.dim(1), 1),
             y.dim(0) > 1 ? y.stride(0) : std::max<int64_t>(y.dim(1), 1),
             x.data_as<const float>(),
             w.data(),
             w.dtype(),
             bias != nullptr ? bias->data_as<const float>() : nullptr,
             y.data_as<float>()};
  if (a.m == 0 || a.n == 0) return absl::OkStatus();

  ScopedDevice device;
  CLEAVE_RETURN_IF_ERROR(device.Set(y.device().index));
  const cudaStream_t s = NativeStream(stream);
  if (a.k == 0) {  // empty sum: y = bias (or 0); cuBLAS would want lda >= 1
    return LaunchBiasRows(a.y, a.ldy, a.m, a.n, a.bias, /*accumulate=*/false, s);
  }

  WorkspaceLease lease;
  CLEAVE_RETURN_IF_ERROR(lease.Acquire(y.device().index, s));
  Workspace* ws = lease.get();
  // The workspace's previous call may have run on another stream and still be in flight. Waited
  // for even on the same stream (free there): a destroyed stream's handle can be reused.
  if (ws->used) {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(s, ws->last_use, 0));
  }
  const absl::Status status = Enqueue(a, ws, s);
  // Recorded even after a failure: whatever did get enqueued must finish before the next use.
  const cudaError_t rec = cudaEventRecord(ws->last_use, s);
  if (rec != cudaSuccess) {
    // Nothing orders this call's work before the workspace's next use: never reuse it.
    lease.Discard();
    return status.ok() ? CudaError(rec, "cudaEventRecord(ws->last_use, s)") : status;
  }
  ws->used = true;
  ws->last_stream = s;
  return status;
}

}  // namespace cleave::kernels::cuda
