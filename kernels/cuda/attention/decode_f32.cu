// PagedAttentionDecode's partition kernels for f32 caches (decode_kernel.cuh).
#include "decode_kernel.cuh"

namespace cleave::kernels::cuda::attention {

void LaunchDecodePartitionsF32(const DecodeParams& p, int kg, bool vec, unsigned int blocks, cudaStream_t s) {
  LaunchDecodePartitions<float>(p, kg, vec, blocks, s);
}

}  // namespace cleave::kernels::cuda::attention
