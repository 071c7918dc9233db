// The backend seam: device memory, streams (ordered work queues) and a capability query. The CPU
// backend is always present; the CUDA backend registers itself when built and a device exists.
// Model code talks to Backend, never to #ifdef'd device APIs.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cleave/kernels/device.h"

namespace cleave::kernels {

// Owns one allocation on one device; freed in the destructor. Not thread-safe to move while in use.
class Buffer {
 public:
  virtual ~Buffer() = default;
  virtual void* data() = 0;
  virtual size_t size() const = 0;
  virtual Device device() const = 0;
};

// An ordered queue of work on one device. On the CPU backend ops run synchronously on the
// caller's thread (parallelised internally), so Synchronize() is a no-op. Ops accept a null
// Stream* meaning "the default stream of the tensor's device".
class Stream {
 public:
  virtual ~Stream() = default;
  virtual Device device() const = 0;
  virtual absl::Status Synchronize() = 0;
  // Backend-specific handle (cudaStream_t on CUDA, nullptr on CPU).
  virtual void* native_handle() const = 0;
};

struct BackendCapabilities {
  std::string name;            // "cpu", "cuda"
  bool supports_bf16_compute = false;
  size_t total_memory_bytes = 0;
  int compute_capability = 0;  // e.g. 90 for sm_90; 0 on CPU
};

// Thread-safe: every method may be called from any thread.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual BackendCapabilities Capabilities() const = 0;
  virtual absl::StatusOr<std::unique_ptr<Buffer>> Allocate(size_t bytes) = 0;
  virtual absl::StatusOr<std::unique_ptr<Stream>> CreateStream() = 0;
  // Copies between this backend's memory and host memory (either direction, or within device).
  virtual absl::Status CopyToHost(const void* src, void* dst_host, size_t bytes, Stream* stream) = 0;
  virtual absl::Status CopyFromHost(const void* src_host, void* dst, size_t bytes, Stream* stream) = 0;
  // Sets `bytes` bytes of this backend's memory at `dst` to zero (ordered on `stream`).
  virtual absl::Status Zero(void* dst, size_t bytes, Stream* stream) = 0;
  // Waits for every piece of work this process queued on the device, on any stream (before
  // another process or another stream's reader may touch memory those kernels wrote).
  virtual absl::Status Synchronize() = 0;
};

// The process-wide CPU backend (never null).
Backend& CpuBackend();
// The backend for `device`: the CPU backend, or the CUDA backend when it was compiled in and the
// device exists; NotFound/Unavailable otherwise.
absl::StatusOr<Backend*> GetBackend(Device device);
// "cpu", "cuda" (device 0) or "cuda:N", as users write it in configs and flags; InvalidArgument
// otherwise. Says nothing about whether the device exists (GetBackend does).
absl::StatusOr<Device> ParseDevice(const std::string& text);
// True when this binary contains the CUDA backend (it may still see no device at run time).
bool CudaCompiledIn();

}  // namespace cleave::kernels
