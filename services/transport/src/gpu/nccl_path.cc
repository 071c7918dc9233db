// nccl://: each connection gets a 2-rank NCCL communicator (sender rank 0, receiver rank 1)
// whose ncclUniqueId the sender makes and sends in the GPU setup frame, so the id travels only
// over the authenticated control connection. Per LAYER / STATE frame the sender writes the
// header and ids on the socket, then one grouped ncclSend per payload part; the receiver, having
// judged the header, posts the matching grouped ncclRecv (into the store, or into scratch for a
// frame it does not take, so the message stream stays aligned).
//
// Communicators are non-blocking (config.blocking = 0) and every wait polls: the communicator's
// async state, the stream, the deadline (io_timeout_ms per frame) and the control socket. A peer
// that dies or stalls therefore fails the frame, and the connection (ncclCommAbort), instead of
// hanging the caller.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "cleave/common/status.h"
#include "gpu_util.h"
#include "nccl_api.h"
#include "../socket_io.h"

namespace cleave::transport::gpu {
namespace {

static_assert(sizeof(ncclUniqueId) <= wire::kMaxSetupPayloadBytes);
constexpr int kSenderRank = 0, kReceiverRank = 1;

const char* NcclName(ncclResult_t r) {
  switch (r) {
    case ncclSuccess: return "ncclSuccess";
    case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
    case ncclSystemError: return "ncclSystemError";
    case ncclInternalError: return "ncclInternalError";
    case ncclInvalidArgument: return "ncclInvalidArgument";
    case ncclInvalidUsage: return "ncclInvalidUsage";
    case ncclRemoteError: return "ncclRemoteError";
    case ncclInProgress: return "ncclInProgress";
    default: return "ncclResult(unknown)";
  }
}

// A remote error or a broken connection means the peer is gone; the rest are local faults.
absl::Status NcclStatus(ncclResult_t r, ncclComm_t comm, absl::string_view what) {
  const std::string msg = absl::StrCat(what, ": ", NcclName(r), " (", Nccl().GetErrorString(r), ")",
                                       comm != nullptr ? absl::StrCat(": ", Nccl().GetLastError(comm))
                                                       : std::string());
  if (r == ncclRemoteError || r == ncclSystemError) return absl::UnavailableError(msg);
  return absl::InternalError(msg);
}

// Owns one connection's communicator and stream on one device. Destruction aborts the
// communicator (ncclCommDestroy could wait forever on a dead peer's outstanding work).
class NcclLink {
 public:
  NcclLink(int device, int io_timeout_ms) : device_(device), io_timeout_ms_(io_timeout_ms) {}
  ~NcclLink() {
    DeviceGuard guard(device_);
    if (comm_ != nullptr) {
      ncclResult_t r = Nccl().CommAbort(comm_);
      // Non-blocking communicators may finish aborting in the background.
      const auto until = Clock::now() + std::chrono::seconds(10);
      while (r == ncclInProgress && Clock::now() < until) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        if (Nccl().CommGetAsyncError(comm_, &r) != ncclSuccess) break;
      }
    }
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
    if (scratch_ != nullptr) (void)cudaFree(scratch_);
  }
  NcclLink(const NcclLink&) = delete;
  NcclLink& operator=(const NcclLink&) = delete;

