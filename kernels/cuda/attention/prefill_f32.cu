// PagedAttentionPrefill's tile kernels for f32 caches (prefill_kernel.cuh).
#include "prefill_kernel.cuh"

namespace cleave::kernels::cuda::attention {

absl::Status LaunchPrefillF32(const PrefillParams& p, int dh_pad, unsigned int slots, cudaStream_t s) {
  return LaunchPrefill<float>(p, dh_pad, slots, s);
}

}  // namespace cleave::kernels::cuda::attention
