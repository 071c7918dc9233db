// The expert GEMMs of the CUDA MoeExperts: cuBLAS handles leased per call (the scheme of
// kernels/cuda/gemm/gemm.cu, whose pool is private to it) and one pass of many problems run as a
// single cublasGemmGroupedBatchedEx, or as one cublasGemmEx per problem where the grouped call is
// refused.
//
// Every problem is C = A^T * B in cuBLAS's column-major terms (see moe_experts.cu for how the
// row-major expert weights and activations map onto that): transa = T, transb = N, alpha = 1,
// beta = 0 (C is never read). Types: A and B of the pass's dtype (f32, bf16 or f16), C f32,
// CUBLAS_COMPUTE_32F; the handle's math mode is plain f32 (no TF32, no reduced-precision split-K
// reductions), as for cuda::Linear.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "../common/cuda_check.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "moe_internal.h"

namespace cleave::kernels::cuda {
namespace {

std::atomic<int> g_path{static_cast<int>(MoeGemmPath::kAuto)};
thread_local MoeGemmPath t_last_path = MoeGemmPath::kAuto;

}  // namespace

void SetMoeGemmPath(MoeGemmPath path) { g_path.store(static_cast<int>(path)); }
MoeGemmPath LastMoeGemmPath() { return t_last_path; }

namespace moe {

void SetLastMoeGemmPath(MoeGemmPath path) { t_last_path = path; }

// ---- Handles ------------------------------------------------------------------------------------

struct CublasLease::Entry {
  cublasHandle_t handle = nullptr;
  cudaEvent_t last_use = nullptr;  // recorded on the call's stream after each use
  bool used = false;
  cudaStream_t last_stream = nullptr;
};

namespace {

// Free handles per device index. Leaked on purpose: destroying cuBLAS handles during exit races
// CUDA's own teardown.
struct HandlePool {
  std::mutex mu;
  std::map<int, std::vector<CublasLease::Entry*>> free;
  std::set<std::pair<int, DType>> grouped_refused;  // (device, dtype) where grouped said no
};

HandlePool& Pool() {
  static HandlePool* pool = new HandlePool();
  return *pool;
}

}  // namespace

CublasLease::~CublasLease() {
  if (entry_ == nullptr) return;
  HandlePool& pool = Pool();
  std::lock_guard<std::mutex> lock(pool.mu);
  pool.free[device_].push_back(entry_);
}

absl::Status CublasLease::Acquire(int device, cudaStream_t stream) {
  device_ = device;
  stream_ = stream;
  {
    HandlePool& pool = Pool();
    std::lock_guard<std::mutex> lock(pool.mu);
    std::vector<Entry*>& list = pool.free[device];
    if (!list.empty()) {
      // Prefer the handle last used on this stream: then the event wait below is free.
      auto it = std::find_if(list.rbegin(), list.rend(),
                             [&](const Entry* e) { return e->used && e->last_stream == stream; });
      if (it == list.rend()) it = list.rbegin();
      entry_ = *it;
      list.erase(std::next(it).base());
    }
  }
  if (entry_ == nullptr) {  // outside the lock: cublasCreate is slow
    auto e = std::make_unique<Entry>();
    CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasCreate(&e->handle));
    const absl::Status s = [&]() -> absl::Status {
      CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasSetPointerMode(e->handle, CUBLAS_POINTER_MODE_HOST));
      CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasSetMathMode(
          e->handle,
          static_cast<cublasMath_t>(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
      CLEAVE_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e->last_use, cudaEventDisableTiming));
      return absl::OkStatus();
    }();
    if (!s.ok()) {
      cublasDestroy(e->handle);
      return s;
    }
    entry_ = e.release();
  }
  if (entry_->used) CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, entry_->last_use, 0));
  CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasSetStream(entry_->handle, stream));
  return absl::OkStatus();
}

absl::Status CublasLease::Release() {
  if (entry_ == nullptr) return absl::OkStatus();
  const cudaError_t rec = cudaEventRecord(entry_->last_use, stream_);
  if (rec != cudaSuccess) {
    entry_ = nullptr;  // nothing orders this call's work before the next use: never reuse it
    return CudaError(rec, "cudaEventRecord(last_use)");
  }
  entry_->used = true;
  entry_->last_stream = stream_;
  return absl::OkStatus();
}

