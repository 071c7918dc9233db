// The batch check both CUDA Mamba ops run first (ssm_launch.h): the index tensors' values, checked
// on the device in the CPU check's order, and the work items' layout (chunk_off).
#include <cuda_runtime.h>

#include <cub/cub.cuh>
#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "ssm_device.cuh"
#include "ssm_launch.h"

namespace cleave::kernels::cuda::ssm {
namespace {

constexpr int kCheckThreads = 256;

// One block. Sequences are taken kCheckThreads at a time: each thread checks its sequence, the
// block scans the chunk counts (carrying the running total across tiles), then each thread
// compares its slot with every earlier sequence's, tile by tile through shared memory. Every loop
// bound is the same for all threads, so the barriers inside are reached uniformly.
__global__ void __launch_bounds__(kCheckThreads)
    SequenceCheckKernel(const int32_t* qsl, const int32_t* slots, const int32_t* init, int64_t num_seqs,
                        int64_t num_tokens, int64_t num_slots, int64_t chunk_tokens, int32_t* chunk_off,
                        unsigned long long* bad) {
  using Scan = cub::BlockScan<int32_t, kCheckThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int32_t tile[kCheckThreads];
  __shared__ int32_t total;
  if (threadIdx.x == 0) {
    total = 0;
    chunk_off[0] = 0;
    if (qsl[0] != 0 || qsl[num_seqs] != num_tokens) atomicMin(bad, static_cast<unsigned long long>(ErrorCode(kBandBounds, 0, 0)));
  }
  for (int64_t b0 = 0; b0 < num_seqs; b0 += kCheckThreads) {
    const int64_t i = b0 + threadIdx.x;
    const bool mine = i < num_seqs;
    int32_t count = 0;
    if (mine) {
      const uint64_t code = SequenceError(qsl, slots, init, i, num_slots);
      if (code != kNoError) atomicMin(bad, static_cast<unsigned long long>(code));
      count = static_cast<int32_t>(ChunkCount(qsl, i, chunk_tokens));
    }
    __syncthreads();  // `total` from the previous tile; scan_storage free again
    int32_t inclusive = 0;
    Scan(scan_storage).InclusiveSum(count, inclusive);
    if (mine) chunk_off[i + 1] = total + inclusive;
    __syncthreads();  // everyone has read `total`
    if (threadIdx.x == kCheckThreads - 1) total += inclusive;  // the tile's sum (absent ones add 0)
    const int32_t slot = mine ? slots[i] : 0;
    for (int64_t j0 = 0; j0 <= b0; j0 += kCheckThreads) {
      __syncthreads();
      tile[threadIdx.x] = j0 + threadIdx.x < num_seqs ? slots[j0 + threadIdx.x] : 0;
      __syncthreads();
      if (!mine) continue;
      const int64_t n = Min64(kCheckThreads, i - j0);  // earlier sequences only
      for (int64_t j = 0; j < n; ++j) {
        if (tile[j] == slot) {
          atomicMin(bad, static_cast<unsigned long long>(ErrorCode(kBandDuplicate, i, kDuplicateSlot)));
          break;
        }
      }
    }
  }
}

absl::Status OpError(const char* op, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", problem));
}

}  // namespace

absl::Status MultiprocessorCount(int device, int* count) {
  static int cached[64] = {};
  if (device >= 0 && device < 64 && cached[device] > 0) {
    *count = cached[device];
    return absl::OkStatus();
  }
  int value = 0;
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cached[device] = value;  // benign race: every writer writes the same
  *count = value;
  return absl::OkStatus();
}

absl::Status LaunchSequenceCheck(const SeqIndex& s, int64_t num_tokens, int64_t num_slots, int32_t* chunk_off,
                                 unsigned long long* bad, cudaStream_t stream) {
  SequenceCheckKernel<<<1, kCheckThreads, 0, stream>>>(s.qsl, s.slots, s.init, s.num_seqs, num_tokens, num_slots,
                                                        s.chunk_tokens, chunk_off, bad);
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("SsmSequenceCheck launch");
  return absl::OkStatus();
}

absl::Status SequenceVerdict(const char* op, const SeqIndex& s, int64_t num_tokens, int64_t num_slots,
                             FirstBadIndex& bad, cudaStream_t stream) {
  int64_t value = -1;
  CLEAVE_RETURN_IF_ERROR(bad.Read(&value));
  if (value < 0) return absl::OkStatus();
  const uint64_t code = static_cast<uint64_t>(value);
  const int64_t i = ErrorIndex(code);
  int32_t v0 = 0, v1 = 0;
  switch (ErrorBand(code)) {
    case kBandBounds:
      CLEAVE_RETURN_IF_ERROR(ReadI32(s.qsl, stream, &v0));
      CLEAVE_RETURN_IF_ERROR(ReadI32(s.qsl + s.num_seqs, stream, &v1));
      return OpError(op, absl::StrCat("query_start_loc must run from 0 to T = ", num_tokens, ", got ", v0, " .. ",
                                      v1));
    case kBandSequence:
      if (ErrorKind(code) == kDecreases) {
        CLEAVE_RETURN_IF_ERROR(ReadI32(s.qsl + i, stream, &v0));
        CLEAVE_RETURN_IF_ERROR(ReadI32(s.qsl + i + 1, stream, &v1));
        return OpError(op, absl::StrCat("query_start_loc decreases at sequence ", i, ": ", v0, " -> ", v1));
      }
      if (ErrorKind(code) == kSlotRange) {
        CLEAVE_RETURN_IF_ERROR(ReadI32(s.slots + i, stream, &v0));
        return OpError(op, absl::StrCat("state_slots[", i, "] = ", v0, " is outside the pool's ", num_slots,
                                        " slots"));
      }
      CLEAVE_RETURN_IF_ERROR(ReadI32(s.init + i, stream, &v0));
      return OpError(op, absl::StrCat("has_initial_state[", i, "] = ", v0, " must be 0 or 1"));
    default:
      CLEAVE_RETURN_IF_ERROR(ReadI32(s.slots + i, stream, &v0));
      return OpError(op, absl::StrCat("state slot ", v0, " is used by two sequences"));
  }
}

}  // namespace cleave::kernels::cuda::ssm
