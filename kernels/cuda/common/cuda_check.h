// Internal to the CUDA backend (kernels/cuda/*/*.cu): error plumbing and the argument checks
// every op runs before touching memory. The device twins of kernels/cpu/check.h: same messages
// ("Linear: w bf16[3, 7] must have shape [*, 8]"), but every tensor of a call must sit on the
// op's CUDA device (the output's) instead of the CPU. A bad argument is InvalidArgument; a CUDA or
// cuBLAS failure is Internal naming the call and the error.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/internal/arg_checks.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cuda {

// ---- Errors -----------------------------------------------------------------------------------

// "cudaMallocAsync(...): cudaErrorMemoryAllocation: out of memory"
inline absl::Status CudaError(cudaError_t err, const char* what) {
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), ": ", cudaGetErrorString(err)));
}

// "cublasGemmEx(...): CUBLAS_STATUS_NOT_SUPPORTED: the functionality requested is not supported"
inline absl::Status CublasError(cublasStatus_t st, const char* what) {
  return absl::InternalError(
      absl::StrCat(what, ": ", cublasGetStatusName(st), ": ", cublasGetStatusString(st)));
}

}  // namespace cleave::kernels::cuda

// Returns Internal from the enclosing function when a CUDA runtime call fails.
#define CLEAVE_CUDA_RETURN_IF_ERROR(call)                                          \
  do {                                                                             \
    const cudaError_t cleave_cuda_err_ = (call);                                   \
    if (cleave_cuda_err_ != cudaSuccess)                                           \
      return ::cleave::kernels::cuda::CudaError(cleave_cuda_err_, #call);          \
  } while (0)

// Returns Internal from the enclosing function when a cuBLAS call fails.
#define CLEAVE_CUBLAS_RETURN_IF_ERROR(call)                                        \
  do {                                                                             \
    const cublasStatus_t cleave_cublas_st_ = (call);                               \
    if (cleave_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                \
      return ::cleave::kernels::cuda::CublasError(cleave_cublas_st_, #call);       \
  } while (0)

// After a kernel<<<...>>> launch: returns Internal naming `what` (e.g. "AddBias launch") when the
// launch failed (bad configuration, no device, a sticky error from earlier work).
#define CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR(what)                                   \
  do {                                                                             \
    const cudaError_t cleave_cuda_err_ = cudaGetLastError();                       \
    if (cleave_cuda_err_ != cudaSuccess)                                           \
      return ::cleave::kernels::cuda::CudaError(cleave_cuda_err_, what);           \
  } while (0)

namespace cleave::kernels::cuda {

// ---- Streams and devices ----------------------------------------------------------------------

// The cudaStream_t behind `stream`; null -> 0, the device's legacy default stream.
inline cudaStream_t NativeStream(const Stream* stream) {
  return stream != nullptr ? static_cast<cudaStream_t>(stream->native_handle()) : nullptr;
}

// Makes `device` current for the scope and restores the caller's device afterwards (the current
// device is per host thread, and callers may be driving another GPU).
class ScopedDevice {
 public:
  ScopedDevice() = default;
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  ~ScopedDevice() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

  [[nodiscard]] absl::Status Set(int device) {
    int current = -1;
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaGetDevice(&current));
    if (current != device) {
      CLEAVE_CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
      if (previous_ < 0) previous_ = current;
    }
    return absl::OkStatus();
  }

 private:
  int previous_ = -1;
};

// ---- Argument checks (internal/arg_checks.h, with CUDA device rules) --------------------------

using checks::ArgError;
using checks::CheckContiguous;
using checks::CheckOnDevice;
using checks::CheckTensor;
using checks::CheckUnitInnerStride;
using checks::kAnyDim;

// The op's device (the output tensor's) must be a CUDA device.
inline absl::Status CheckCudaDevice(const char* op, const char* name, const Tensor& t) {
  if (t.device().type != DeviceType::kCuda) {
    return ArgError(op, name, t, absl::StrCat("is on ", t.device().ToString(), ", expected a CUDA device"));
  }
  return absl::OkStatus();
}

// A stream, when given, must belong to the op's device (a CPU stream or another GPU's is a
// dispatch bug, not something to paper over).
inline absl::Status CheckStream(const char* op, const Stream* stream, Device device) {
  if (stream != nullptr && !(stream->device() == device)) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": stream on ", stream->device().ToString(),
                                                   " passed with tensors on ", device.ToString()));
  }
  return absl::OkStatus();
}