  // Joins the communicator as `rank`; the peer does the same with the same id.
  absl::Status Init(int fd, const ncclUniqueId& id, int rank, Clock::time_point deadline) {
    DeviceGuard guard(device_);
    CLEAVE_RETURN_IF_ERROR(guard.status());
    CLEAVE_RETURN_IF_ERROR(
        CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    const ncclResult_t r = Nccl().CommInitRankConfig(&comm_, 2, id, rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      return NcclStatus(r, comm_, "ncclCommInitRankConfig");
    }
    return WaitComm(fd, deadline, "NCCL communicator init");
  }

  // One grouped ncclSend (to_peer) or ncclRecv per part, then waits for all of them. Parts with
  // a null base are received into scratch and dropped.
  absl::Status Exchange(int fd, std::span<const iovec> parts, bool send) {
    DeviceGuard guard(device_);
    CLEAVE_RETURN_IF_ERROR(guard.status());
    const auto deadline = Clock::now() + std::chrono::milliseconds(io_timeout_ms_);
    const int peer = send ? kReceiverRank : kSenderRank;
    for (const iovec& p : parts) {
      if (!send && p.iov_base == nullptr) CLEAVE_RETURN_IF_ERROR(EnsureScratch(p.iov_len));
    }
    ncclResult_t first = Nccl().GroupStart();
    for (const iovec& p : parts) {
      if (first != ncclSuccess && first != ncclInProgress) break;
      if (send) {
        first = Nccl().Send(p.iov_base, p.iov_len, ncclUint8, peer, comm_, stream_);
      } else {
        // Dropped parts all land in the one scratch buffer: their bytes are never read.
        void* dst = p.iov_base != nullptr ? p.iov_base : scratch_;
        first = Nccl().Recv(dst, p.iov_len, ncclUint8, peer, comm_, stream_);
      }
    }
    // The group must be closed whatever happened inside it.
    const ncclResult_t end = Nccl().GroupEnd();
    if (first != ncclSuccess && first != ncclInProgress) {
      return NcclStatus(first, comm_, send ? "ncclSend" : "ncclRecv");
    }
    if (end != ncclSuccess && end != ncclInProgress) return NcclStatus(end, comm_, "ncclGroupEnd");
    CLEAVE_RETURN_IF_ERROR(WaitComm(fd, deadline, "NCCL enqueue"));
    return WaitStream(fd, deadline);
  }

  // Scratch for frames the receiver drops; sized once for the largest payload part.
  void ReserveScratch(size_t bytes) { scratch_want_ = std::max<size_t>(bytes, 1); }

 private:
  absl::Status EnsureScratch(size_t bytes) {
    if (bytes > scratch_want_) return absl::InternalError("NCCL scratch smaller than a part");
    if (scratch_ != nullptr) return absl::OkStatus();
    return CudaStatus(cudaMalloc(&scratch_, scratch_want_), "cudaMalloc (NCCL scratch)");
  }

  // Until the communicator has no operation in progress (init, or enqueueing a group).
  absl::Status WaitComm(int fd, Clock::time_point deadline, absl::string_view what) {
    for (;;) {
      ncclResult_t state = ncclInProgress;
      const ncclResult_t r = Nccl().CommGetAsyncError(comm_, &state);
      if (r != ncclSuccess) return NcclStatus(r, comm_, "ncclCommGetAsyncError");
      if (state == ncclSuccess) return absl::OkStatus();
      if (state != ncclInProgress) return NcclStatus(state, comm_, what);
      CLEAVE_RETURN_IF_ERROR(CheckPeer(fd, deadline, what));
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // Until the stream's NCCL kernels are done: the source may then be reused / the data is there.
  absl::Status WaitStream(int fd, Clock::time_point deadline) {
    for (;;) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return absl::OkStatus();
      if (e != cudaErrorNotReady) return CudaStatus(e, "NCCL transfer (cudaStreamQuery)");
      ncclResult_t state = ncclSuccess;
      if (Nccl().CommGetAsyncError(comm_, &state) == ncclSuccess && state != ncclSuccess &&
          state != ncclInProgress) {
        return NcclStatus(state, comm_, "NCCL transfer");
      }
      CLEAVE_RETURN_IF_ERROR(CheckPeer(fd, deadline, "NCCL transfer"));
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  static absl::Status CheckPeer(int fd, Clock::time_point deadline, absl::string_view what) {
    if (PeerClosed(fd)) {
      return absl::UnavailableError(absl::StrCat(what, ": the peer closed its connection"));
    }
    if (Clock::now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(what, ": no progress before the deadline"));
    }
    return absl::OkStatus();
  }

  const int device_;
  const int io_timeout_ms_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;
  size_t scratch_want_ = 1;
};

class NcclSendChannel final : public SendPayloadChannel {
 public:
  explicit NcclSendChannel(std::unique_ptr<NcclLink> link) : link_(std::move(link)) {}

  PayloadResult Send(int fd, const FrameSource& frame) override {
    iovec head{const_cast<std::byte*>(frame.head.data()), frame.head.size()};
    if (absl::Status s = WriteFullv(fd, &head, 1); !s.ok()) return {s, false};
    // Any failure past the header leaves the peer mid-frame: the connection goes with it.
    absl::Status s = link_->Exchange(fd, frame.payload, /*send=*/true);
    return {s, s.ok()};
  }

 private:
  std::unique_ptr<NcclLink> link_;
};

class NcclSendPath final : public SendPayloadPath {
 public:
  explicit NcclSendPath(const TransportOptions& options) : options_(options) {}
  const char* prefix() const override { return SchemePrefix(PayloadScheme::kNccl); }

  absl::StatusOr<std::unique_ptr<SendPayloadChannel>> Open(int fd) override {
    CLEAVE_RETURN_IF_ERROR(LoadNccl());
    ncclUniqueId id;
    {
      DeviceGuard guard(options_.cuda_device);
      CLEAVE_RETURN_IF_ERROR(guard.status());
      if (const ncclResult_t r = Nccl().GetUniqueId(&id); r != ncclSuccess) {
        return NcclStatus(r, nullptr, "ncclGetUniqueId");
      }
    }
    std::array<std::byte, sizeof(ncclUniqueId)> bytes;
    std::memcpy(bytes.data(), &id, sizeof(id));
    CLEAVE_RETURN_IF_ERROR(SendSetup(fd, wire::GpuScheme::kNccl, bytes));
    auto link = std::make_unique<NcclLink>(options_.cuda_device, options_.io_timeout_ms);
    CLEAVE_RETURN_IF_ERROR(link->Init(fd, id, kSenderRank, SetupDeadline(options_)));
    return std::unique_ptr<SendPayloadChannel>(new NcclSendChannel(std::move(link)));
  }

 private:
  const TransportOptions options_;
};

class NcclRecvChannel final : public RecvPayloadChannel {
 public:
  explicit NcclRecvChannel(std::unique_ptr<NcclLink> link) : link_(std::move(link)) {}

  absl::Status ReadControl(int fd, size_t parts) override {
    (void)fd, (void)parts;  // nothing but the ids travels on the socket
    return absl::OkStatus();
  }

  PayloadResult Land(int fd, const wire::FrameHeader& header, std::span<const iovec> parts,
                     TransferTracker::Verdict verdict) override {
    (void)header;
    if (verdict == TransferTracker::Verdict::kWrite) {
      absl::Status s = link_->Exchange(fd, parts, /*send=*/false);
      return {s, s.ok()};
    }
    dropped_.assign(parts.begin(), parts.end());
    for (iovec& p : dropped_) p.iov_base = nullptr;
    absl::Status s = link_->Exchange(fd, dropped_, /*send=*/false);
    return {s, s.ok()};
  }

 private:
  std::unique_ptr<NcclLink> link_;
  std::vector<iovec> dropped_;
};

class NcclRecvPath final : public RecvPayloadPath {
 public:
  NcclRecvPath(const TransportOptions& options, KvBlockStore& store)
      : options_(options), store_(store) {}
  const char* prefix() const override { return SchemePrefix(PayloadScheme::kNccl); }

  absl::StatusOr<std::unique_ptr<RecvPayloadChannel>> Accept(int fd) override {
    CLEAVE_RETURN_IF_ERROR(LoadNccl());
    ncclUniqueId id;
    std::array<std::byte, sizeof(ncclUniqueId)> bytes;
    CLEAVE_RETURN_IF_ERROR(AcceptSetup(fd, wire::GpuScheme::kNccl, bytes));
    std::memcpy(&id, bytes.data(), sizeof(id));
    auto link = std::make_unique<NcclLink>(store_.cuda_device(), options_.io_timeout_ms);
    const KvGeometry& g = store_.geometry();
    size_t largest = std::max(g.conv_state_bytes, g.ssm_state_bytes);
    for (int l = 0; l < g.num_layers; ++l) {
      if (!g.is_state_layer(l)) largest = std::max(largest, g.block_bytes());
    }
    link->ReserveScratch(largest);
    CLEAVE_RETURN_IF_ERROR(link->Init(fd, id, kReceiverRank, SetupDeadline(options_)));
    return std::unique_ptr<RecvPayloadChannel>(new NcclRecvChannel(std::move(link)));
  }

 private:
  const TransportOptions options_;
  KvBlockStore& store_;
};

}  // namespace

std::unique_ptr<SendPayloadPath> MakeNcclSendPath(const TransportOptions& options) {
  return std::make_unique<NcclSendPath>(options);
}

std::unique_ptr<RecvPayloadPath> MakeNcclRecvPath(const TransportOptions& options,
                                                  KvBlockStore& store) {
  return std::make_unique<NcclRecvPath>(options, store);
}

}  // namespace cleave::transport::gpu
