// Internal to the CUDA Mamba ops (kernels/cuda/ssm/): the host side both ops share. Stream-ordered
// scratch, the check of the batch's index tensors on the device (which also lays out the work
// items), and turning its verdict into the CPU op's InvalidArgument message.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../common/cuda_check.h"
#include "absl/status/status.h"
#include "ssm_device.cuh"

namespace cleave::kernels::cuda::ssm {

inline constexpr int kChannelsPerBlock = 128;  // threads of the per-item kernels


// Multiprocessors of `device` (cached; the device's properties do not change).
[[nodiscard]] absl::Status MultiprocessorCount(int device, int* count);

// Launches the check of the batch (s.qsl, s.slots, s.init, s.num_seqs; T tokens, num_slots slots)
// on `stream`: records the first problem in *bad (which must hold kNoError) and writes
// s.chunk_off[0 .. B] for chunks of s.chunk_tokens tokens. One thread block; duplicate slots are
// found by comparing each slot with all earlier ones (B^2 / 2 compares from shared memory).
[[nodiscard]] absl::Status LaunchSequenceCheck(const SeqIndex& s, int64_t num_tokens, int64_t num_slots,
                                               int32_t* chunk_off, unsigned long long* bad,
                                               cudaStream_t stream);

// Waits for `stream` (FirstBadIndex::Read) and returns OK, or the CPU op's InvalidArgument
// message for the recorded problem (reading the offending values back, more synchronous copies).
[[nodiscard]] absl::Status SequenceVerdict(const char* op, const SeqIndex& s, int64_t num_tokens,
                                           int64_t num_slots, FirstBadIndex& bad, cudaStream_t stream);

}  // namespace cleave::kernels::cuda::ssm
