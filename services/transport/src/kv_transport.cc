// The public factories: one KvSender that routes each peer by its address scheme, and the
// receiver for a listen spec.
#include "cleave/transport/kv_transport.h"

#include <string_view>

#include "inproc_transport.h"
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
  explicit KvSenderImpl(const TransportOptions& options) : options_(options), tcp_(options) {}

  absl::Status SendLayer(const std::string& peer, const KvLayerSend& layer) override {
    if (IsInproc(peer)) return InprocSendLayer(InprocName(peer), options_.geometry, layer);
    return tcp_.SendLayer(peer, layer);
  }

  absl::Status SendState(const std::string& peer, const KvStateSend& state) override {
    if (IsInproc(peer)) return InprocSendState(InprocName(peer), options_.geometry, state);
    return tcp_.SendState(peer, state);
  }

  void Finish(const std::string& peer, uint64_t request_id, uint32_t attempt,
              DoneCallback done) override {
    const TransferKey key{request_id, attempt};
    if (IsInproc(peer))
      return InprocFinish(InprocName(peer), options_.geometry, key, std::move(done));
    tcp_.Finish(peer, key, std::move(done));
  }

 private:
  const TransportOptions options_;
  TcpSender tcp_;
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
  if (listen == "tcp") return TcpReceiver::Create(options, store, std::move(callbacks));
  return absl::InvalidArgumentError(
      "kv receiver: listen must be \"tcp\" or \"inproc://NAME\", got \"" + listen + "\"");
}

}  // namespace cleave::transport
