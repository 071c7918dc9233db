#include "nccl_api.h"

#include <dlfcn.h>

#include <mutex>
#include <string>
#include <type_traits>

#include "absl/strings/str_cat.h"

namespace cleave::transport::gpu {
namespace {

NcclApi g_api;
absl::Status* g_status = nullptr;

absl::Status Load() {
  // The soname NCCL 2 installs; LD_LIBRARY_PATH / the toolkit's lib64 find it as for any library.
  void* lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    return absl::UnavailableError(absl::StrCat("nccl:// needs libnccl.so.2, which cannot be loaded: ",
                                               err != nullptr ? err : "unknown dlopen error"));
  }
  bool ok = true;
  std::string missing;
  auto bind = [&](auto& slot, const char* name) {
    void* sym = dlsym(lib, name);
    if (sym == nullptr) {
      ok = false;
      missing = name;
      return;
    }
    slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(sym);
  };
  bind(g_api.GetUniqueId, "ncclGetUniqueId");
  bind(g_api.CommInitRankConfig, "ncclCommInitRankConfig");
  bind(g_api.CommAbort, "ncclCommAbort");
  bind(g_api.CommDestroy, "ncclCommDestroy");
  bind(g_api.CommGetAsyncError, "ncclCommGetAsyncError");
  bind(g_api.GetErrorString, "ncclGetErrorString");
  bind(g_api.GetLastError, "ncclGetLastError");
  bind(g_api.GroupStart, "ncclGroupStart");
  bind(g_api.GroupEnd, "ncclGroupEnd");
  bind(g_api.Send, "ncclSend");
  bind(g_api.Recv, "ncclRecv");
  if (!ok) {
    return absl::UnavailableError(absl::StrCat("libnccl.so.2 has no ", missing, " (NCCL older than 2.14?)"));
  }
  return absl::OkStatus();  // the library stays loaded for the process
}

}  // namespace

absl::Status LoadNccl() {
  static std::once_flag once;
  std::call_once(once, [] { g_status = new absl::Status(Load()); });
  return *g_status;
}

const NcclApi& Nccl() { return g_api; }

}  // namespace cleave::transport::gpu
