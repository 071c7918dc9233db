// CUDA SelectiveScan (ssm.h). Threads run over channels (a block is one work item times 128
// channels, so the [T, C] rows of x, dt, z and out move as coalesced runs and each B / C row is
// one broadcast per block); time is cut into chunks of L tokens so that long sequences spread
// over many blocks (ssm_device.cuh):
//   - one pass when every sequence is a single item (T <= kSinglePassTokens: decode and small
//     batches): each thread runs its channel's recurrence from the slot's state straight through;
//   - otherwise three: (1) each chunk's recurrence from zero, keeping its end state and the sum of
//     its deltas; (2) per (sequence, state, channel), the chunks' start states in order,
//     h_start[k + 1] = exp(A * sum(delta_k)) * h_start[k] + local_k; (3) each chunk again from
//     its true start state, writing y and, from a sequence's last chunk, the slot.
// The chunked path does the recurrence twice, which buys parallelism over time: a single long
// sequence still fills the GPU. States are walked 16 at a time in registers (N <= 256).
//
// Blocking: the batch's index tensors are checked on the device first and the verdict read back
// (ssm_launch.h), which synchronises the stream.
#include <cuda_runtime.h>

#include <cstdint>

#include "../../cpu/ssm_checks.h"
#include "../common/cuda_check.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ssm_ops.h"
#include "ssm_device.cuh"
#include "ssm_launch.h"

