// CUDA MoeExperts (moe.h, cuda_moe_ops.h): gather -> grouped gate/up GEMM -> SwiGLU -> grouped
// down GEMM -> weighted un-permute, all enqueued on the call's stream.
//
// Layout mapping (as in kernels/cuda/gemm/gemm.cu: a row-major [r, c] matrix with row stride ld is
// the column-major c x r matrix with leading dimension ld). For expert e with n_e rows starting at
// permuted row r0, with xq the permuted activations (packed [T*k, D] of the weight dtype):
//   gate: gate_up[r0.., 0:F]  (col-major F x n_e, ld 2F) = gate_e^T-as-A (A: D x F, ld D)^T · xq rows
//         (B: D x n_e, ld D)    ->  m = F, n = n_e, k = D, lda = D, ldb = D, ldc = 2F
//   up:   the same into gate_up[r0.., F:2F]; gate and up of one expert are one group of 2 problems
//   down: y[r0..] (col-major D x n_e, ld D) = down_e (A: F x D, ld F)^T · act rows (B: F x n_e,
//         ld F)                ->  m = D, n = n_e, k = F, lda = F, ldb = F, ldc = D
// Only experts that received tokens get a group, so an idle expert costs nothing.
//
// Device scratch (MoeWorkspace::device_scratch), each region 256-byte aligned:
//   xy       f32 [T*k, D]: first the permuted x in the weight dtype, later (once the gate/up GEMM
//            has consumed it, stream order) the expert outputs y
//   gate_up  f32 [T*k, 2F]
//   act      [T*k, F] in the weight dtype (the down GEMM's B operand)
//   ptrs     the grouped calls' device pointer arrays: A, B, C of the 2G gate/up problems, then
//            A, B, C of the G down problems
//   routing  only when routing.device is not usable: weights f32, permuted_slots i32, slot_rows i32
// ptrs and routing are filled by one host-to-device copy per call.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "../common/cuda_check.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_backend.h"
#include "cleave/kernels/internal/moe_permutation.h"
#include "moe_internal.h"

namespace cleave::kernels::cuda {
namespace {

constexpr const char* kOp = "MoeExperts";
using moe_internal::kInt32Max;

// ---- Argument checks ----------------------------------------------------------------------------

absl::Status CheckExpertWeight(const char* name, int e, const Tensor& w, Device dev, DType dtype, int64_t rows,
                               int64_t cols) {
  const std::string label = absl::StrCat("weights.", name, "[", e, "]");
  CLEAVE_RETURN_IF_ERROR(CheckOnDevice(kOp, label.c_str(), w, dev));
  if (w.dtype() != dtype) {
    return ArgError(kOp, label.c_str(), w,
                    absl::StrCat("must be ", std::string(DTypeName(dtype)),
                                 " like weights.gate[0] (the CUDA experts run as one grouped GEMM of one dtype)"));
  }
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, label.c_str(), w, dev, dtype, {rows, cols}));
  return CheckContiguous(kOp, label.c_str(), w);
}

// Every expert's gate/up [F, D] and down [D, F] on `dev`, one F and one dtype for all.
absl::Status CheckExpertWeights(const MoeExpertWeights& weights, Device dev, int64_t d, int64_t& f, DType& dtype) {
  const size_t num_experts = weights.gate.size();
  if (num_experts == 0 || weights.up.size() != num_experts || weights.down.size() != num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": weights hold ", weights.gate.size(), " gate, ",
                                                   weights.up.size(), " up and ", weights.down.size(),
                                                   " down projections; expected the same number >= 1 of each"));
  }
  if (num_experts > static_cast<size_t>(kInt32Max)) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": ", num_experts, " experts"));
  }
  const Tensor& g0 = weights.gate[0];
  dtype = g0.dtype();
  if (dtype != DType::kF32 && dtype != DType::kBF16 && dtype != DType::kF16) {
    return ArgError(kOp, "weights.gate[0]", g0, "must be f32, bf16 or f16");
  }
  CLEAVE_RETURN_IF_ERROR(CheckExpertWeight("gate", 0, g0, dev, dtype, kAnyDim, d));
  f = g0.dim(0);
  if (2 * f > kInt32Max) return ArgError(kOp, "weights.gate[0]", g0, "exceeds cuBLAS's int range");
  for (int e = 0; e < static_cast<int>(num_experts); ++e) {
    CLEAVE_RETURN_IF_ERROR(CheckExpertWeight("gate", e, weights.gate[e], dev, dtype, f, d));
    CLEAVE_RETURN_IF_ERROR(CheckExpertWeight("up", e, weights.up[e], dev, dtype, f, d));
    CLEAVE_RETURN_IF_ERROR(CheckExpertWeight("down", e, weights.down[e], dev, dtype, d, f));
  }
  return absl::OkStatus();
}

