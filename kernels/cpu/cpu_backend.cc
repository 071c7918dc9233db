// The CPU backend: 64-byte aligned host buffers and a synchronous stream.
#include <cstdlib>
#include <cstring>
#include <memory>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/cuda_backend.h"

namespace cleave::kernels {
namespace {

class HostBuffer final : public Buffer {
 public:
  HostBuffer(void* p, size_t n) : p_(p), n_(n) {}
  ~HostBuffer() override { std::free(p_); }
  void* data() override { return p_; }
  size_t size() const override { return n_; }
  Device device() const override { return Device::Cpu(); }

 private:
  void* p_;
  size_t n_;
};

class CpuStream final : public Stream {
 public:
  Device device() const override { return Device::Cpu(); }
  absl::Status Synchronize() override { return absl::OkStatus(); }
  void* native_handle() const override { return nullptr; }
};

class CpuBackendImpl final : public Backend {
 public:
  Device device() const override { return Device::Cpu(); }
  BackendCapabilities Capabilities() const override { return {"cpu", false, 0, 0}; }
  absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t bytes) override {
    const size_t rounded = (bytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
    if (p == nullptr) return absl::ResourceExhaustedError(absl::StrCat("host allocation of ", bytes, " bytes failed"));
    return std::make_unique<HostBuffer>(p, bytes);
  }
  absl::StatusOr<std::unique_ptr<Stream>> CreateStream() override { return std::make_unique<CpuStream>(); }
  absl::Status CopyToHost(const void* src, void* dst, size_t bytes, Stream*) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyFromHost(const void* src, void* dst, size_t bytes, Stream*) override {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  }
  absl::Status Zero(void* dst, size_t bytes, Stream*) override {
    std::memset(dst, 0, bytes);
    return absl::OkStatus();
  }
  absl::Status Synchronize() override { return absl::OkStatus(); }  // CPU ops are synchronous
};

}  // namespace

Backend& CpuBackend() {
  static CpuBackendImpl* backend = new CpuBackendImpl();
  return *backend;
}

absl::StatusOr<Device> ParseDevice(const std::string& text) {
  if (text == "cpu") return Device::Cpu();
  if (text == "cuda") return Device::Cuda(0);
  int index = -1;
  if (absl::StartsWith(text, "cuda:") && absl::SimpleAtoi(text.substr(5), &index) && index >= 0) {
    return Device::Cuda(index);
  }
  return absl::InvalidArgumentError(absl::StrCat("device must be cpu, cuda or cuda:N, not '", text, "'"));
}

bool CudaCompiledIn() {
#ifdef CLEAVE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

absl::StatusOr<Backend*> GetBackend(Device device) {
  if (device.is_cpu()) return &CpuBackend();
#ifdef CLEAVE_WITH_CUDA
  return CudaBackendFor(device.index);
#else
  return absl::UnavailableError(absl::StrCat("device ", device.ToString(),
                                             " requested but this build has no CUDA backend"));
#endif
}

}  // namespace cleave::kernels
