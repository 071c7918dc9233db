// Scheme parsing, and the payload-path factories of a build without CUDA (gpu/ holds the real
// ones, compiled only when the toolkit is found).
#include "payload_path.h"

#include "absl/strings/str_cat.h"

namespace cleave::transport {
namespace {

constexpr std::string_view kNcclPrefix = "nccl://";
constexpr std::string_view kCudaIpcPrefix = "cuda-ipc://";

}  // namespace

SchemeAddress SplitScheme(std::string_view address) {
  if (address.starts_with(kNcclPrefix)) {
    return {PayloadScheme::kNccl, address.substr(kNcclPrefix.size())};
  }
  if (address.starts_with(kCudaIpcPrefix)) {
    return {PayloadScheme::kCudaIpc, address.substr(kCudaIpcPrefix.size())};
  }
  return {PayloadScheme::kTcp, address};
}

const char* SchemePrefix(PayloadScheme scheme) {
  switch (scheme) {
    case PayloadScheme::kNccl:
      return kNcclPrefix.data();
    case PayloadScheme::kCudaIpc:
      return kCudaIpcPrefix.data();
    case PayloadScheme::kTcp:
      break;
  }
  return "";
}

std::optional<PayloadScheme> ListenScheme(std::string_view listen) {
  if (listen == "tcp") return PayloadScheme::kTcp;
  if (listen == "nccl") return PayloadScheme::kNccl;
  if (listen == "cuda-ipc") return PayloadScheme::kCudaIpc;
  return std::nullopt;
}

#ifndef CLEAVE_WITH_CUDA
namespace {
absl::Status NoCuda(PayloadScheme scheme) {
  return absl::FailedPreconditionError(
      absl::StrCat("kv transport: ", SchemePrefix(scheme),
                   " needs the CUDA backend, but this binary was built without CUDA"));
}
}  // namespace

bool GpuPayloadPathsBuilt() { return false; }

absl::StatusOr<std::unique_ptr<SendPayloadPath>> MakeSendPayloadPath(
    PayloadScheme scheme, const TransportOptions& options) {
  (void)options;
  return NoCuda(scheme);
}

absl::StatusOr<std::unique_ptr<RecvPayloadPath>> MakeRecvPayloadPath(
    PayloadScheme scheme, const TransportOptions& options, KvBlockStore& store) {
  (void)options, (void)store;
  return NoCuda(scheme);
}
#endif  // CLEAVE_WITH_CUDA

}  // namespace cleave::transport
