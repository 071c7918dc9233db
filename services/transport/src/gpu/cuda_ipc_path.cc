// cuda-ipc://: two processes on one machine. The receiver PULLS: the sender describes each
// payload part as (IPC handle of its allocation, allocation size, offset) after the frame's ids;
// the receiver judges the header first, and only for a frame it takes opens the handles (once
// per connection), checks every part against the mapped allocation, copies device to device on
// its own stream, synchronises, and answers with an Ack. The sender's SendLayer returns after
// the Ack, which keeps "the caller may overwrite its source when SendLayer returns".
//
// The driver calls (pointer attributes, address ranges) come through the runtime's
// cudaGetDriverEntryPointByVersion rather than a link against libcuda, so binaries linking the
// transport still start on machines without a GPU driver (CI, CPU-only hosts).
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "cleave/common/status.h"
#include "gpu_util.h"
#include "../socket_io.h"

namespace cleave::transport::gpu {
namespace {

static_assert(sizeof(cudaIpcMemHandle_t) == wire::kIpcHandleBytes);
// A sender's allocations a receiver keeps mapped per connection; beyond this a frame is refused.
constexpr size_t kMaxOpenHandles = 4096;

struct DriverApi {
  PFN_cuPointerGetAttributes_v7000 pointer_attributes = nullptr;
  PFN_cuMemGetAddressRange_v3020 address_range = nullptr;
};

absl::StatusOr<DriverApi> LoadDriverApi() {
  DriverApi api;
  cudaDriverEntryPointQueryResult found{};
  void* fn = nullptr;
  cudaError_t e = cudaGetDriverEntryPointByVersion("cuPointerGetAttributes", &fn, 7000,
                                                   cudaEnableDefault, &found);
  if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
    return absl::UnavailableError(absl::StrCat("cuPointerGetAttributes not available: ",
                                               CudaErrorText(e)));
  }
  api.pointer_attributes = reinterpret_cast<PFN_cuPointerGetAttributes_v7000>(fn);
  e = cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 3020, cudaEnableDefault,
                                       &found);
  if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
    return absl::UnavailableError(absl::StrCat("cuMemGetAddressRange not available: ",
                                               CudaErrorText(e)));
  }
  api.address_range = reinterpret_cast<PFN_cuMemGetAddressRange_v3020>(fn);
  return api;
}

std::string DriverError(CUresult r) { return absl::StrCat("CUresult ", static_cast<int>(r)); }

// ---- sender ----------------------------------------------------------------------------------

// One exported allocation: the handle and where it sits in this process.
struct Export {
  cudaIpcMemHandle_t handle;
  uintptr_t base = 0;
  size_t bytes = 0;
};

class CudaIpcSendPath;

class CudaIpcSendChannel final : public SendPayloadChannel {
 public:
  explicit CudaIpcSendChannel(CudaIpcSendPath& path) : path_(path) {}
  PayloadResult Send(int fd, const FrameSource& frame) override;

 private:
  CudaIpcSendPath& path_;
  std::vector<std::byte> descriptors_;
};

class CudaIpcSendPath final : public SendPayloadPath {
 public:
  CudaIpcSendPath(const TransportOptions& options, DriverApi api)
      : options_(options), api_(api) {}
  const char* prefix() const override { return SchemePrefix(PayloadScheme::kCudaIpc); }

  absl::StatusOr<std::unique_ptr<SendPayloadChannel>> Open(int fd) override {
    CLEAVE_RETURN_IF_ERROR(SendSetup(fd, wire::GpuScheme::kCudaIpc, {}));
    return std::unique_ptr<SendPayloadChannel>(new CudaIpcSendChannel(*this));
  }

