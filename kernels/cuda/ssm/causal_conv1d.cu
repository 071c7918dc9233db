// CUDA CausalConv1d (ssm.h): one thread per (work item, channel), where an item is up to kConvChunk
// tokens of one sequence (ssm_device.cuh). A thread walks its chunk computing each output from
// the K inputs ending at that token (earlier chunks' inputs are read from x; only a sequence's
// first chunk reaches into the slot's state, and that thread writes the new state after reading
// the old). Each output is bias + the K taps oldest first, then SiLU: the CPU's order.
//
// Blocking: the batch's index tensors are checked on the device first and the verdict read back
// (ssm_launch.h), which synchronises the stream.
#include <cuda_runtime.h>

#include <cstdint>

#include "../../cpu/ssm_checks.h"
#include "../common/cuda_check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ssm_ops.h"
#include "ssm_device.cuh"
#include "ssm_launch.h"

namespace cleave::kernels::cuda {
namespace {

// Tokens per item: rows of x are re-read at most K - 1 times per chunk boundary, and long
// prefills still spread over many blocks.
constexpr int64_t kConvChunk = 64;

template <int kK>
__global__ void __launch_bounds__(ssm::kChannelsPerBlock)
    ConvKernel(ssm::ConvParams p, const unsigned long long* bad) {
  if (*bad != ssm::kNoError) return;  // a bad batch: write nothing
  ssm::Item it;
  if (!ssm::FindItem(p.seqs, blockIdx.x, &it)) return;
  const int64_t c = int64_t{blockIdx.y} * ssm::kChannelsPerBlock + threadIdx.x;
  if (c >= p.channels) return;
  ssm::ConvThread<kK>(p, it, c);
}

int64_t RowStride(const Tensor& t) { return t.dim(0) > 1 ? t.stride(0) : t.dim(1); }

}  // namespace

absl::Status CausalConv1d(CausalConv1dArgs& a, Stream* stream) {
  namespace chk = cpu::ssm;
  constexpr const char* kOp = "CausalConv1d";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "out", a.out));
  const Device dev = a.out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(chk::CheckRowsOn(kOp, "x", a.x, dev, kAnyDim, kAnyDim));
  const int64_t t = a.x.dim(0), c = a.x.dim(1);
  CLEAVE_RETURN_IF_ERROR(chk::CheckRowsOn(kOp, "weight", a.weight, dev, c, kAnyDim));
  const int64_t k = a.weight.dim(1);
  if (k < 1) return ArgError(kOp, "weight", a.weight, "needs a kernel width K >= 1");
  CLEAVE_RETURN_IF_ERROR(chk::CheckOptionalVectorOn(kOp, "bias", a.bias, dev, c));
  const chk::NamedTensors inputs = {{"x", &a.x}, {"weight", &a.weight}, {"bias", &a.bias}};
  CLEAVE_ASSIGN_OR_RETURN(const int64_t num_seqs,
                          chk::CheckOutputsAndIndexShapes(kOp, "conv_state", a.conv_state, k - 1, a.out, t, c,
                                                          inputs, a.seqs, dev));
  const int64_t channel_blocks = (c + ssm::kChannelsPerBlock - 1) / ssm::kChannelsPerBlock;
  if (channel_blocks > 65535) return ArgError(kOp, "x", a.x, "has more channels than the CUDA kernel supports");

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  ssm::ConvParams p;
  p.seqs.qsl = a.seqs.query_start_loc.data_as<const int32_t>();
  p.seqs.slots = a.seqs.state_slots.data_as<const int32_t>();
  p.seqs.init = a.seqs.has_initial_state.data_as<const int32_t>();
  p.seqs.num_seqs = num_seqs;
  p.seqs.chunk_tokens = k - 1 > kConvChunk ? k - 1 : kConvChunk;  // only first chunks read the slot
  const int64_t num_slots = a.conv_state.dim(0);

  FirstBadIndex bad(s);
  CLEAVE_RETURN_IF_ERROR(bad.Init());
  StreamScratch offsets(s);
  CLEAVE_RETURN_IF_ERROR(offsets.Allocate(static_cast<size_t>(num_seqs + 1) * sizeof(int32_t)));
  p.seqs.chunk_off = offsets.as<int32_t>();
  CLEAVE_RETURN_IF_ERROR(ssm::LaunchSequenceCheck(p.seqs, t, num_slots, offsets.as<int32_t>(), bad.slot(), s));

  // Every sequence has at most ceil(len / L) + 1 items (one for an empty one).
  const int64_t max_items = (t + p.seqs.chunk_tokens - 1) / p.seqs.chunk_tokens + num_seqs;
  if (c > 0 && max_items > 0) {
    p.channels = c;
    p.width = k;
    p.x = a.x.data_as<const float>();
    p.ldx = t > 0 ? RowStride(a.x) : c;
    p.weight = a.weight.data_as<const float>();
    p.ldw = RowStride(a.weight);
    p.bias = a.bias.empty() ? nullptr : a.bias.data_as<const float>();
    p.state = a.conv_state.data_as<float>();
    p.out = a.out.data_as<float>();
    p.ldo = c;
    const dim3 grid(static_cast<unsigned int>(max_items), static_cast<unsigned int>(channel_blocks));
    if (k == 4) {
      ConvKernel<4><<<grid, ssm::kChannelsPerBlock, 0, s>>>(p, bad.slot());
    } else {
      ConvKernel<0><<<grid, ssm::kChannelsPerBlock, 0, s>>>(p, bad.slot());
    }
    CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("CausalConv1d launch");
  }
  return ssm::SequenceVerdict(kOp, p.seqs, t, num_slots, bad, s);
}

}  // namespace cleave::kernels::cuda
