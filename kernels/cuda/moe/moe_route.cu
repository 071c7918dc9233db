// CUDA MoeRoute: softmax + top-k on the device, the permutation on the host (cuda_moe_ops.h).
//
// One warp per token. The warp reduces the row's max and the sum of exp(l - max); probability e is
// then exp(l_e - max) / sum, recomputed by the same instructions whenever it is needed, so it is
// the same value every time. The top-k come out one slot per round: round j picks the best
// expert among those ranking strictly after round j-1's pick, in the CPU's order (descending
// probability, NaN above every number, the lower id first on ties). That order is strict and
// total, so "after the previous pick" is exactly "not picked yet" and no taken-set is needed,
// whatever E and k. Each round is a per-lane scan plus a butterfly argmax (all lanes end with the
// same winner). Lane 0 writes the slot; with renormalisation it then divides the k weights by
// their sum, accumulated in slot order as on the CPU.
//
// NaN logits: like the CPU, any NaN (or an inf, through inf - inf) makes the sum NaN and every
// probability NaN, and the slots are experts 0..k-1 (the max here ignores NaN, the CPU's may not,
// but both end with NaN everywhere).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
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

constexpr const char* kOp = "MoeRoute";
constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ bool RanksBefore(float pa, int a, float pb, int b) {
  const bool na = isnan(pa), nb = isnan(pb);
  if (na != nb) return na;
  if (na || pa == pb) return a < b;
  return pa > pb;
}

__global__ void RouteKernel(const float* __restrict__ logits, int64_t ld, int64_t tokens, int num_experts, int k,
                            bool renormalize, int32_t* __restrict__ ids, float* __restrict__ weights) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); t < tokens;
       t += warps) {
    const float* row = logits + t * ld;
    float max = -INFINITY;
    for (int e = lane; e < num_experts; e += 32) max = fmaxf(max, row[e]);
    for (int o = 16; o > 0; o >>= 1) max = fmaxf(max, __shfl_xor_sync(kFull, max, o));
    float sum = 0.0f;
    for (int e = lane; e < num_experts; e += 32) sum = __fadd_rn(sum, expf(__fsub_rn(row[e], max)));
    for (int o = 16; o > 0; o >>= 1) sum = __fadd_rn(sum, __shfl_xor_sync(kFull, sum, o));

    float prev_p = 0.0f, top_sum = 0.0f;
    int prev_id = -1;
    for (int j = 0; j < k; ++j) {
      float best_p = 0.0f;
      int best_id = -1;  // none yet
      for (int e = lane; e < num_experts; e += 32) {
        const float p = __fdiv_rn(expf(__fsub_rn(row[e], max)), sum);
        if (prev_id >= 0 && !RanksBefore(prev_p, prev_id, p, e)) continue;  // picked already
        if (best_id < 0 || RanksBefore(p, e, best_p, best_id)) {
          best_p = p;
          best_id = e;
        }
      }
      for (int o = 16; o > 0; o >>= 1) {
        const float other_p = __shfl_xor_sync(kFull, best_p, o);
        const int other_id = __shfl_xor_sync(kFull, best_id, o);
        if (other_id >= 0 && (best_id < 0 || RanksBefore(other_p, other_id, best_p, best_id))) {
          best_p = other_p;
          best_id = other_id;
        }
      }
      // k <= E, so some expert is always left: best_id >= 0 here.
      if (lane == 0) {
        ids[t * k + j] = best_id;
        weights[t * k + j] = best_p;
      }
      top_sum = __fadd_rn(top_sum, best_p);
      prev_p = best_p;
      prev_id = best_id;
    }
    if (renormalize && lane == 0) {
      for (int j = 0; j < k; ++j) weights[t * k + j] = __fdiv_rn(weights[t * k + j], top_sum);
    }
  }
}

absl::Status CheckRouteArgs(const Tensor& logits, int top_k, Stream* stream) {
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "router_logits", logits));
  const Device dev = logits.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "router_logits", logits, dev, DType::kF32, {kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "router_logits", logits));
  const int64_t t = logits.dim(0), num_experts = logits.dim(1);
  if (num_experts > moe_internal::kInt32Max) {
    return ArgError(kOp, "router_logits", logits, "has more experts than int32 ids");
  }
  if (top_k < 1 || top_k > num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": top_k ", top_k, " must be in [1, ", num_experts,
                                                   "] (router_logits ", logits.DebugString(), ")"));
  }
  if (t * top_k > moe_internal::kInt32Max) {
    return ArgError(kOp, "router_logits", logits,
                    absl::StrCat("with top_k ", top_k, " has more slots than int32 indexes"));
  }
  CLEAVE_RETURN_IF_ERROR(moe::CheckDeviceExists(kOp, "router_logits", logits));
  if (t == 0) return absl::OkStatus();
  // There is no output tensor to decide the backend, so the logits did: make sure they really are
  // memory of their device (a host array labelled cuda:N would otherwise be read by the kernel).
  cudaPointerAttributes attr{};
  const cudaError_t err = cudaPointerGetAttributes(&attr, logits.data());
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return CudaError(err, "MoeRoute: cudaPointerGetAttributes(router_logits)");
  }
  if ((attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) || attr.device != dev.index) {
    return ArgError(kOp, "router_logits", logits, absl::StrCat("is not device memory of ", dev.ToString()));
  }
  return absl::OkStatus();
}

