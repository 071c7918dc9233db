#include "inproc_transport.h"

#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "layer_checks.h"

namespace cleave::transport {
namespace {

// What a sender reaches through the registry. Senders hold `mu` shared while they copy; the
// receiver's destructor takes it exclusively and sets `closed`, so once it returns nobody
// touches the store again even if a sender still holds the endpoint.
struct Endpoint {
  Endpoint(KvBlockStore& s, ReceiverCallbacks cb)
      : store(s), tracker(s.geometry(), std::move(cb)) {}
  KvBlockStore& store;
  TransferTracker tracker;
  std::shared_mutex mu;
  bool closed = false;
};

class Registry {
 public:
  static Registry& Get() {
    static Registry* r = new Registry();  // never destroyed: receivers may outlive statics
    return *r;
  }
  absl::Status Add(const std::string& name, std::shared_ptr<Endpoint> ep) {
    std::lock_guard lock(mu_);
    if (!endpoints_.try_emplace(name, std::move(ep)).second) {
      return absl::AlreadyExistsError(absl::StrCat("inproc://", name, " is already registered"));
    }
    return absl::OkStatus();
  }
  void Remove(const std::string& name) {
    std::lock_guard lock(mu_);
    endpoints_.erase(name);
  }
  std::shared_ptr<Endpoint> Find(const std::string& name) {
    std::lock_guard lock(mu_);
    auto it = endpoints_.find(name);
    return it == endpoints_.end() ? nullptr : it->second;
  }

 private:
  std::mutex mu_;
  absl::flat_hash_map<std::string, std::shared_ptr<Endpoint>> endpoints_;
};

absl::Status NoReceiver(const std::string& name) {
  return absl::UnavailableError(absl::StrCat("no kv receiver at inproc://", name));
}

// What the TCP handshake would refuse.
absl::Status CheckHandshake(const std::string& name, const Endpoint& ep, const KvGeometry& sender) {
  const KvGeometry& g = ep.tracker.geometry();
  if (g.num_layers == sender.num_layers && g.block_bytes() == sender.block_bytes()) {
    return absl::OkStatus();
  }
  return absl::FailedPreconditionError(
      absl::StrCat("inproc://", name, " refused (geometry mismatch): it has ", g.num_layers,
                   " layers x ", g.block_bytes(), " B blocks; this sender has ", sender.num_layers,
                   " x ", sender.block_bytes()));
}

class InprocReceiver final : public KvReceiver {
 public:
  InprocReceiver(std::string name, std::shared_ptr<Endpoint> ep)
      : name_(std::move(name)), ep_(std::move(ep)) {}
  ~InprocReceiver() override {
    ep_->tracker.Silence();
    Registry::Get().Remove(name_);
    std::unique_lock lock(ep_->mu);  // waits for copies in flight
    ep_->closed = true;
  }
  std::string address() const override { return absl::StrCat(kInprocScheme, name_); }
  void Expect(uint64_t request_id, uint32_t attempt, std::vector<int32_t> blocks) override {
    ep_->tracker.Expect({request_id, attempt}, std::move(blocks));
  }
  void Forget(uint64_t request_id, uint32_t attempt) override {
    ep_->tracker.Forget({request_id, attempt});
  }

 private:
  const std::string name_;
  const std::shared_ptr<Endpoint> ep_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<KvReceiver>> CreateInprocReceiver(const std::string& name,
                                                                 KvBlockStore& store,
                                                                 ReceiverCallbacks callbacks) {
  const KvGeometry& g = store.geometry();
  if (name.empty()) return absl::InvalidArgumentError("inproc receiver needs a name");
  if (g.num_layers <= 0 || g.num_blocks <= 0 || g.block_bytes() == 0) {
    return absl::InvalidArgumentError("kv receiver: store geometry has an empty dimension");
  }
  auto ep = std::make_shared<Endpoint>(store, std::move(callbacks));
  CLEAVE_RETURN_IF_ERROR(Registry::Get().Add(name, ep));
  return std::unique_ptr<KvReceiver>(new InprocReceiver(name, std::move(ep)));
}

absl::Status InprocSendLayer(const std::string& name, const KvGeometry& sender_geometry,
                             const KvLayerSend& layer) {
  CLEAVE_RETURN_IF_ERROR(CheckLayerSend(sender_geometry, layer));
  std::shared_ptr<Endpoint> ep = Registry::Get().Find(name);
  if (!ep) return NoReceiver(name);
  std::shared_lock lock(ep->mu);
  if (ep->closed) return NoReceiver(name);
  CLEAVE_RETURN_IF_ERROR(CheckHandshake(name, *ep, sender_geometry));
  const KvGeometry& g = ep->tracker.geometry();
  const size_t n = layer.dst_blocks.size();
  const size_t bb = g.block_bytes();
  CLEAVE_RETURN_IF_ERROR(CheckLayerFraming(g, n, 2 * n * bb));
  TransferTracker::LayerTicket ticket = ep->tracker.BeginLayer(
      {layer.request_id, layer.attempt}, static_cast<uint64_t>(layer.layer), layer.dst_blocks);
  switch (ticket.verdict) {
    case TransferTracker::Verdict::kDiscard:
      return absl::OkStatus();  // cancelled or never expected: a late frame, not an error
    case TransferTracker::Verdict::kRefuse:
      return absl::InvalidArgumentError(absl::StrCat("inproc://", name, " refused: ", ticket.why));
    case TransferTracker::Verdict::kWrite:
      break;
  }
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(ep->store.BlockData(layer.layer, false, layer.dst_blocks[i]), layer.k_src[i], bb);
    std::memcpy(ep->store.BlockData(layer.layer, true, layer.dst_blocks[i]), layer.v_src[i], bb);
  }
  ep->tracker.EndLayer(ticket, /*written=*/true);
  return absl::OkStatus();
}

void InprocFinish(const std::string& name, const KvGeometry& sender_geometry, TransferKey key,
                  DoneCallback done) {
  std::shared_ptr<Endpoint> ep = Registry::Get().Find(name);
  absl::Status st = ep ? absl::OkStatus() : NoReceiver(name);
  if (ep) {
    std::shared_lock lock(ep->mu);
    if (ep->closed) {
      st = NoReceiver(name);
    } else {
      st = CheckHandshake(name, *ep, sender_geometry);
      if (st.ok()) ep->tracker.Finish(key);
    }
  }
  done(st);
}

}  // namespace cleave::transport
