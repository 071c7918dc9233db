// Dense matrix products on the CPU: a batch-invariant kernel of our own by default, OpenBLAS on
// the fast paths (and cuBLAS on CUDA, later).
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// The projection of every linear layer, in PyTorch nn.Linear layout:
//   y[M, N] = x[M, K] · w[N, K]^T (+ bias[N])
// x, y: f32, contiguous rows (row stride may exceed K / N for x / y).
// w:    f32, bf16 or f16, contiguous [N, K]. 16-bit weights are widened to f32 in cache-sized
//       panels and multiplied with f32 accumulation; memory stays 16-bit.
// bias: optional f32 [N].
// Thread-safe; parallelised over the kernel pool (and OpenBLAS's, off the batch-invariant path).
// In batch-invariant mode (below) row i of y depends only on row i of x and on w, bitwise.
[[nodiscard]] absl::Status Linear(const Tensor& x, const Tensor& w, const Tensor* bias, Tensor& y,
                                  Stream* stream = nullptr);

// Sets the number of threads the CPU kernels use (OpenBLAS and the library's own loops).
// 0 = all cores. Call before serving traffic; not meant to change while ops run.
void SetCpuThreads(int n);
int CpuThreads();

// Batch invariance, process-wide, ON by default: Linear computes every output element with one
// fixed sequence of f32 operations (an 8-lane FMA dot product in K order, a fixed horizontal sum,
// the scalar tail), so a token's row is bitwise the same whether the call has 1 row or 4096, how
// the rows are tiled, and on any thread count. Together with the other CPU kernels, which are
// per-row or (attention) walk keys in a fixed, position-aligned order, this makes a sequence's
// logits independent of what it was batched with: greedy output from a serving worker equals
// `cleave generate` token for token.
//
// Cost (one Zen 2 core, x [T, 2048] · w [2048, 2048]^T, min of 7 runs): T = 1 and T = 16 are as
// fast as the paths it replaces or faster (bf16 T = 16: 2.6 ms vs 4.4 ms); T = 512 prefill
// runs at ~0.6-0.75x OpenBLAS sgemm's throughput (f32: 52-65 vs 85-89 GFLOP/s; bf16 weights:
// 55-62 vs 78-85 GFLOP/s). Attention, norms, RoPE and SwiGLU cost nothing extra.
//
// OFF selects the fast paths instead: OpenBLAS sgemm / sgemv for f32 weights and a
// widen-then-sgemm path for 16-bit weights from 5 rows up, whose reduction order changes with the
// number of rows (and OpenBLAS's with its thread count). Large-T prefill is faster that way, but
// logits then differ in the last bits between batch compositions and greedy output can diverge
// where two top logits are that close (like vLLM without VLLM_BATCH_INVARIANT). Attention stays
// batch-invariant either way. Set once at start-up, before serving traffic; a change takes effect
// at the next Linear call. Thread-safe.
void SetBatchInvariant(bool on);
bool BatchInvariant();

}  // namespace cleave::kernels
