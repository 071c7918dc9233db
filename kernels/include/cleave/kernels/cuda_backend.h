// Entry point of the CUDA backend (kernels/cuda/backend). Declared always so callers need no
// #ifdef; defined only in builds with CUDA (CudaCompiledIn()).
#pragma once

#include "absl/status/statusor.h"
#include "cleave/kernels/backend.h"

namespace cleave::kernels {

// The backend of CUDA device `index`, created on first use and alive for the process.
// Unavailable when the driver reports no such device (e.g. a machine without a GPU).
absl::StatusOr<Backend*> CudaBackendFor(int index);
// Number of CUDA devices visible (0 when no driver or no GPU).
int CudaDeviceCount();

}  // namespace cleave::kernels
