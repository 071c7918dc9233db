// Shared by the GPU kernel benchmarks (tests/gpu/*_bench.cc): checked CUDA calls, device
// allocation, event timing. Every benchmark reports ratios against a baseline measured in the same
// run (a device-to-device copy's bandwidth, or cuBLAS), never absolute pass/fail times.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <functional>

#include "absl/status/status.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::gpubench {

#define CHECK_CUDA(call)                                                                     \
  do {                                                                                       \
    cudaError_t e = (call);                                                                  \
    if (e != cudaSuccess) {                                                                  \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e));                        \
      std::exit(1);                                                                          \
    }                                                                                        \
  } while (0)

inline void* DeviceAlloc(size_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, bytes));
  CHECK_CUDA(cudaMemset(p, 0, bytes));  // zeros: finite inputs, in-range ids
  return p;
}

// Mean seconds of one call of `fn` over `iters` (after 3 warm-up calls), by CUDA events.
inline double Time(const std::function<void()>& fn, int iters = 20) {
  for (int i = 0; i < 3; ++i) fn();
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(cudaEventRecord(start));
  for (int i = 0; i < iters; ++i) fn();
  CHECK_CUDA(cudaEventRecord(stop));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / 1e3 / iters;
}

inline void Must(const absl::Status& s, const char* what) {
  if (!s.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, s.ToString().c_str());
    std::exit(1);
  }
}

inline Tensor Dev(void* p, DType t, std::initializer_list<int64_t> shape) { return Tensor(p, t, shape, Device::Cuda(0)); }

// Bytes per second of a device-to-device copy of `bytes` (read + write counted), the bandwidth
// baseline of memory-bound kernels.
inline double CopyBandwidth(size_t bytes) {
  void* a = DeviceAlloc(bytes);
  void* b = DeviceAlloc(bytes);
  const double s = Time([&] { CHECK_CUDA(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
  cudaFree(a);
  cudaFree(b);
  return 2.0 * bytes / s;
}

}  // namespace cleave::kernels::gpubench
