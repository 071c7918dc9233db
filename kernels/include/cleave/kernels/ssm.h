// Mamba (selective state space) ops: the causal depthwise conv1d and the selective scan, over a
// packed batch of sequences (the same varlen layout as attention: query_start_loc), each with its
// own state slot. One call covers prefill (a sequence of tokens, starting from zero state or from
// the slot's state left by an earlier chunk) and decode (one token per sequence).
// The CUDA backend implements the same calls.
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// Which slot each sequence's state lives in, and whether it continues from that state.
struct SsmSequences {
  Tensor query_start_loc;    // i32 [B + 1]: sequence b's tokens are rows [qsl[b], qsl[b+1])
  Tensor state_slots;        // i32 [B]: slot index into the state pools, distinct within a call
  Tensor has_initial_state;  // i32 [B]: 0 = start from zero state (the slot's contents are
                             // ignored and overwritten), 1 = continue from the slot's state
  // A sequence may have no tokens: its slot is then left as it is (1) or zeroed (0).
};

struct CausalConv1dArgs {
  Tensor x;          // f32 [T, C]; rows may be strided (a column slice of in_proj's output)
  Tensor weight;     // f32 [C, K] (HF conv1d.weight [C, 1, K] viewed as [C, K])
  Tensor bias;       // f32 [C], or empty for none
  SsmSequences seqs;
  Tensor conv_state; // f32 [num_slots, C, K - 1]: the last K - 1 inputs of each sequence, oldest
                     // first (left zero-padded for sequences shorter than that); read and updated
  bool silu = true;  // apply SiLU to the output (Mamba does)
  Tensor out;        // f32 [T, C], contiguous; must not overlap any other argument
};

// out[t, c] = act(bias[c] + sum_{i<K} weight[c, i] * xpad[t - (K-1) + i, c]), where xpad is the
// sequence's inputs preceded by its conv state (zeros without initial state). Afterwards the slot
// holds the last K - 1 entries of xpad.
[[nodiscard]] absl::Status CausalConv1d(CausalConv1dArgs& args, Stream* stream = nullptr);

struct SelectiveScanArgs {
  Tensor x;          // f32 [T, C]: u, the conv output; rows may be strided
  Tensor dt;         // f32 [T, C]: delta before bias and softplus; rows may be strided
  Tensor dt_bias;    // f32 [C], or empty
  bool dt_softplus = true;  // delta = softplus(dt + dt_bias) (torch's softplus, threshold 20)
  Tensor A;          // f32 [C, N]: A = -exp(A_log), precomputed by the model (CPU: N <= 256)
  Tensor B;          // f32 [T, N]; rows may be strided (a column slice of x_proj's output)
  Tensor C;          // f32 [T, N]; rows may be strided
  Tensor D;          // f32 [C], or empty for none
  Tensor z;          // f32 [T, C] gate, y *= silu(z); rows may be strided; or empty for none
  SsmSequences seqs;
  Tensor ssm_state;  // f32 [num_slots, C, N]; read and updated
  Tensor out;        // f32 [T, C], contiguous; must not overlap any other argument
};

// Per channel c and state index n, for each token t of a sequence in order:
//   h[c, n] = exp(delta[t, c] * A[c, n]) * h[c, n] + delta[t, c] * B[t, n] * x[t, c]
//   y[t, c] = sum_n h[c, n] * C[t, n] + D[c] * x[t, c];   out[t, c] = y[t, c] * silu(z[t, c])
// h starts from the slot's state (or zero) and is written back after the sequence's last token.
// Parallel over (sequence, channel block); time is walked in chunks so B / C rows stay in cache.
[[nodiscard]] absl::Status SelectiveScan(SelectiveScanArgs& args, Stream* stream = nullptr);

}  // namespace cleave::kernels
