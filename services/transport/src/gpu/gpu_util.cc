#include "gpu_util.h"

#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "../socket_io.h"

namespace cleave::transport::gpu {

std::string CudaErrorText(cudaError_t e) {
  return absl::StrCat(cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

absl::Status CudaStatus(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", CudaErrorText(e)));
}

DeviceGuard::DeviceGuard(int device) {
  if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
  // Even when `device` is already current: cudaSetDevice also makes its primary context current
  // on this thread, which the driver calls made through entry points rely on.
  status_ = CudaStatus(cudaSetDevice(device), "cudaSetDevice");
}

DeviceGuard::~DeviceGuard() {
  int now = -1;
  if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) {
    (void)cudaSetDevice(previous_);
  }
}

absl::Status CheckDevice(int device, absl::string_view who) {
  if (device < 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        who, " is -1 (host memory): the GPU schemes move device memory, so it must name the "
             "CUDA device that holds it"));
  }
  int count = 0;
  if (const cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    return absl::UnavailableError(
        absl::StrCat("no usable CUDA device: cudaGetDeviceCount: ", CudaErrorText(e)));
  }
  if (device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat(who, " is ", device, " but this process sees ", count, " CUDA device(s)"));
  }
  return absl::OkStatus();
}

bool PeerClosed(int fd) {
  std::byte b;
  const ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
  if (n == 0) return true;
  return n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

Clock::time_point SetupDeadline(const TransportOptions& options) {
  return Clock::now() + std::chrono::milliseconds(std::max(options.io_timeout_ms, 30000));
}

absl::Status SendSetup(int fd, wire::GpuScheme scheme, std::span<const std::byte> payload) {
  std::array<std::byte, wire::kFrameHeaderBytes> head{};
  wire::FrameHeader h;
  h.type = static_cast<uint16_t>(wire::FrameType::kGpuSetup);
  h.layer = static_cast<uint32_t>(scheme);
  h.payload_bytes = payload.size();
  wire::EncodeFrameHeader(h, head.data());
  iovec iov[2] = {{head.data(), head.size()},
                  {const_cast<std::byte*>(payload.data()), payload.size()}};
  CLEAVE_RETURN_IF_ERROR(WriteFullv(fd, iov, payload.empty() ? 1 : 2));
  absl::StatusOr<wire::AckStatus> ack = ReadAck(fd, h);
  if (!ack.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "GPU setup: no answer from the receiver (", ack.status().message(),
        "); is it listening for this scheme rather than plain tcp?"));
  }
  if (*ack != wire::AckStatus::kOk) {
    return absl::FailedPreconditionError(
        "GPU setup refused: the receiver listens for another payload scheme");
  }
  return absl::OkStatus();
}

absl::Status AcceptSetup(int fd, wire::GpuScheme scheme, std::span<std::byte> payload) {
  std::array<std::byte, wire::kFrameHeaderBytes> head{};
  CLEAVE_RETURN_IF_ERROR(ReadFull(fd, head.data(), head.size()));
  const wire::FrameHeader h = wire::DecodeFrameHeader(head.data());
  if (h.magic != wire::kFrameMagic || h.type != static_cast<uint16_t>(wire::FrameType::kGpuSetup)) {
    return absl::FailedPreconditionError(
        "expected the GPU setup frame: the sender does not use this receiver's payload scheme");
  }
  if (h.payload_bytes > wire::kMaxSetupPayloadBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("GPU setup payload of ", h.payload_bytes, " bytes"));
  }
  std::array<std::byte, wire::kMaxSetupPayloadBytes> got{};
  CLEAVE_RETURN_IF_ERROR(ReadFull(fd, got.data(), static_cast<size_t>(h.payload_bytes)));
  if (h.layer != static_cast<uint32_t>(scheme) || h.payload_bytes != payload.size()) {
    (void)WriteAck(fd, h, wire::AckStatus::kRefused);
    return absl::FailedPreconditionError(
        absl::StrCat("refused GPU setup for scheme ", h.layer, " (this receiver's is ",
                     static_cast<uint32_t>(scheme), ")"));
  }
  std::copy_n(got.begin(), payload.size(), payload.begin());
  return WriteAck(fd, h, wire::AckStatus::kOk);
}

absl::Status WriteAck(int fd, const wire::FrameHeader& frame, wire::AckStatus status) {
  wire::Ack a;
  a.status = static_cast<uint16_t>(status);
  a.request_id = frame.request_id;
  a.attempt = frame.attempt;
  a.layer = frame.layer;
  std::array<std::byte, wire::kAckBytes> b{};
  wire::EncodeAck(a, b.data());
  iovec iov{b.data(), b.size()};
  return WriteFullv(fd, &iov, 1);
}

absl::StatusOr<wire::AckStatus> ReadAck(int fd, const wire::FrameHeader& frame) {
  std::array<std::byte, wire::kAckBytes> b{};
  CLEAVE_RETURN_IF_ERROR(ReadFull(fd, b.data(), b.size()));
  const wire::Ack a = wire::DecodeAck(b.data());
  if (a.magic != wire::kAckMagic || a.request_id != frame.request_id ||
      a.attempt != frame.attempt || a.layer != frame.layer ||
      a.status > static_cast<uint16_t>(wire::AckStatus::kFailed)) {
    return absl::InternalError("the receiver's answer is out of step with the frames sent");
  }
  return static_cast<wire::AckStatus>(a.status);
}

}  // namespace cleave::transport::gpu

namespace cleave::transport {

bool GpuPayloadPathsBuilt() { return true; }

absl::StatusOr<std::unique_ptr<SendPayloadPath>> MakeSendPayloadPath(
    PayloadScheme scheme, const TransportOptions& options) {
  CLEAVE_RETURN_IF_ERROR(gpu::CheckDevice(
      options.cuda_device, absl::StrCat("kv sender to ", SchemePrefix(scheme),
                                        ": TransportOptions.cuda_device")));
  if (scheme == PayloadScheme::kNccl) return gpu::MakeNcclSendPath(options);
  return gpu::MakeCudaIpcSendPath(options);
}

absl::StatusOr<std::unique_ptr<RecvPayloadPath>> MakeRecvPayloadPath(
    PayloadScheme scheme, const TransportOptions& options, KvBlockStore& store) {
  CLEAVE_RETURN_IF_ERROR(gpu::CheckDevice(
      store.cuda_device(),
      absl::StrCat("kv receiver (", SchemePrefix(scheme), "): the store's cuda_device()")));
  if (scheme == PayloadScheme::kNccl) return gpu::MakeNcclRecvPath(options, store);
  return gpu::MakeCudaIpcRecvPath(options, store);
}

}  // namespace cleave::transport
