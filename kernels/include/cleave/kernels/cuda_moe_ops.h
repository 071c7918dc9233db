// CUDA implementations of the ops of moe.h, behind the same calls: kernels::MoeRoute forwards here
// when router_logits is on a CUDA device, MoeExperts / MoeCombine / SigmoidGatedAdd when `out` is,
// in builds with CUDA (CLEAVE_WITH_CUDA). Model code never calls these directly.
//
// Contracts are the CPU ops' (same shapes, dtypes, aliasing rules, InvalidArgument on a bad
// argument, see moe.h), plus cuda_ops.h's: every tensor of a call (and every expert weight) on the
// same CUDA device, `stream` null meaning that device's legacy default stream, Internal with the
// CUDA / cuBLAS error name when a launch or library call fails. A tensor on a CUDA device that
// does not exist, or router_logits that is not device memory of its device, is InvalidArgument.
//
// What synchronises:
//   MoeRoute  — always: the T*k top-k ids and weights come back to the host (MoeRouting's host
//               fields stay the source of truth: the model counts expert loads and AFD ships the
//               routing from them) and the permutation is built there by the CPU's own code
//               (internal/moe_permutation.h), then uploaded to routing.device.
//   MoeExperts, MoeCombine, SigmoidGatedAdd — asynchronous on the stream. They upload small host
//               data (MoeExperts: the grouped GEMM's pointer arrays; both: the routing's
//               arrays when routing.device is not set) with cudaMemcpyAsync from pageable
//               memory, which may wait for the stream's earlier work on some platforms.
//
// Numerics (tests/gpu/cuda_moe_test.cc states the tolerances):
//   MoeRoute: f32 softmax (max-subtracted, accurate expf, IEEE division; the sum reduced across a
//     warp, so in another order than the CPU) and the CPU's slot order (descending probability,
//     NaN first, ties to the lower expert id). Ids equal the CPU's unless two probabilities are
//     within a few ulps; weights agree to a few ulps (renormalised with the CPU's sequential sum).
//   MoeExperts: the rows of each expert gathered (and, for 16-bit weights, rounded to the weight's
//     type: round-to-nearest-even), gate and up as one grouped cuBLAS GEMM over the experts that
//     received tokens (cublasGemmGroupedBatchedEx, f32 accumulation, f32 output; f32 weights as a
//     plain f32 GEMM, no TF32), SwiGLU in f32 (the CPU's silu arithmetic) rounded to the weight's
//     type, the down projection as a second grouped GEMM, then the weighted un-permute in slot
//     order: out = w_0 * y_0, then out = fma(w_j, y_j, out), one thread per output element.
//     Versus the CPU: GEMM summation order, plus for 16-bit weights the rounding of x and of the
//     SwiGLU output (relative 2^-8 bf16 / 2^-11 f16), as cuda::Linear. Where cuBLAS answers
//     NOT_SUPPORTED (or INVALID_VALUE) to the grouped call for a dtype, each expert's GEMMs run as
//     cublasGemmEx calls instead (same types, same result up to summation order), and that choice
//     is remembered per device and dtype.
//   MoeCombine: MoeExperts' un-permute kernel on the slot rows, so the two agree bit for bit on
//     the device.
//   SigmoidGatedAdd: out = fma(1 / (1 + expf(-g)), y, out).
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/moe.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cuda {

// router_logits: f32 [T, E] on a CUDA device, unit inner stride.
[[nodiscard]] absl::Status MoeRoute(const Tensor& router_logits, int top_k, bool renormalize,
                                    MoeRouting& routing, Stream* stream);

// x, out: f32 [T, D] on out's CUDA device; every expert weight on that device, all of one dtype
// (f32, bf16 or f16; the CPU allows a dtype per weight, the grouped GEMM does not).
[[nodiscard]] absl::Status MoeExperts(const Tensor& x, const MoeRouting& routing,
                                      const MoeExpertWeights& weights, MoeWorkspace& ws, Tensor& out,
                                      Stream* stream);

// slot_out: f32 [T*k, D] contiguous; out: f32 [T, D].
[[nodiscard]] absl::Status MoeCombine(const Tensor& slot_out, const MoeRouting& routing, Tensor& out,
                                      Stream* stream);

// gate_logit: f32 [T, 1]; y, out: f32 [T, D].
[[nodiscard]] absl::Status SigmoidGatedAdd(const Tensor& gate_logit, const Tensor& y, Tensor& out,
                                           Stream* stream);

// How MoeExperts runs its expert GEMMs. kAuto: grouped, falling back per expert where cuBLAS
// refuses the grouped call. The others force one path (tests and benchmarks compare them); a
// forced kGrouped returns cuBLAS's error instead of falling back. Process-wide; thread-safe.
enum class MoeGemmPath { kAuto, kGrouped, kPerExpert };
void SetMoeGemmPath(MoeGemmPath path);
// The path the last MoeExperts call on this thread ran (kGrouped or kPerExpert; kAuto before the
// first call, or when it ran no GEMM).
MoeGemmPath LastMoeGemmPath();

}  // namespace cleave::kernels::cuda
