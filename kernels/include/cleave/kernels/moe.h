// Mixture-of-experts FFN: router, permutation grouped by expert, the experts as one grouped GEMM
// pass, weighted un-permute. The CUDA backend implements the same calls.
//
//   router_logits = x · W_router^T                   (the model does this with Linear)
//   MoeRoute:   softmax over experts, top-k, optional renormalisation -> MoeRouting
//   MoeExperts: for each expert e, the rows routed to e are gathered into one contiguous block and
//               run through SwiGLU(x W_gate_e^T, x W_up_e^T) W_down_e^T as three GEMMs; each
//               token's output is the weighted sum of its k expert outputs, in slot order.
//   SigmoidGatedAdd: out += sigmoid(gate_logit) * y  (Qwen2-MoE's shared expert)
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// Where the T tokens of one pass go. Filled by MoeRoute; buffers are reused across calls.
struct MoeRouting {
  int num_tokens = 0;
  int num_experts = 0;
  int top_k = 0;
  // [T * k]: token t's slot j chose expert topk_ids[t*k + j] with weight topk_weights[t*k + j].
  // Slots are in descending weight order; equal weights keep the lower expert id first (as
  // torch.topk does on CPU).
  std::vector<int32_t> topk_ids;
  std::vector<float> topk_weights;
  // The permutation: rows [expert_offsets[e], expert_offsets[e+1]) of the permuted buffer belong
  // to expert e, in increasing token order; permuted row r holds slot permuted_slots[r]
  // (= t*k + j). expert_offsets: [E + 1], permuted_slots: [T * k].
  std::vector<int32_t> expert_offsets;
  std::vector<int32_t> permuted_slots;

  int tokens_for_expert(int e) const { return expert_offsets[e + 1] - expert_offsets[e]; }

  // Device mirror, filled by the CUDA MoeRoute (router_logits on a CUDA device) and reset to null
  // by the CPU MoeRoute and by a CUDA MoeRoute of zero tokens. One buffer on the logits' device
  // holding copies of the host fields above, each at the given byte offset (256-byte aligned):
  //   device_topk_ids: int32 [T*k]        device_topk_weights: f32 [T*k]
  //   device_slot_rows: int32 [T*k], the inverse permutation (slot s is permuted row
  //     device_slot_rows[s]; not kept on the host)
  //   device_permuted_slots: int32 [T*k]  device_expert_offsets: int32 [E+1]
  // The CUDA MoeExperts / MoeCombine read it instead of uploading the host fields again; it is a
  // cache of those fields, so code that edits the host fields by hand must reset `device` (the
  // ops then upload what they need). Copies of a MoeRouting share the buffer; MoeRoute never
  // writes a shared buffer (it allocates a fresh one), so a copy keeps describing its own pass.
  // The buffer is written by MoeRoute on its stream; readers on another stream must be ordered
  // after that call by the caller (MoeRoute synchronises its stream before returning, so any
  // later enqueue is).
  std::shared_ptr<Buffer> device;
  size_t device_topk_ids = 0;
  size_t device_topk_weights = 0;
  size_t device_slot_rows = 0;
  size_t device_permuted_slots = 0;
  size_t device_expert_offsets = 0;
};

// router_logits: f32 [T, E] (contiguous rows). Softmax in f32 over all E experts, then the top_k
// probabilities; with `renormalize` they are divided by their sum (Mixtral; Qwen2-MoE's
// norm_topk_prob), otherwise kept as softmax probabilities (Qwen2-MoE default, Jamba).
// 1 <= top_k <= E. Fills every field of `routing`.
// CUDA (router_logits on a CUDA device): softmax and top-k run on the device; the T*k ids and
// weights are copied back into the host fields, which synchronises `stream`, and the permutation
// is built on the host by the same code as the CPU's (then uploaded to `routing.device`). So the
// call blocks until the router GEMM before it has finished. Ids equal the CPU's except where two
// probabilities are within the device's expf/summation rounding of each other; weights agree to
// a few f32 ulps.
[[nodiscard]] absl::Status MoeRoute(const Tensor& router_logits, int top_k, bool renormalize,
                                    MoeRouting& routing, Stream* stream = nullptr);

// The weights of E experts, each a view in nn.Linear layout (f32, bf16 or f16):
// gate[e], up[e]: [F, D]; down[e]: [D, F].
struct MoeExpertWeights {
  std::vector<Tensor> gate, up, down;
  int num_experts() const { return static_cast<int>(gate.size()); }
};

// Scratch for MoeExperts, grown on demand and reused; one per executing thread. On CUDA the
// device scratch is used by one stream at a time (calls on different streams with the same
// workspace must be ordered by the caller); the host vectors serve the CPU path (and slot_rows
// also the CUDA path's routing check).
struct MoeWorkspace {
  std::vector<float> permuted_x;   // [T*k, D]
  std::vector<float> gate_up;      // [T*k, 2F]
  std::vector<float> act;          // [T*k, F]
  std::vector<float> expert_out;   // [T*k, D]
  std::vector<int32_t> slot_rows;  // [T*k]: permuted row of slot t*k + j (inverse permutation)
  // CUDA: permuted activations, gate/up, SwiGLU output, expert outputs and the grouped GEMM's
  // pointer arrays, on the op's device (kernels/cuda/moe/moe_internal.h lays it out). Allocated
  // through the CUDA backend and grown on demand (growing frees the old buffer with cudaFree,
  // which waits for the device).
  std::shared_ptr<Buffer> device_scratch;
};

// x: f32 [T, D]; out: f32 [T, D] (overwritten; must not alias x). Experts that receive no token
// cost nothing. Each token's row of `out` depends only on its own row of x and its routing
// (batch-invariant when Linear is).
[[nodiscard]] absl::Status MoeExperts(const Tensor& x, const MoeRouting& routing,
                                      const MoeExpertWeights& weights, MoeWorkspace& ws, Tensor& out,
                                      Stream* stream = nullptr);

// The weighted un-permute of MoeExperts on its own, for when the experts ran elsewhere (attention-
// FFN disaggregation: the FFN workers send back each slot's unweighted expert output).
// slot_out: f32 [T*k, D], row s = the output of slot s's expert for token s / k; out: f32 [T, D]
// (overwritten) = sum over j in slot order of topk_weights[t*k + j] * slot_out[t*k + j], with
// exactly the arithmetic of MoeExperts, so the two agree bit for bit.
[[nodiscard]] absl::Status MoeCombine(const Tensor& slot_out, const MoeRouting& routing, Tensor& out,
                                      Stream* stream = nullptr);

// out[t, :] += sigmoid(gate_logit[t, 0]) * y[t, :]. gate_logit: f32 [T, 1]; y, out: f32 [T, D].
[[nodiscard]] absl::Status SigmoidGatedAdd(const Tensor& gate_logit, const Tensor& y, Tensor& out,
                                           Stream* stream = nullptr);

}  // namespace cleave::kernels