// routing.device holding at least l.total bytes on `dev`, not shared with a copy of the routing.
absl::Status EnsureMirror(MoeRouting& routing, Device dev, const moe::RoutingLayout& l) {
  if (routing.device != nullptr && routing.device.use_count() == 1 && routing.device->device() == dev &&
      routing.device->size() >= l.total) {
    return absl::OkStatus();
  }
  routing.device.reset();  // frees an unshared old buffer first (cudaFree waits for the device)
  // The old buffer's destructor made its own device current; the op's device again.
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev.index));
  CLEAVE_ASSIGN_OR_RETURN(Backend * backend, CudaBackendFor(dev.index));
  // Some headroom, so a slowly growing batch does not reallocate every call.
  CLEAVE_ASSIGN_OR_RETURN(std::unique_ptr<Buffer> buf, backend->Allocate(l.total + l.total / 2));
  routing.device = std::move(buf);
  return absl::OkStatus();
}

}  // namespace

absl::Status MoeRoute(const Tensor& router_logits, int top_k, bool renormalize, MoeRouting& routing,
                      Stream* stream) {
  CLEAVE_RETURN_IF_ERROR(CheckRouteArgs(router_logits, top_k, stream));
  const Device dev = router_logits.device();
  const int64_t t = router_logits.dim(0);
  const int num_experts = static_cast<int>(router_logits.dim(1));
  const size_t slots = static_cast<size_t>(t * top_k);

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  const moe::RoutingLayout l = moe::MakeRoutingLayout(slots, num_experts);
  if (t > 0) CLEAVE_RETURN_IF_ERROR(EnsureMirror(routing, dev, l));

  routing.num_tokens = static_cast<int>(t);
  routing.num_experts = num_experts;
  routing.top_k = top_k;
  routing.topk_ids.resize(slots);
  routing.topk_weights.resize(slots);
  if (t == 0) {
    routing.device.reset();
    moe_internal::BuildMoePermutation(routing);
    return absl::OkStatus();
  }
  // From here on a failure leaves the host fields half-written: drop the mirror with them.
  char* base = static_cast<char*>(routing.device->data());
  int32_t* d_ids = reinterpret_cast<int32_t*>(base + l.ids);
  float* d_weights = reinterpret_cast<float*>(base + l.weights);
  absl::Status status = [&]() -> absl::Status {
    const int threads = 32 * kWarpsPerBlock;
    RouteKernel<<<GridFor(t, kWarpsPerBlock, int64_t{1} << 16), threads, 0, s>>>(
        router_logits.data_as<const float>(), moe::RowStride(router_logits), t, num_experts, top_k, renormalize,
        d_ids, d_weights);
    CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("MoeRoute: RouteKernel launch");
    CLEAVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(routing.topk_ids.data(), d_ids, slots * sizeof(int32_t), cudaMemcpyDeviceToHost, s));
    CLEAVE_CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(routing.topk_weights.data(), d_weights, slots * sizeof(float), cudaMemcpyDeviceToHost, s));
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));

    // The CPU's permutation code, then its inverse; both uploaded next to the ids and weights.
    moe_internal::BuildMoePermutation(routing);
    std::vector<int32_t> staging((l.total - l.slot_rows) / sizeof(int32_t), 0);
    int32_t* slot_rows = staging.data();
    int32_t* permuted = staging.data() + (l.permuted_slots - l.slot_rows) / sizeof(int32_t);
    int32_t* offsets = staging.data() + (l.expert_offsets - l.slot_rows) / sizeof(int32_t);
    for (size_t r = 0; r < slots; ++r) {
      permuted[r] = routing.permuted_slots[r];
      slot_rows[routing.permuted_slots[r]] = static_cast<int32_t>(r);
    }
    std::copy(routing.expert_offsets.begin(), routing.expert_offsets.end(), offsets);
    // Pageable source: the copy is staged before cudaMemcpyAsync returns, so `staging` may go.
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(base + l.slot_rows, staging.data(), staging.size() * sizeof(int32_t),
                                                cudaMemcpyHostToDevice, s));
    return absl::OkStatus();
  }();
  if (!status.ok()) {
    routing.device.reset();
    return status;
  }
  routing.device_topk_ids = l.ids;
  routing.device_topk_weights = l.weights;
  routing.device_slot_rows = l.slot_rows;
  routing.device_permuted_slots = l.permuted_slots;
  routing.device_expert_offsets = l.expert_offsets;
  return absl::OkStatus();
}

}  // namespace cleave::kernels::cuda