absl::Status CheckArgs(const Tensor& x, const MoeRouting& routing, const MoeExpertWeights& weights,
                       MoeWorkspace& ws, const Tensor& out, Stream* stream, int64_t& f, DType& dtype) {
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "out", out));
  const Device dev = out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "x", x, dev, DType::kF32, {kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "x", x));
  const int64_t t = x.dim(0), d = x.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, dev, DType::kF32, {t, d}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "out", out));
  if (t > 1 && out.stride(0) < d) return ArgError(kOp, "out", out, "has overlapping rows");
  if (moe::Overlap(x, out)) return ArgError(kOp, "out", out, "must not alias x");
  if (d > kInt32Max) return ArgError(kOp, "x", x, "is wider than cuBLAS's int range");
  CLEAVE_RETURN_IF_ERROR(CheckExpertWeights(weights, dev, d, f, dtype));
  CLEAVE_RETURN_IF_ERROR(
      moe_internal::CheckMoeRoutingAndInvert(kOp, routing, t, weights.num_experts(), ws.slot_rows));
  return moe::CheckDeviceExists(kOp, "out", out);
}

// ---- Scratch ------------------------------------------------------------------------------------

struct ScratchLayout {
  size_t xy = 0, gate_up = 0, act = 0, ptrs = 0, weights = 0, permuted_slots = 0, slot_rows = 0, total = 0;
};

ScratchLayout MakeScratchLayout(size_t rows, int64_t d, int64_t f, size_t elem, size_t groups, bool with_routing) {
  using moe::Align256;
  ScratchLayout l;
  l.gate_up = l.xy + Align256(rows * static_cast<size_t>(d) * sizeof(float));
  l.act = l.gate_up + Align256(rows * static_cast<size_t>(2 * f) * sizeof(float));
  l.ptrs = l.act + Align256(rows * static_cast<size_t>(f) * elem);
  l.weights = l.ptrs + Align256(9 * groups * sizeof(void*));
  l.permuted_slots = l.weights + (with_routing ? Align256(rows * 4) : 0);
  l.slot_rows = l.permuted_slots + (with_routing ? Align256(rows * 4) : 0);
  l.total = l.slot_rows + (with_routing ? Align256(rows * 4) : 0);
  return l;
}

absl::Status EnsureScratch(MoeWorkspace& ws, Device dev, size_t bytes) {
  if (ws.device_scratch != nullptr && ws.device_scratch->device() == dev && ws.device_scratch->size() >= bytes) {
    return absl::OkStatus();
  }
  const size_t old = ws.device_scratch != nullptr ? ws.device_scratch->size() : 0;
  ws.device_scratch.reset();  // cudaFree: waits for the device, so in-flight users are done
  // The old buffer's destructor made its own device current; the op's device again.
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev.index));
  CLEAVE_ASSIGN_OR_RETURN(Backend * backend, CudaBackendFor(dev.index));
  // Grow by at least 1.25x so a slowly growing batch does not reallocate every call.
  CLEAVE_ASSIGN_OR_RETURN(std::unique_ptr<Buffer> buf, backend->Allocate(std::max(bytes, old + old / 4)));
  ws.device_scratch = std::move(buf);
  return absl::OkStatus();
}

// ---- The pass -----------------------------------------------------------------------------------