  // Writes the descriptor of [ptr, ptr + len) at `out`. Exports each allocation once: the
  // cache is keyed by the driver's buffer id, never reused within a process, so memory freed
  // and allocated again at the same address gets a fresh handle.
  absl::Status Describe(const void* ptr, size_t len, std::byte* out) {
    unsigned int memory_type = 0;
    int ordinal = -1;
    unsigned long long buffer_id = 0;  // NOLINT(runtime/int): the driver's type
    CUpointer_attribute attrs[] = {CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                                   CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                                   CU_POINTER_ATTRIBUTE_BUFFER_ID};
    void* data[] = {&memory_type, &ordinal, &buffer_id};
    const auto dptr = static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(ptr));
    if (CUresult r = api_.pointer_attributes(3, attrs, data, dptr); r != CUDA_SUCCESS) {
      return absl::InternalError(absl::StrCat("cuPointerGetAttributes: ", DriverError(r)));
    }
    if (memory_type != CU_MEMORYTYPE_DEVICE || ordinal != options_.cuda_device) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda-ipc source 0x", absl::Hex(reinterpret_cast<uintptr_t>(ptr)),
                       " is not device memory of device ", options_.cuda_device,
                       " (TransportOptions.cuda_device)"));
    }
    const uintptr_t p = reinterpret_cast<uintptr_t>(ptr);
    auto it = exports_.find(buffer_id);
    // A cached export must still contain the pointer (belt and braces should a driver report
    // no buffer ids: then every pointer shares id 0 and is re-exported when it moves).
    if (it != exports_.end() && (p < it->second.base || p - it->second.base >= it->second.bytes)) {
      exports_.erase(it);
      it = exports_.end();
    }
    if (it == exports_.end()) {
      Export e;
      CUdeviceptr base = 0;
      if (CUresult r = api_.address_range(&base, &e.bytes, dptr); r != CUDA_SUCCESS) {
        return absl::InternalError(absl::StrCat("cuMemGetAddressRange: ", DriverError(r)));
      }
      e.base = static_cast<uintptr_t>(base);
      CLEAVE_RETURN_IF_ERROR(CudaStatus(
          cudaIpcGetMemHandle(&e.handle, reinterpret_cast<void*>(e.base)),
          "cudaIpcGetMemHandle (cuda-ipc needs cudaMalloc'd memory, not pool or VMM memory)"));
      it = exports_.emplace(buffer_id, e).first;
    }
    const Export& e = it->second;
    if (p - e.base + len > e.bytes) {
      return absl::InvalidArgumentError("cuda-ipc source part runs past its allocation");
    }
    std::memcpy(out, &e.handle, wire::kIpcHandleBytes);
    wire::PutU64(out + 64, e.bytes);
    wire::PutU64(out + 72, p - e.base);
    return absl::OkStatus();
  }

  int device() const { return options_.cuda_device; }

 private:
  const TransportOptions options_;
  const DriverApi api_;
  // Used by the one thread holding the link's socket (channels never run concurrently).
  absl::flat_hash_map<unsigned long long, Export> exports_;  // NOLINT(runtime/int)
};

PayloadResult CudaIpcSendChannel::Send(int fd, const FrameSource& frame) {
  DeviceGuard guard(path_.device());
  if (!guard.status().ok()) return {guard.status(), true};
  descriptors_.resize(frame.payload.size() * wire::kIpcDescriptorBytes);
  for (size_t i = 0; i < frame.payload.size(); ++i) {
    const iovec& p = frame.payload[i];
    // Nothing is on the wire yet: a bad source fails this frame's transfer only.
    if (absl::Status s = path_.Describe(p.iov_base, p.iov_len,
                                        &descriptors_[i * wire::kIpcDescriptorBytes]);
        !s.ok()) {
      return {s, true};
    }
  }
  iovec iov[2] = {{const_cast<std::byte*>(frame.head.data()), frame.head.size()},
                  {descriptors_.data(), descriptors_.size()}};
  if (absl::Status s = WriteFullv(fd, iov, descriptors_.empty() ? 1 : 2); !s.ok()) {
    return {s, false};
  }
  const wire::FrameHeader h = wire::DecodeFrameHeader(frame.head.data());
  absl::StatusOr<wire::AckStatus> ack = ReadAck(fd, h);
  if (!ack.ok()) return {ack.status(), false};
  switch (*ack) {
    case wire::AckStatus::kOk:
    case wire::AckStatus::kDropped:  // not expected there: as over TCP, not the sender's error
      return {absl::OkStatus(), true};
    case wire::AckStatus::kRefused:
      return {absl::InvalidArgumentError(
                  "the receiver refused the frame (it broke the transfer's agreement or a part "
                  "was out of bounds; its on_failed says which)"),
              true};
    case wire::AckStatus::kFailed:
      break;
  }
  return {absl::InternalError("the receiver could not copy the frame from this sender's memory"),
          true};
}

// ---- receiver --------------------------------------------------------------------------------

class CudaIpcRecvChannel final : public RecvPayloadChannel {
 public:
  CudaIpcRecvChannel(int device, DriverApi api) : device_(device), api_(api) {}
  ~CudaIpcRecvChannel() override {
    DeviceGuard guard(device_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    for (auto& [key, m] : mapped_) (void)cudaIpcCloseMemHandle(m.ptr);
  }

  absl::Status Init() {
    DeviceGuard guard(device_);
    CLEAVE_RETURN_IF_ERROR(guard.status());
    return CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                      "cudaStreamCreate");
  }

  absl::Status ReadControl(int fd, size_t parts) override {
    descriptors_.resize(parts * wire::kIpcDescriptorBytes);
    return ReadFull(fd, descriptors_.data(), descriptors_.size());
  }

  PayloadResult Land(int fd, const wire::FrameHeader& header, std::span<const iovec> parts,
                     TransferTracker::Verdict verdict) override {
    using V = TransferTracker::Verdict;
    if (verdict != V::kWrite) {
      const auto status = verdict == V::kRefuse ? wire::AckStatus::kRefused
                                                : wire::AckStatus::kDropped;
      absl::Status s = WriteAck(fd, header, status);
      return {s, s.ok()};
    }
    auto [landed, ack] = Copy(parts);
    absl::Status s = WriteAck(fd, header, ack);
    if (!s.ok()) return {s, false};
    return {landed, true};
  }

 private:
  struct Mapping {
    void* ptr = nullptr;
    size_t bytes = 0;  // what the driver maps, else (if it cannot tell) what the sender said
  };

