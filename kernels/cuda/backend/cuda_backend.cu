// CUDA implementation of the backend seam: device buffers (cudaMalloc), streams, copies.
#include <cuda_runtime.h>

#include <memory>
#include <mutex>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/kernels/cuda_backend.h"

namespace cleave::kernels {
namespace {

absl::Status CudaError(cudaError_t err, const char* what) {
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorName(err), ": ", cudaGetErrorString(err)));
}

#define CLEAVE_CUDA_RETURN_IF_ERROR(call)              \
  do {                                                 \
    cudaError_t cleave_err_ = (call);                  \
    if (cleave_err_ != cudaSuccess) return CudaError(cleave_err_, #call); \
  } while (0)

class DeviceBuffer final : public Buffer {
 public:
  DeviceBuffer(void* p, size_t n, int dev) : p_(p), n_(n), dev_(dev) {}
  ~DeviceBuffer() override {
    cudaSetDevice(dev_);
    cudaFree(p_);
  }
  void* data() override { return p_; }
  size_t size() const override { return n_; }
  Device device() const override { return Device::Cuda(dev_); }

 private:
  void* p_;
  size_t n_;
  int dev_;
};

class CudaStream final : public Stream {
 public:
  CudaStream(cudaStream_t s, int dev) : s_(s), dev_(dev) {}
  ~CudaStream() override { cudaStreamDestroy(s_); }
  Device device() const override { return Device::Cuda(dev_); }
  absl::Status Synchronize() override {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s_));
    return absl::OkStatus();
  }
  void* native_handle() const override { return s_; }

 private:
  cudaStream_t s_;
  int dev_;
};

cudaStream_t Native(Stream* s) { return s ? static_cast<cudaStream_t>(s->native_handle()) : nullptr; }

class CudaBackendImpl final : public Backend {
 public:
  CudaBackendImpl(int dev, cudaDeviceProp prop) : dev_(dev), prop_(prop) {}
  Device device() const override { return Device::Cuda(dev_); }
  BackendCapabilities Capabilities() const override {
    return {"cuda", prop_.major >= 8, prop_.totalGlobalMem, prop_.major * 10 + prop_.minor};
  }
  absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t bytes) override {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev_));
    void* p = nullptr;
    cudaError_t err = cudaMalloc(&p, bytes == 0 ? 1 : bytes);
    if (err == cudaErrorMemoryAllocation) {
      return absl::ResourceExhaustedError(absl::StrCat("cudaMalloc of ", bytes, " bytes failed"));
    }
    CLEAVE_CUDA_RETURN_IF_ERROR(err);
    return std::make_unique<DeviceBuffer>(p, bytes, dev_);
  }
  absl::StatusOr<std::unique_ptr<Stream>> CreateStream() override {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev_));
    cudaStream_t s;
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    return std::make_unique<CudaStream>(s, dev_);
  }
  absl::Status CopyToHost(const void* src, void* dst, size_t bytes, Stream* stream) override {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, Native(stream)));
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(Native(stream)));
    return absl::OkStatus();
  }
  absl::Status CopyFromHost(const void* src, void* dst, size_t bytes, Stream* stream) override {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, Native(stream)));
    return absl::OkStatus();
  }
  absl::Status Zero(void* dst, size_t bytes, Stream* stream) override {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev_));
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dst, 0, bytes, Native(stream)));
    return absl::OkStatus();
  }
  absl::Status Synchronize() override {
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaSetDevice(dev_));
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    return absl::OkStatus();
  }

 private:
  int dev_;
  cudaDeviceProp prop_;
};

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

absl::StatusOr<Backend*> CudaBackendFor(int index) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<CudaBackendImpl>>* backends =
      new std::vector<std::unique_ptr<CudaBackendImpl>>();
  std::lock_guard<std::mutex> lock(mu);
  const int count = CudaDeviceCount();
  if (index < 0 || index >= count) {
    return absl::UnavailableError(absl::StrCat("CUDA device ", index, " requested but ", count,
                                               " device(s) are visible"));
  }
  if (backends->size() < static_cast<size_t>(count)) backends->resize(count);
  if (!(*backends)[index]) {
    cudaDeviceProp prop;
    CLEAVE_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, index));
    (*backends)[index] = std::make_unique<CudaBackendImpl>(index, prop);
  }
  return (*backends)[index].get();
}

}  // namespace cleave::kernels