namespace cleave::kernels::cuda {
namespace {

constexpr int64_t kMaxStateDim = 256;       // as on the CPU
constexpr int64_t kSinglePassTokens = 256;  // T at or below: one pass, no chunking
constexpr int64_t kMinChunk = 64;
constexpr size_t kMaxCarryBytes = size_t{512} << 20;  // chunk carries; L grows to stay below
constexpr int kCarryThreads = 256;

template <int kN>
__global__ void __launch_bounds__(ssm::kChannelsPerBlock)
    ScanLocalKernel(ssm::ScanParams p, const unsigned long long* bad) {
  if (*bad != ssm::kNoError) return;
  ssm::Item it;
  if (!ssm::FindItem(p.seqs, blockIdx.x, &it)) return;
  const int64_t ch = int64_t{blockIdx.y} * ssm::kChannelsPerBlock + threadIdx.x;
  if (ch < p.channels) ssm::ScanLocalThread<kN>(p, it, ch);
}

__global__ void __launch_bounds__(kCarryThreads) ScanCarryKernel(ssm::ScanParams p, const unsigned long long* bad) {
  if (*bad != ssm::kNoError) return;
  const int64_t total = p.seqs.num_seqs * p.d_state * p.channels;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < total; i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t ch = i % p.channels, rest = i / p.channels;
    ssm::ScanCarryThread(p, rest / p.d_state, rest % p.d_state, ch);
  }
}

template <int kN>
__global__ void __launch_bounds__(ssm::kChannelsPerBlock)
    ScanOutputKernel(ssm::ScanParams p, const unsigned long long* bad) {
  if (*bad != ssm::kNoError) return;
  ssm::Item it;
  if (!ssm::FindItem(p.seqs, blockIdx.x, &it)) return;
  const int64_t ch = int64_t{blockIdx.y} * ssm::kChannelsPerBlock + threadIdx.x;
  if (ch < p.channels) ssm::ScanOutputThread<kN>(p, it, ch);
}

int64_t RowStride(const Tensor& t) { return t.dim(0) > 1 ? t.stride(0) : t.dim(1); }

// Tokens per chunk: the whole batch when it is small; otherwise the largest power of two (>= 64)
// that still gives about one full wave of resident threads (SMs * 2048) over the chunks of all
// channels, raised until the carries fit kMaxCarryBytes.
int64_t ChunkTokens(int64_t t, int64_t b, int64_t c, int64_t n, int sms) {
  if (t <= kSinglePassTokens) return t > 0 ? t : 1;
  const int64_t wave = int64_t{sms} * 2048;
  int64_t l = kMinChunk;
  while (l < t && 2 * l * wave <= t * c) l *= 2;
  while (l < t && static_cast<size_t>((t / l + 1 + b) * (n + 1) * c) * sizeof(float) > kMaxCarryBytes) l *= 2;
  return l < t ? l : t;
}

struct Launch {
  dim3 grid;
  cudaStream_t stream;
  const unsigned long long* bad;
};

template <int kN>
absl::Status RunPasses(const ssm::ScanParams& p, const Launch& l) {
  if (p.carry != nullptr) {
    ScanLocalKernel<kN><<<l.grid, ssm::kChannelsPerBlock, 0, l.stream>>>(p, l.bad);
    CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("SelectiveScan (chunk states) launch");
    const int64_t total = p.seqs.num_seqs * p.d_state * p.channels;
    ScanCarryKernel<<<GridFor(total, kCarryThreads, int64_t{1} << 20), kCarryThreads, 0, l.stream>>>(p, l.bad);
    CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("SelectiveScan (carries) launch");
  }
  ScanOutputKernel<kN><<<l.grid, ssm::kChannelsPerBlock, 0, l.stream>>>(p, l.bad);
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("SelectiveScan launch");
  return absl::OkStatus();
}

// Shapes, dtypes, strides and overlaps on `dev`, as the CPU op checks them; returns B.
absl::StatusOr<int64_t> CheckScanArgs(const SelectiveScanArgs& a, Device dev) {
  namespace chk = cpu::ssm;
  constexpr const char* kOp = "SelectiveScan";
  CLEAVE_RETURN_IF_ERROR(chk::CheckRowsOn(kOp, "x", a.x, dev, kAnyDim, kAnyDim));
  const int64_t t = a.x.dim(0), c = a.x.dim(1);
  CLEAVE_RETURN_IF_ERROR(chk::CheckRowsOn(kOp, "A", a.A, dev, c, kAnyDim));
  const int64_t n = a.A.dim(1);
  if (n > kMaxStateDim) {
    return ArgError(kOp, "A", a.A, absl::StrCat("has d_state N > ", kMaxStateDim, ", unsupported on cuda"));
  }
  CLEAVE_RETURN_IF_ERROR(chk::CheckRowsOn(kOp, "dt", a.dt, dev, t, c));
  CLEAVE_RETURN_IF_ERROR(chk::CheckOptionalVectorOn(kOp, "dt_bias", a.dt_bias, dev, c));
  CLEAVE_RETURN_IF_ERROR(chk::CheckRowsOn(kOp, "B", a.B, dev, t, n));
  CLEAVE_RETURN_IF_ERROR(chk::CheckRowsOn(kOp, "C", a.C, dev, t, n));
  CLEAVE_RETURN_IF_ERROR(chk::CheckOptionalVectorOn(kOp, "D", a.D, dev, c));
  if (!a.z.empty()) CLEAVE_RETURN_IF_ERROR(chk::CheckRowsOn(kOp, "z", a.z, dev, t, c));
  const chk::NamedTensors inputs = {{"x", &a.x}, {"dt", &a.dt}, {"dt_bias", &a.dt_bias}, {"A", &a.A},
                                    {"B", &a.B}, {"C", &a.C},   {"D", &a.D},             {"z", &a.z}};
  CLEAVE_ASSIGN_OR_RETURN(const int64_t num_seqs, chk::CheckOutputsAndIndexShapes(kOp, "ssm_state", a.ssm_state, n,
                                                                                  a.out, t, c, inputs, a.seqs, dev));
  if ((c + ssm::kChannelsPerBlock - 1) / ssm::kChannelsPerBlock > 65535) {
    return ArgError(kOp, "x", a.x, "has more channels than the CUDA kernel supports");
  }
  return num_seqs;
}

}  // namespace

