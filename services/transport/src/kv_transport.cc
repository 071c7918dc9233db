// The public factories: one KvSender that routes each peer by its address scheme, and the
// receiver for a listen spec.
#include "cleave/transport/kv_transport.h"

#include <chrono>
#include <mutex>
#include <string_view>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "cleave/common/metrics.h"

#include "inproc_transport.h"
#include "payload_path.h"
#include "tcp_receiver.h"
#include "tcp_sender.h"

namespace cleave::transport {
namespace {

bool IsInproc(std::string_view address) { return address.starts_with(kInprocScheme); }
std::string InprocName(std::string_view address) {
  return std::string(address.substr(sizeof(kInprocScheme) - 1));
}

class KvSenderImpl final : public KvSender {
 public:
  explicit KvSenderImpl(const TransportOptions& options)
      : options_(options), metrics_(options.sent_metrics), tcp_(options) {}

  absl::Status SendLayer(const std::string& peer, const KvLayerSend& layer) override {
    const TransferKey key{layer.request_id, layer.attempt};
    if (metrics_.enabled()) NoteFrame(key);
    absl::Status st = IsInproc(peer) ? InprocSendLayer(InprocName(peer), options_.geometry, layer)
                                     : tcp_.SendLayer(peer, layer);
    if (st.ok() && metrics_.bytes) {
      metrics_.bytes->Inc(2 * layer.dst_blocks.size() * options_.geometry.block_bytes());
    }
    return st;
  }

  absl::Status SendState(const std::string& peer, const KvStateSend& state) override {
    const TransferKey key{state.request_id, state.attempt};
    if (metrics_.enabled()) NoteFrame(key);
    absl::Status st = IsInproc(peer) ? InprocSendState(InprocName(peer), options_.geometry, state)
                                     : tcp_.SendState(peer, state);
    if (st.ok() && metrics_.bytes) {
      metrics_.bytes->Inc(options_.geometry.conv_state_bytes + options_.geometry.ssm_state_bytes);
    }
    return st;
  }

  void Finish(const std::string& peer, uint64_t request_id, uint32_t attempt,
              DoneCallback done) override {
    const TransferKey key{request_id, attempt};
    if (metrics_.enabled()) done = Accounted(key, std::move(done));
    if (IsInproc(peer))
      return InprocFinish(InprocName(peer), options_.geometry, key, std::move(done));
    tcp_.Finish(peer, key, std::move(done));
  }

 private:
  using Clock = std::chrono::steady_clock;

  // A transfer's clock starts at its first frame, whether or not that frame got through.
  void NoteFrame(TransferKey key) {
    std::lock_guard lock(mu_);
    started_.try_emplace(key, Clock::now());
  }

  // Wraps `done` to count the transfer's outcome; a transfer that never sent a frame (removed
  // before its first chunk ran) is not a transfer and is not counted.
  DoneCallback Accounted(TransferKey key, DoneCallback done) {
    Clock::time_point start;
    {
      std::lock_guard lock(mu_);
      auto it = started_.find(key);
      if (it == started_.end()) return done;
      start = it->second;
      started_.erase(it);
    }
    return [m = metrics_, start, done = std::move(done)](absl::Status st) {
      if (st.ok()) {
        if (m.seconds) m.seconds->Observe(std::chrono::duration<double>(Clock::now() - start).count());
        if (m.ok) m.ok->Inc();
      } else if (m.failed) {
        m.failed->Inc();
      }
      done(std::move(st));
    };
  }

  const TransportOptions options_;
  const TransferMetrics metrics_;
  TcpSender tcp_;
  std::mutex mu_;
  absl::flat_hash_map<TransferKey, Clock::time_point> started_;  // guarded by mu_
};

}  // namespace

std::unique_ptr<KvSender> CreateKvSender(const TransportOptions& options) {
  return std::make_unique<KvSenderImpl>(options);
}

absl::StatusOr<std::unique_ptr<KvReceiver>> CreateKvReceiver(const std::string& listen,
                                                             const TransportOptions& options,
                                                             KvBlockStore& store,
                                                             ReceiverCallbacks callbacks) {
  if (IsInproc(listen))
    return CreateInprocReceiver(InprocName(listen), store, std::move(callbacks));
  const std::optional<PayloadScheme> scheme = ListenScheme(listen);
  if (!scheme) {
    return absl::InvalidArgumentError(
        "kv receiver: listen must be \"tcp\", \"nccl\", \"cuda-ipc\" or \"inproc://NAME\", "
        "got \"" + listen + "\"");
  }
  if (*scheme == PayloadScheme::kTcp) {
    return TcpReceiver::Create(options, store, std::move(callbacks));
  }
  absl::StatusOr<std::unique_ptr<RecvPayloadPath>> payload =
      MakeRecvPayloadPath(*scheme, options, store);
  if (!payload.ok()) return payload.status();
  return TcpReceiver::Create(options, store, std::move(callbacks), *std::move(payload));
}

bool KvGpuTransportsBuilt() { return GpuPayloadPathsBuilt(); }

}  // namespace cleave::transport
