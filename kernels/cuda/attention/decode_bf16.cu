// PagedAttentionDecode's partition kernels for bf16 caches (decode_kernel.cuh).
#include "decode_kernel.cuh"

namespace cleave::kernels::cuda::attention {

void LaunchDecodePartitionsBf16(const DecodeParams& p, int kg, bool vec, unsigned int blocks, cudaStream_t s) {
  LaunchDecodePartitions<uint16_t>(p, kg, vec, blocks, s);
}

}  // namespace cleave::kernels::cuda::attention