// ---- Launch geometry --------------------------------------------------------------------------

// Blocks for a grid-stride loop over `work` items at `threads` per block, capped at `max_blocks`
// (at least 1, so an empty launch is still a valid configuration).
inline unsigned int GridFor(int64_t work, int threads, int64_t max_blocks = 4096) {
  int64_t blocks = (work + threads - 1) / threads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned int>(blocks);
}

}  // namespace cleave::kernels::cuda

// ---- Data-dependent argument errors (norm/rope/activation/embedding ops) ----------------------

namespace cleave::kernels::cuda {

// The smallest offending index a kernel found (an out-of-range token id or position), or none:
// errors only the device data reveals. Stream-ordered allocation per call (the default memory
// pool makes it cheap); all ones means "none", kernels lower it with atomicMin. Read()
// synchronises the stream, so ops using this are blocking.
class FirstBadIndex {
 public:
  static constexpr unsigned long long kNone = ~0ull;

  explicit FirstBadIndex(cudaStream_t stream) : stream_(stream) {}
  FirstBadIndex(const FirstBadIndex&) = delete;
  FirstBadIndex& operator=(const FirstBadIndex&) = delete;
  ~FirstBadIndex() {
    if (slot_ != nullptr) (void)cudaFreeAsync(slot_, stream_);  // error paths only
  }

  [[nodiscard]] absl::Status Init() {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMallocAsync(reinterpret_cast<void**>(&slot_), sizeof(*slot_), stream_));
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(slot_, 0xff, sizeof(*slot_), stream_));
    return absl::OkStatus();
  }
  unsigned long long* slot() const { return slot_; }

  // Waits for the stream; -1 when no kernel reported an index.
  [[nodiscard]] absl::Status Read(int64_t* index) {
    unsigned long long host = kNone;
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(&host, slot_, sizeof(host), cudaMemcpyDeviceToHost, stream_));
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaFreeAsync(slot_, stream_));
    slot_ = nullptr;
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream_));
    *index = host == kNone ? -1 : static_cast<int64_t>(host);
    return absl::OkStatus();
  }

 private:
  cudaStream_t stream_;
  unsigned long long* slot_ = nullptr;
};

// Device scratch for the duration of one call, stream-ordered (the default memory pool makes this
// cheap): freed on the stream when the scope ends (or by Free), after the kernels already queued
// that use it.
class StreamScratch {
 public:
  explicit StreamScratch(cudaStream_t stream) : stream_(stream) {}
  StreamScratch(const StreamScratch&) = delete;
  StreamScratch& operator=(const StreamScratch&) = delete;
  ~StreamScratch() {
    if (ptr_ != nullptr) (void)cudaFreeAsync(ptr_, stream_);
  }
  [[nodiscard]] absl::Status Allocate(size_t bytes) {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMallocAsync(&ptr_, bytes > 0 ? bytes : 1, stream_));
    return absl::OkStatus();
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  // `offset` bytes in, viewed as T.
  template <typename T>
  T* At(size_t offset) const {
    return reinterpret_cast<T*>(static_cast<unsigned char*>(ptr_) + offset);
  }
  // Frees now (stream-ordered), reporting the error the destructor would swallow.
  [[nodiscard]] absl::Status Free() {
    void* p = ptr_;
    ptr_ = nullptr;
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaFreeAsync(p, stream_));
    return absl::OkStatus();
  }

 private:
  cudaStream_t stream_;
  void* ptr_ = nullptr;
};

// One i32 element of a device array, for an error message (synchronises the stream).
[[nodiscard]] inline absl::Status ReadI32(const int32_t* device_ptr, cudaStream_t stream, int32_t* value) {
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(value, device_ptr, sizeof(*value), cudaMemcpyDeviceToHost, stream));
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

// 16-byte alignment, for float4 paths.
inline bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace cleave::kernels::cuda
