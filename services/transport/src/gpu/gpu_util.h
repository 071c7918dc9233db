// Shared by the GPU payload paths (CUDA builds only): CUDA error statuses, a current-device
// guard, device checks, polling deadlines, and the setup / ack exchange of frame.h.
#pragma once

#include <cuda_runtime.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "cleave/transport/kv_transport.h"
#include "../frame.h"
#include "../payload_path.h"

namespace cleave::transport::gpu {

using Clock = std::chrono::steady_clock;

// "cudaErrorNoDevice (no CUDA-capable device is detected)".
std::string CudaErrorText(cudaError_t e);
// OK, or Internal("<what>: <error name (text)>").
absl::Status CudaStatus(cudaError_t e, absl::string_view what);

// Makes `device` current on this thread for its scope and restores the caller's device after,
// so a transport call on the caller's thread leaves its CUDA state as it found it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  const absl::Status& status() const { return status_; }

 private:
  int previous_ = -1;
  absl::Status status_;
};

// `device` must be >= 0 (FailedPrecondition naming `who`) and exist: Unavailable when the
// runtime finds no device at all (no driver, no GPU), FailedPrecondition when it is out of range.
absl::Status CheckDevice(int device, absl::string_view who);

// True when the peer has closed its end (EOF or an error), without consuming pending bytes.
bool PeerClosed(int fd);

// The deadline for GPU setup (NCCL communicator init takes seconds: topology discovery, proxy
// threads); a dead peer is noticed sooner through its control connection closing.
Clock::time_point SetupDeadline(const TransportOptions& options);

// Sender: the GPU SETUP frame with its payload, then the receiver's Ack. FailedPrecondition
// when the receiver listens for another scheme (or plain TCP, which hangs up on the frame).
absl::Status SendSetup(int fd, wire::GpuScheme scheme, std::span<const std::byte> payload);
// Receiver: reads the GPU SETUP frame into `payload` (exactly payload.size() bytes expected) and
// answers it: kOk when it is for `scheme` with that payload size, else kRefused (and an error).
absl::Status AcceptSetup(int fd, wire::GpuScheme scheme, std::span<std::byte> payload);

absl::Status WriteAck(int fd, const wire::FrameHeader& frame, wire::AckStatus status);
// Reads the Ack for `frame`; an ack of another frame or a bad magic is Internal (out of step).
absl::StatusOr<wire::AckStatus> ReadAck(int fd, const wire::FrameHeader& frame);

// The concrete paths (nccl_path.cc, cuda_ipc_path.cc); the devices are checked by the caller.
std::unique_ptr<SendPayloadPath> MakeNcclSendPath(const TransportOptions& options);
std::unique_ptr<RecvPayloadPath> MakeNcclRecvPath(const TransportOptions& options,
                                                  KvBlockStore& store);
absl::StatusOr<std::unique_ptr<SendPayloadPath>> MakeCudaIpcSendPath(
    const TransportOptions& options);
absl::StatusOr<std::unique_ptr<RecvPayloadPath>> MakeCudaIpcRecvPath(
    const TransportOptions& options, KvBlockStore& store);

}  // namespace cleave::transport::gpu