cublasHandle_t CublasLease::handle() const { return entry_ != nullptr ? entry_->handle : nullptr; }

// ---- Passes -------------------------------------------------------------------------------------

namespace {

cudaDataType CudaType(DType t) {
  switch (t) {
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    default:
      return CUDA_R_32F;
  }
}

absl::Status RunPerProblem(cublasHandle_t handle, const GemmPass& pass) {
  const cudaDataType ab = CudaType(pass.dtype);
  const float alpha = 1.0f, beta = 0.0f;
  for (const GemmGroup& g : pass.groups) {
    for (int p = g.first; p < g.first + g.count; ++p) {
      CLEAVE_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, g.m, g.n, g.k, &alpha,
                                                 pass.a[p], ab, g.lda, pass.b[p], ab, g.ldb, &beta, pass.c[p],
                                                 CUDA_R_32F, g.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  }
  return absl::OkStatus();
}

cublasStatus_t RunGrouped(cublasHandle_t handle, const GemmPass& pass) {
  const size_t n = pass.groups.size();
  std::vector<cublasOperation_t> ta(n, CUBLAS_OP_T), tb(n, CUBLAS_OP_N);
  std::vector<int> m(n), nn(n), k(n), lda(n), ldb(n), ldc(n), size(n);
  std::vector<float> alpha(n, 1.0f), beta(n, 0.0f);
  for (size_t i = 0; i < n; ++i) {
    const GemmGroup& g = pass.groups[i];
    m[i] = g.m;
    nn[i] = g.n;
    k[i] = g.k;
    lda[i] = g.lda;
    ldb[i] = g.ldb;
    ldc[i] = g.ldc;
    size[i] = g.count;
  }
  const cudaDataType ab = CudaType(pass.dtype);
  // The problems of group i are consecutive in the pointer arrays, in group order (first is
  // increasing and contiguous; MoeExperts builds them so).
  return cublasGemmGroupedBatchedEx(handle, ta.data(), tb.data(), m.data(), nn.data(), k.data(), alpha.data(),
                                    reinterpret_cast<const void* const*>(pass.d_a), ab, lda.data(),
                                    reinterpret_cast<const void* const*>(pass.d_b), ab, ldb.data(), beta.data(),
                                    reinterpret_cast<void* const*>(pass.d_c), CUDA_R_32F, ldc.data(),
                                    static_cast<int>(n), size.data(), CUBLAS_COMPUTE_32F);
}

}  // namespace

absl::Status RunGemmPass(cublasHandle_t handle, int device, const GemmPass& pass, cudaStream_t stream,
                         MoeGemmPath* ran) {
  (void)stream;  // the handle is already bound to it (CublasLease::Acquire)
  if (pass.groups.empty()) return absl::OkStatus();
  const MoeGemmPath want = static_cast<MoeGemmPath>(g_path.load());
  HandlePool& pool = Pool();
  bool refused = false;
  if (want == MoeGemmPath::kAuto) {
    std::lock_guard<std::mutex> lock(pool.mu);
    refused = pool.grouped_refused.count({device, pass.dtype}) > 0;
  }
  if (want == MoeGemmPath::kGrouped || (want == MoeGemmPath::kAuto && !refused)) {
    const cublasStatus_t st = RunGrouped(handle, pass);
    if (st == CUBLAS_STATUS_SUCCESS) {
      *ran = MoeGemmPath::kGrouped;
      return absl::OkStatus();
    }
    // cuBLAS checks types and sizes before launching anything, so nothing was enqueued; a
    // combination it does not implement comes back as NOT_SUPPORTED (INVALID_VALUE from some
    // versions). Anything else is a real failure.
    const bool refusal = st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE;
    if (want == MoeGemmPath::kGrouped || !refusal) {
      return CublasError(st, absl::StrCat("MoeExperts: cublasGemmGroupedBatchedEx (", std::string(DTypeName(pass.dtype)),
                                          ", ", pass.groups.size(), " groups)")
                                 .c_str());
    }
    std::lock_guard<std::mutex> lock(pool.mu);
    pool.grouped_refused.insert({device, pass.dtype});
  }
  *ran = MoeGemmPath::kPerExpert;
  return RunPerProblem(handle, pass);
}

}  // namespace moe
}  // namespace cleave::kernels::cuda
