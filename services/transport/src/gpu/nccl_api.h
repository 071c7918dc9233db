// NCCL, loaded at run time (dlopen "libnccl.so.2") instead of linked: libnccl is ~200 MB and not
// part of every CUDA image, and a binary linked against it would not start at all where it is
// missing, even for TCP or CUDA IPC. With the loader, only the nccl:// scheme needs it, and it
// fails with a clear Unavailable where the library cannot be found.
#pragma once

#include <nccl.h>

#include "absl/status/status.h"

namespace cleave::transport::gpu {

// The NCCL entry points the nccl:// path calls, typed from nccl.h.
struct NcclApi {
  decltype(&::ncclGetUniqueId) GetUniqueId;
  decltype(&::ncclCommInitRankConfig) CommInitRankConfig;
  decltype(&::ncclCommAbort) CommAbort;
  decltype(&::ncclCommDestroy) CommDestroy;
  decltype(&::ncclCommGetAsyncError) CommGetAsyncError;
  decltype(&::ncclGetErrorString) GetErrorString;
  decltype(&::ncclGetLastError) GetLastError;
  decltype(&::ncclGroupStart) GroupStart;
  decltype(&::ncclGroupEnd) GroupEnd;
  decltype(&::ncclSend) Send;
  decltype(&::ncclRecv) Recv;
};

// Loads the library once per process (thread-safe); later calls return the first result.
// Unavailable naming the library and dlerror() when it or a symbol is missing.
[[nodiscard]] absl::Status LoadNccl();
// The loaded entry points; only after LoadNccl() returned OK.
const NcclApi& Nccl();

}  // namespace cleave::transport::gpu
