// Batched token sampling on a CUDA device: the CPU sampler's semantics (sampling.h), one row of
// logits per request, one call per decode step.
//
// Equivalence with the CPU: for the same logits row and SamplerState, SampleRows picks the token
// Sample() picks whenever the distribution has no near-ties, i.e. unless a decision sits within
// rounding (~1e-7 relative) of a boundary: a top-p mass reaching top_p * total, a weight at
// exactly min_p, or the request's uniform landing on a cumulative boundary. Ties of equal logits
// are decided exactly as on the CPU (lower id first). Both run the same steps: penalties (the
// CPU's f32 arithmetic, with its Release build's fused multiply-add in the frequency term),
// greedy argmax, temperature, top-k, top-p, min-p, and the inverse-CDF draw in id order with the
// request's own uniform (SamplerState::NextUniform(), drawn on the host), so a seeded request
// yields the same tokens on either backend. logprob and top logprobs are log-softmax of the raw
// logits (before penalties), within ~1e-6 absolute of the CPU's (summation order differs).
//
// Cost: greedy rows read the logits once; top-k and top_logprobs use a radix select (five more
// passes over the row, mostly from L2), never a sort; top-p rows sort only the candidates that
// survive top-k, min-p and the CPU's light-token drop, with CUB's segmented radix sort.
#pragma once

#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/sampling.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// Samples one token per row of `logits` (f32 [B, vocab] on a CUDA device, unit inner stride;
// rows may be strided) with states[r] into results[r], r < B. states.size() and results.size()
// must be B; every state must be non-null. Like Sample(), it does not call ObserveOutput; it
// does advance the RNG of every row with temperature > 0 by one uniform, drawn before the launch,
// so a row that then fails (NaN logits) has consumed it where the CPU would not have: that
// request is failed either way.
//
// Per-row failures (the CPU's messages: invalid params, state vocab_size != vocab, NaN or +inf
// logits, every logit -inf) go to results[r] and leave the other rows alone. The call itself
// returns InvalidArgument for a bad tensor, sizes or a null state, Internal for a CUDA failure,
// and FailedPrecondition in builds without CUDA; results are then unspecified.
//
// Work is enqueued on `stream` (null: the device's legacy default stream); the call blocks once,
// at the end, until the B results are back on the host. It allocates its workspace from the
// device's stream-ordered pool (cudaMallocAsync), up to 16 bytes * vocab per top-p row and
// 4 bytes * vocab per row with penalties. Thread-safe for distinct states; one state must not be
// used by two concurrent calls.
[[nodiscard]] absl::Status SampleRows(const Tensor& logits, std::span<SamplerState* const> states,
                                      std::span<absl::StatusOr<SampleResult>> results, Stream* stream);

}  // namespace cleave::kernels