  std::pair<absl::Status, wire::AckStatus> Copy(std::span<const iovec> parts) {
    DeviceGuard guard(device_);
    if (!guard.status().ok()) return {guard.status(), wire::AckStatus::kFailed};
    // Every part is checked before the first copy starts: a bad one writes nothing.
    sources_.clear();
    for (size_t i = 0; i < parts.size(); ++i) {
      const std::byte* d = &descriptors_[i * wire::kIpcDescriptorBytes];
      absl::StatusOr<const std::byte*> src = Source(d, parts[i].iov_len);
      if (!src.ok()) {
        return {src.status(), absl::IsInvalidArgument(src.status()) ? wire::AckStatus::kRefused
                                                                     : wire::AckStatus::kFailed};
      }
      sources_.push_back(*src);
    }
    for (size_t i = 0; i < parts.size(); ++i) {
      absl::Status s = CudaStatus(cudaMemcpyAsync(parts[i].iov_base, sources_[i], parts[i].iov_len,
                                                  cudaMemcpyDeviceToDevice, stream_),
                                  "cuda-ipc copy (cudaMemcpyAsync)");
      if (!s.ok()) {
        (void)cudaStreamSynchronize(stream_);  // no copy may still be writing when we return
        return {s, wire::AckStatus::kFailed};
      }
    }
    absl::Status s = CudaStatus(cudaStreamSynchronize(stream_), "cuda-ipc copy");
    return {s, s.ok() ? wire::AckStatus::kOk : wire::AckStatus::kFailed};
  }

  // The sender's bytes of one part, mapped here; InvalidArgument when it lies out of bounds.
  absl::StatusOr<const std::byte*> Source(const std::byte* d, size_t len) {
    const std::string key(reinterpret_cast<const char*>(d), wire::kIpcHandleBytes);
    const uint64_t claimed = wire::GetU64(d + 64), offset = wire::GetU64(d + 72);
    auto it = mapped_.find(key);
    if (it == mapped_.end()) {
      if (mapped_.size() >= kMaxOpenHandles) {
        return absl::InvalidArgumentError("cuda-ipc sender exported too many allocations");
      }
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, d, wire::kIpcHandleBytes);
      Mapping m;
      CLEAVE_RETURN_IF_ERROR(CudaStatus(
          cudaIpcOpenMemHandle(&m.ptr, handle, cudaIpcMemLazyEnablePeerAccess),
          "cudaIpcOpenMemHandle"));
      CUdeviceptr base = 0;
      size_t mapped = 0;
      const auto dptr = static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(m.ptr));
      if (api_.address_range(&base, &mapped, dptr) == CUDA_SUCCESS && base == dptr) {
        m.bytes = std::min<size_t>(mapped, claimed);
      } else {
        // The sender is authenticated; its own claim is what bounds the copy here.
        m.bytes = claimed;
      }
      it = mapped_.emplace(key, m).first;
    }
    const Mapping& m = it->second;
    if (offset > m.bytes || len > m.bytes - offset) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda-ipc part [", offset, ", +", len, ") out of its allocation of ",
                       m.bytes, " bytes"));
    }
    return static_cast<const std::byte*>(m.ptr) + offset;
  }

  const int device_;
  const DriverApi api_;
  cudaStream_t stream_ = nullptr;
  std::vector<std::byte> descriptors_;  // <= 2 * kMaxBlocksPerFrame descriptors
  std::vector<const std::byte*> sources_;
  absl::flat_hash_map<std::string, Mapping> mapped_;  // by handle bytes
};

class CudaIpcRecvPath final : public RecvPayloadPath {
 public:
  CudaIpcRecvPath(KvBlockStore& store, DriverApi api) : store_(store), api_(api) {}
  const char* prefix() const override { return SchemePrefix(PayloadScheme::kCudaIpc); }

  absl::StatusOr<std::unique_ptr<RecvPayloadChannel>> Accept(int fd) override {
    CLEAVE_RETURN_IF_ERROR(AcceptSetup(fd, wire::GpuScheme::kCudaIpc, {}));
    auto channel = std::make_unique<CudaIpcRecvChannel>(store_.cuda_device(), api_);
    CLEAVE_RETURN_IF_ERROR(channel->Init());
    return std::unique_ptr<RecvPayloadChannel>(std::move(channel));
  }

 private:
  KvBlockStore& store_;
  const DriverApi api_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<SendPayloadPath>> MakeCudaIpcSendPath(
    const TransportOptions& options) {
  CLEAVE_ASSIGN_OR_RETURN(DriverApi api, LoadDriverApi());
  return std::unique_ptr<SendPayloadPath>(new CudaIpcSendPath(options, api));
}

absl::StatusOr<std::unique_ptr<RecvPayloadPath>> MakeCudaIpcRecvPath(
    const TransportOptions& options, KvBlockStore& store) {
  (void)options;
  CLEAVE_ASSIGN_OR_RETURN(DriverApi api, LoadDriverApi());
  return std::unique_ptr<RecvPayloadPath>(new CudaIpcRecvPath(store, api));
}

}  // namespace cleave::transport::gpu
