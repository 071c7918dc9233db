// PagedAttentionPrefill's tile kernels for bf16 caches (prefill_kernel.cuh).
#include "prefill_kernel.cuh"

namespace cleave::kernels::cuda::attention {

absl::Status LaunchPrefillBf16(const PrefillParams& p, int dh_pad, unsigned int slots, cudaStream_t s) {
  return LaunchPrefill<uint16_t>(p, dh_pad, slots, s);
}

}  // namespace cleave::kernels::cuda::attention
