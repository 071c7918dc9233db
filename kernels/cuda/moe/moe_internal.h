// Internal to kernels/cuda/moe/: the pieces the MoE entry points share. Kernels are launched
// through plain functions taking raw pointers and sizes (defined in moe_kernels.cu); the expert
// GEMMs go through RunExpertGemms (moe_gemm.cu), which owns the cuBLAS handles.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../common/cuda_check.h"
#include "absl/status/status.h"
#include "cleave/kernels/cuda_moe_ops.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/moe.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cuda::moe {

// Every region of a scratch or mirror buffer starts on a 256-byte boundary (cuBLAS and vector
// loads like aligned operands).
inline size_t Align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

inline int64_t RowStride(const Tensor& t) { return t.dim(0) > 1 ? t.stride(0) : t.dim(1); }

// True when the memory spanned by two 2-D f32 views intersects.
bool Overlap(const Tensor& a, const Tensor& b);

// A tensor's CUDA device must exist: a view claiming cuda:N on a machine with fewer devices is a
// caller error (InvalidArgument), not a CUDA failure.
absl::Status CheckDeviceExists(const char* op, const char* name, const Tensor& t);

// ---- Routing arrays on the device -------------------------------------------------------------

// Byte offsets of the routing's device arrays (the layout of MoeRouting::device).
struct RoutingLayout {
  size_t ids = 0, weights = 0, slot_rows = 0, permuted_slots = 0, expert_offsets = 0, total = 0;
};
inline RoutingLayout MakeRoutingLayout(size_t slots, int num_experts) {
  RoutingLayout l;
  const size_t a = Align256(slots * 4);
  l.ids = 0;
  l.weights = l.ids + a;
  l.slot_rows = l.weights + a;
  l.permuted_slots = l.slot_rows + a;
  l.expert_offsets = l.permuted_slots + a;
  l.total = l.expert_offsets + Align256((static_cast<size_t>(num_experts) + 1) * 4);
  return l;
}

// The device arrays of `routing` when its mirror is usable on `device` (set, on that device, and
// large enough for the routing's sizes); null pointers otherwise.
struct RoutingArrays {
  const float* weights = nullptr;
  const int32_t* slot_rows = nullptr;
  const int32_t* permuted_slots = nullptr;
};
RoutingArrays MirrorArrays(const MoeRouting& routing, Device device);

// ---- Kernels ------------------------------------------------------------------------------------

// out[r, :] = type(x[permuted_slots[r] / k, :]) for r < rows; out packed [rows, d] of `type`
// (f32, bf16 or f16; 16-bit by round-to-nearest-even).
absl::Status LaunchGatherRows(const float* x, int64_t ldx, const int32_t* permuted_slots, int k, int64_t rows,
                              int64_t d, DType type, void* out, cudaStream_t stream);

// act[r, c] = type(silu(gate_up[r, c]) * gate_up[r, f + c]); gate_up packed f32 [rows, 2f], act
// packed [rows, f] of `type`.
absl::Status LaunchSwiGluRows(const float* gate_up, int64_t rows, int64_t f, DType type, void* act,
                              cudaStream_t stream);

// out[t, :] = sum over j in order of weights[t*k + j] * rows[row_of(t*k + j), :] (the first term a
// product, the rest fmas), row_of = slot_rows, or the identity when slot_rows is null. rows packed
// f32 [T*k, d]; out f32 [T, d] with row stride ldo.
absl::Status LaunchWeightedCombine(const float* rows, const int32_t* slot_rows, const float* weights, int64_t t,
                                   int k, int64_t d, float* out, int64_t ldo, cudaStream_t stream);

// ---- Expert GEMMs -------------------------------------------------------------------------------

// Problems [first, first + count) of a pass share one shape: C (m x n, ld ldc, column-major) =
// A^T (A: k x m, ld lda) * B (k x n, ld ldb), f32 C, A and B of the pass's dtype.
struct GemmGroup {
  int m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0;
  int first = 0, count = 0;
};

// One cuBLAS pass over many problems. a/b/c are the host copies of the operand pointers (used by
// the per-expert path); d_a/d_b/d_c the same arrays in device memory (the grouped call's).
struct GemmPass {
  DType dtype = DType::kF32;
  std::vector<GemmGroup> groups;
  std::vector<const void*> a, b;
  std::vector<void*> c;
  const void* const* d_a = nullptr;
  const void* const* d_b = nullptr;
  void* const* d_c = nullptr;
};

// Exclusive use of one cuBLAS handle of a device for the scope of a call; the handle's previous
// use (possibly on another stream) is ordered before this call's work by an event, as in
// kernels/cuda/gemm/gemm.cu. Handles live for the process.
class CublasLease {
 public:
  CublasLease() = default;
  CublasLease(const CublasLease&) = delete;
  CublasLease& operator=(const CublasLease&) = delete;
  ~CublasLease();
  // `device` must be current. Makes `stream` wait for the handle's previous use.
  [[nodiscard]] absl::Status Acquire(int device, cudaStream_t stream);
  // Records the end of this call's work; call once after enqueueing (also after a failure).
  [[nodiscard]] absl::Status Release();
  cublasHandle_t handle() const;

  struct Entry;  // a pooled handle (moe_gemm.cu)

 private:
  Entry* entry_ = nullptr;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
};

// Runs every problem of `pass` on `stream`: one cublasGemmGroupedBatchedEx, or one cublasGemmEx
// per problem (SetMoeGemmPath, or the grouped call refused for this device and dtype). `ran`
// receives the path taken.
absl::Status RunGemmPass(cublasHandle_t handle, int device, const GemmPass& pass, cudaStream_t stream,
                         MoeGemmPath* ran);

// Records the path for LastMoeGemmPath().
void SetLastMoeGemmPath(MoeGemmPath path);

}  // namespace cleave::kernels::cuda::moe