// Fills the two GEMM passes' problems (host pointers, and the device arrays' addresses) for the
// experts that received tokens, and the host image of the ptrs region.
void BuildPasses(const MoeRouting& routing, const MoeExpertWeights& weights, int64_t d, int64_t f, DType dtype,
                 char* base, const ScratchLayout& l, moe::GemmPass& gate_up, moe::GemmPass& down,
                 std::vector<const void*>& ptr_image) {
  const size_t elem = DTypeSize(dtype);
  std::vector<int> active;
  for (int e = 0; e < weights.num_experts(); ++e) {
    if (routing.tokens_for_expert(e) > 0) active.push_back(e);
  }
  const size_t g = active.size();
  gate_up = moe::GemmPass{};
  down = moe::GemmPass{};
  gate_up.dtype = down.dtype = dtype;
  for (size_t i = 0; i < g; ++i) {
    const int e = active[i];
    const int64_t r0 = routing.expert_offsets[e];
    const int n = routing.tokens_for_expert(e);
    const void* xq = base + l.xy + r0 * d * elem;
    char* gu = base + l.gate_up + r0 * 2 * f * sizeof(float);
    gate_up.groups.push_back({static_cast<int>(f), n, static_cast<int>(d), static_cast<int>(d),
                              static_cast<int>(d), static_cast<int>(2 * f), static_cast<int>(2 * i), 2});
    gate_up.a.insert(gate_up.a.end(), {weights.gate[e].data(), weights.up[e].data()});
    gate_up.b.insert(gate_up.b.end(), {xq, xq});
    gate_up.c.insert(gate_up.c.end(), {gu, gu + f * sizeof(float)});
    down.groups.push_back({static_cast<int>(d), n, static_cast<int>(f), static_cast<int>(f), static_cast<int>(f),
                           static_cast<int>(d), static_cast<int>(i), 1});
    down.a.push_back(weights.down[e].data());
    down.b.push_back(base + l.act + r0 * f * elem);
    down.c.push_back(base + l.xy + r0 * d * sizeof(float));
  }
  // Device image: [gate_up A | B | C] (2G each), then [down A | B | C] (G each).
  ptr_image.clear();
  ptr_image.insert(ptr_image.end(), gate_up.a.begin(), gate_up.a.end());
  ptr_image.insert(ptr_image.end(), gate_up.b.begin(), gate_up.b.end());
  ptr_image.insert(ptr_image.end(), gate_up.c.begin(), gate_up.c.end());
  ptr_image.insert(ptr_image.end(), down.a.begin(), down.a.end());
  ptr_image.insert(ptr_image.end(), down.b.begin(), down.b.end());
  ptr_image.insert(ptr_image.end(), down.c.begin(), down.c.end());
  void** dev_ptrs = reinterpret_cast<void**>(base + l.ptrs);
  gate_up.d_a = const_cast<const void* const*>(dev_ptrs);
  gate_up.d_b = const_cast<const void* const*>(dev_ptrs + 2 * g);
  gate_up.d_c = dev_ptrs + 4 * g;
  down.d_a = const_cast<const void* const*>(dev_ptrs + 6 * g);
  down.d_b = const_cast<const void* const*>(dev_ptrs + 7 * g);
  down.d_c = dev_ptrs + 8 * g;
}

struct PassArgs {
  const float* x;
  int64_t ldx, t, d, f;
  int k;
  size_t rows;
  DType dtype;
  char* base;
  ScratchLayout layout;
  moe::RoutingArrays routing;  // device arrays (mirror or uploaded)
  float* out;
  int64_t ldo;
};