absl::Status SelectiveScan(SelectiveScanArgs& a, Stream* stream) {
  constexpr const char* kOp = "SelectiveScan";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "out", a.out));
  const Device dev = a.out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_ASSIGN_OR_RETURN(const int64_t num_seqs, CheckScanArgs(a, dev));
  const int64_t t = a.x.dim(0), c = a.x.dim(1), n = a.A.dim(1);

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  int sms = 0;
  CLEAVE_RETURN_IF_ERROR(ssm::MultiprocessorCount(dev.index, &sms));
  ssm::ScanParams p;
  p.seqs.qsl = a.seqs.query_start_loc.data_as<const int32_t>();
  p.seqs.slots = a.seqs.state_slots.data_as<const int32_t>();
  p.seqs.init = a.seqs.has_initial_state.data_as<const int32_t>();
  p.seqs.num_seqs = num_seqs;
  p.seqs.chunk_tokens = ChunkTokens(t, num_seqs, c, n, sms);
  const int64_t num_slots = a.ssm_state.dim(0);

  FirstBadIndex bad(s);
  CLEAVE_RETURN_IF_ERROR(bad.Init());
  StreamScratch offsets(s), carry(s);
  CLEAVE_RETURN_IF_ERROR(offsets.Allocate(static_cast<size_t>(num_seqs + 1) * sizeof(int32_t)));
  p.seqs.chunk_off = offsets.as<int32_t>();
  CLEAVE_RETURN_IF_ERROR(ssm::LaunchSequenceCheck(p.seqs, t, num_slots, offsets.as<int32_t>(), bad.slot(), s));

  const int64_t max_items = (t + p.seqs.chunk_tokens - 1) / p.seqs.chunk_tokens + num_seqs;
  if (c > 0 && max_items > 0) {
    p.channels = c;
    p.d_state = n;
    p.x = a.x.data_as<const float>();
    p.ldx = t > 0 ? RowStride(a.x) : c;
    p.dt = a.dt.data_as<const float>();
    p.lddt = t > 0 ? RowStride(a.dt) : c;
    p.dt_bias = a.dt_bias.empty() ? nullptr : a.dt_bias.data_as<const float>();
    p.dt_softplus = a.dt_softplus;
    p.a = a.A.data_as<const float>();
    p.lda = RowStride(a.A);
    p.b = a.B.data_as<const float>();
    p.ldb = t > 0 ? RowStride(a.B) : n;
    p.c = a.C.data_as<const float>();
    p.ldc = t > 0 ? RowStride(a.C) : n;
    p.d = a.D.empty() ? nullptr : a.D.data_as<const float>();
    p.z = a.z.empty() ? nullptr : a.z.data_as<const float>();
    p.ldz = a.z.empty() || t == 0 ? c : RowStride(a.z);
    p.state = a.ssm_state.data_as<float>();
    p.out = a.out.data_as<float>();
    p.ldo = c;
    if (p.seqs.chunk_tokens < t) {  // chunked: some sequence may span several items
      const size_t cells = static_cast<size_t>(max_items) * static_cast<size_t>(c);
      CLEAVE_RETURN_IF_ERROR(carry.Allocate(cells * static_cast<size_t>(n + 1) * sizeof(float)));
      p.carry = carry.as<float>();
      p.delta_sum = p.carry + cells * static_cast<size_t>(n);
    }
    const int64_t channel_blocks = (c + ssm::kChannelsPerBlock - 1) / ssm::kChannelsPerBlock;
    const Launch l{dim3(static_cast<unsigned int>(max_items), static_cast<unsigned int>(channel_blocks)), s,
                   bad.slot()};
    CLEAVE_RETURN_IF_ERROR(n == ssm::kGroup ? RunPasses<ssm::kGroup>(p, l) : RunPasses<0>(p, l));
  }
  return ssm::SequenceVerdict(kOp, p.seqs, t, num_slots, bad, s);
}

}  // namespace cleave::kernels::cuda
