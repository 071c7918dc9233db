// CUDA implementations of ssm.h's Mamba ops, behind the same calls: kernels::CausalConv1d and
// kernels::SelectiveScan forward here when their `out` is on a CUDA device, in builds with CUDA
// (CLEAVE_WITH_CUDA). Model code never calls these directly. Implementation: kernels/cuda/ssm/.
//
// Contracts are the CPU ops' (ssm.h: shapes, dtypes, strided rows, aliasing rules, state slots,
// InvalidArgument on a bad argument), plus cuda_ops.h's: every tensor of a call, the index tensors
// (query_start_loc, state_slots, has_initial_state) included, is on the output's CUDA device;
// `stream` null means that device's legacy default stream; launch errors come back as Internal.
//
// Synchronisation: both ops are BLOCKING. The index tensors live on the device, so their values
// (query_start_loc runs from 0 to T without decreasing, slots in range and distinct,
// has_initial_state 0 or 1) are checked there, by a kernel that runs first; every later kernel of
// the call reads its verdict and does nothing on a bad batch, so, as on the CPU, a bad batch
// leaves `out` and the state pool untouched. The host then reads the verdict back (FirstBadIndex,
// cuda_check.h), which waits for the stream, and returns InvalidArgument with the CPU op's
// message. The caller's buffers may be reused as soon as the call returns.
//
// Scratch: each call allocates small stream-ordered scratch (cudaMallocAsync; the chunk table,
// and for a chunked scan the chunk carries: about (T / L + B) * C * (N + 1) floats, see below).
//
// Numerics (f32 throughout, no fast-math intrinsics: expf, log1pf, IEEE division):
//  - CausalConv1d: per output, bias then the K taps oldest first (fused multiply-adds), then SiLU
//    x / (1 + expf(-x)): the CPU's order; differences are the exp's last-bit rounding and FMA
//    contraction. Tested at atol 1e-5, rtol 1e-5 against the CPU op.
//  - SelectiveScan: the recurrence of ssm.h in HF's order of operations (dA = expf(delta * A),
//    h = dA * h + (delta * B) * x, y = sum_n h * C with n ascending, + D * x, * silu(z)), softplus
//    exactly torch's (x > 20 ? x : log1p(exp(x))). Long batches are cut into time chunks of L
//    tokens (the kernel chooses L from T, C and the SM count): each chunk's recurrence from zero
//    and its decay exp(A * sum(delta)) are combined across chunks (h_start = decay * h + local),
//    then each chunk re-runs from its true start state. That reassociation, and expf vs the CPU's
//    vector exp, differ from the CPU's sequential loop in the last bits, damped by |dA| < 1.
//    Tested against the CPU op at atol 1e-4 * sqrt(N / 16), rtol 1e-4 (outputs and states).
//  Results are deterministic (no atomics in the arithmetic) and batch invariant for a given L,
//  but not bitwise equal to the CPU backend.
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/ssm.h"

namespace cleave::kernels::cuda {

// ssm.h's CausalConv1d. Any kernel width K >= 1. Blocking (see above).
// x, out: f32 [T, C]; weight f32 [C, K]; bias f32 [C] or empty; conv_state f32 [slots, C, K - 1].
[[nodiscard]] absl::Status CausalConv1d(CausalConv1dArgs& args, Stream* stream);

// ssm.h's SelectiveScan. d_state N <= 256 (as on the CPU); N = 16 has a specialised kernel.
// Blocking (see above). x, dt, z, out: f32 [T, C]; B, C: f32 [T, N]; A f32 [C, N];
// ssm_state f32 [slots, C, N].
[[nodiscard]] absl::Status SelectiveScan(SelectiveScanArgs& args, Stream* stream);

}  // namespace cleave::kernels::cuda