absl::Status Enqueue(const PassArgs& a, const moe::GemmPass& gate_up, const moe::GemmPass& down,
                     cublasHandle_t handle, int device, cudaStream_t s) {
  const ScratchLayout& l = a.layout;
  CLEAVE_RETURN_IF_ERROR(moe::LaunchGatherRows(a.x, a.ldx, a.routing.permuted_slots, a.k,
                                               static_cast<int64_t>(a.rows), a.d, a.dtype, a.base + l.xy, s));
  float* y = reinterpret_cast<float*>(a.base + l.xy);
  MoeGemmPath ran_gate_up = MoeGemmPath::kAuto, ran_down = MoeGemmPath::kAuto;
  if (a.f > 0) {
    CLEAVE_RETURN_IF_ERROR(moe::RunGemmPass(handle, device, gate_up, s, &ran_gate_up));
    CLEAVE_RETURN_IF_ERROR(moe::LaunchSwiGluRows(reinterpret_cast<const float*>(a.base + l.gate_up),
                                                 static_cast<int64_t>(a.rows), a.f, a.dtype, a.base + l.act, s));
    CLEAVE_RETURN_IF_ERROR(moe::RunGemmPass(handle, device, down, s, &ran_down));
  } else {  // empty FFN: every expert outputs zeros (Linear with K = 0)
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(y, 0, a.rows * static_cast<size_t>(a.d) * sizeof(float), s));
  }
  moe::SetLastMoeGemmPath(ran_gate_up == MoeGemmPath::kPerExpert || ran_down == MoeGemmPath::kPerExpert
                              ? MoeGemmPath::kPerExpert
                              : ran_gate_up);
  return moe::LaunchWeightedCombine(y, a.routing.slot_rows, a.routing.weights, a.t, a.k, a.d, a.out, a.ldo, s);
}

}  // namespace

absl::Status MoeExperts(const Tensor& x, const MoeRouting& routing, const MoeExpertWeights& weights,
                        MoeWorkspace& ws, Tensor& out, Stream* stream) {
  int64_t f = 0;
  DType dtype = DType::kF32;
  CLEAVE_RETURN_IF_ERROR(CheckArgs(x, routing, weights, ws, out, stream, f, dtype));
  const Device dev = out.device();
  PassArgs a{x.data_as<const float>(), moe::RowStride(x), x.dim(0), x.dim(1), f, routing.top_k,
             routing.permuted_slots.size(), dtype, nullptr, {}, {}, out.data_as<float>(), moe::RowStride(out)};
  moe::SetLastMoeGemmPath(MoeGemmPath::kAuto);
  if (a.rows == 0 || a.d == 0) return absl::OkStatus();

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  a.routing = moe::MirrorArrays(routing, dev);
  const bool upload_routing = a.routing.weights == nullptr;
  size_t groups = 0;
  for (int e = 0; e < weights.num_experts(); ++e) groups += routing.tokens_for_expert(e) > 0 ? 1 : 0;
  a.layout = MakeScratchLayout(a.rows, a.d, f, DTypeSize(dtype), groups, upload_routing);
  CLEAVE_RETURN_IF_ERROR(EnsureScratch(ws, dev, a.layout.total));
  a.base = static_cast<char*>(ws.device_scratch->data());

  // Host image of [ptrs | routing], copied in one go. Pageable source: staged before
  // cudaMemcpyAsync returns, so the vector may go out of scope.
  moe::GemmPass gate_up, down;
  std::vector<const void*> ptrs;
  BuildPasses(routing, weights, a.d, f, dtype, a.base, a.layout, gate_up, down, ptrs);
  const ScratchLayout& l = a.layout;
  std::vector<unsigned char> image(l.total - l.ptrs, 0);
  std::memcpy(image.data(), ptrs.data(), ptrs.size() * sizeof(void*));
  if (upload_routing) {
    std::memcpy(image.data() + (l.weights - l.ptrs), routing.topk_weights.data(), a.rows * sizeof(float));
    std::memcpy(image.data() + (l.permuted_slots - l.ptrs), routing.permuted_slots.data(), a.rows * 4);
    std::memcpy(image.data() + (l.slot_rows - l.ptrs), ws.slot_rows.data(), a.rows * 4);
    a.routing = {reinterpret_cast<const float*>(a.base + l.weights),
                 reinterpret_cast<const int32_t*>(a.base + l.slot_rows),
                 reinterpret_cast<const int32_t*>(a.base + l.permuted_slots)};
  }
  CLEAVE_CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(a.base + l.ptrs, image.data(), image.size(), cudaMemcpyHostToDevice, s));

  moe::CublasLease lease;
  CLEAVE_RETURN_IF_ERROR(lease.Acquire(dev.index, s));
  const absl::Status status = Enqueue(a, gate_up, down, lease.handle(), dev.index, s);
  // Released even after a failure: whatever did get enqueued must finish before the next use.
  const absl::Status released = lease.Release();
  return status.ok() ? released : status;
}

}  // namespace cleave::kernels::cuda
