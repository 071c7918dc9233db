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
  const wire::Hello theirs = HelloFor(ep.tracker.geometry());
  const wire::Hello ours = HelloFor(sender);
  if (SameGeometry(theirs, ours)) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("inproc://", name, " refused (geometry mismatch): it has ",
                   DescribeGeometry(theirs), "; this sender has ", DescribeGeometry(ours)));
}

// A registered endpoint, held open for one frame's checks and copy: the receiver's destructor
// waits for `lock` before it lets the store go.
struct OpenedEndpoint {
  std::shared_ptr<Endpoint> ep;
  std::shared_lock<std::shared_mutex> lock;  // after ep: released first
};
absl::StatusOr<OpenedEndpoint> Open(const std::string& name, const KvGeometry& sender) {
  OpenedEndpoint o;
  o.ep = Registry::Get().Find(name);
  if (!o.ep) return NoReceiver(name);
  o.lock = std::shared_lock(o.ep->mu);
  if (o.ep->closed) return NoReceiver(name);
  CLEAVE_RETURN_IF_ERROR(CheckHandshake(name, *o.ep, sender));
  return o;
}

// What a refused or discarded ticket means to the caller.
absl::Status TicketStatus(const std::string& name, const TransferTracker::LayerTicket& ticket) {
  if (ticket.verdict == TransferTracker::Verdict::kRefuse) {
    return absl::InvalidArgumentError(absl::StrCat("inproc://", name, " refused: ", ticket.why));
  }
  return absl::OkStatus();  // kDiscard: cancelled or never expected, a late frame, not an error
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
  void Expect(uint64_t request_id, uint32_t attempt, std::vector<int32_t> blocks,
              int state_slot) override {
    ep_->tracker.Expect({request_id, attempt}, std::move(blocks), state_slot);
  }
  void ForgetAll() override { ep_->tracker.ForgetAll(); }
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
  if (name.empty()) return absl::InvalidArgumentError("inproc receiver needs a name");
  if (absl::Status s = CheckGeometry(store.geometry(), /*receiver=*/true); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("kv receiver: store geometry: ", s.message()));
  }
  auto ep = std::make_shared<Endpoint>(store, std::move(callbacks));
  CLEAVE_RETURN_IF_ERROR(Registry::Get().Add(name, ep));
  return std::unique_ptr<KvReceiver>(new InprocReceiver(name, std::move(ep)));
}

absl::Status InprocSendLayer(const std::string& name, const KvGeometry& sender_geometry,
                             const KvLayerSend& layer) {
  CLEAVE_RETURN_IF_ERROR(CheckLayerSend(sender_geometry, layer));
  CLEAVE_ASSIGN_OR_RETURN(OpenedEndpoint opened, Open(name, sender_geometry));
  Endpoint* ep = opened.ep.get();
  const KvGeometry& g = ep->tracker.geometry();
  const size_t n = layer.dst_blocks.size();
  const size_t bb = g.block_bytes();
  CLEAVE_RETURN_IF_ERROR(CheckLayerFraming(g, n, 2 * n * bb));
  TransferTracker::LayerTicket ticket = ep->tracker.BeginLayer(
      {layer.request_id, layer.attempt}, static_cast<uint64_t>(layer.layer), layer.dst_blocks);
  if (ticket.verdict != TransferTracker::Verdict::kWrite) return TicketStatus(name, ticket);
  for (size_t i = 0; i < n; ++i) {
    std::memcpy(ep->store.BlockData(layer.layer, false, layer.dst_blocks[i]), layer.k_src[i], bb);
    std::memcpy(ep->store.BlockData(layer.layer, true, layer.dst_blocks[i]), layer.v_src[i], bb);
  }
  ep->tracker.EndLayer(ticket, /*written=*/true);
  return absl::OkStatus();
}

absl::Status InprocSendState(const std::string& name, const KvGeometry& sender_geometry,
                             const KvStateSend& state) {
  CLEAVE_RETURN_IF_ERROR(CheckStateSend(sender_geometry, state));
  CLEAVE_ASSIGN_OR_RETURN(OpenedEndpoint opened, Open(name, sender_geometry));
  Endpoint* ep = opened.ep.get();
  const KvGeometry& g = ep->tracker.geometry();
  CLEAVE_RETURN_IF_ERROR(
      CheckStateFraming(g, /*n_blocks=*/0, g.conv_state_bytes + g.ssm_state_bytes));
  TransferTracker::LayerTicket ticket =
      ep->tracker.BeginState({state.request_id, state.attempt}, static_cast<uint64_t>(state.layer),
                             static_cast<uint64_t>(state.dst_slot));
  if (ticket.verdict != TransferTracker::Verdict::kWrite) return TicketStatus(name, ticket);
  std::byte* conv = ep->store.StateData(state.layer, /*is_ssm=*/false, state.dst_slot);
  std::byte* ssm = ep->store.StateData(state.layer, /*is_ssm=*/true, state.dst_slot);
  if ((g.conv_state_bytes > 0 && conv == nullptr) || (g.ssm_state_bytes > 0 && ssm == nullptr)) {
    const std::string why =
        absl::StrCat("store has no state memory for layer ", state.layer, " slot ", state.dst_slot);
    ep->tracker.EndLayer(ticket, /*written=*/false, why);
    return absl::InternalError(absl::StrCat("inproc://", name, ": ", why));
  }
  if (g.conv_state_bytes > 0) std::memcpy(conv, state.conv_src, g.conv_state_bytes);
  if (g.ssm_state_bytes > 0) std::memcpy(ssm, state.ssm_src, g.ssm_state_bytes);
  ep->tracker.EndLayer(ticket, /*written=*/true);
  return absl::OkStatus();
}

void InprocFinish(const std::string& name, const KvGeometry& sender_geometry, TransferKey key,
                  DoneCallback done) {
  absl::Status st;
  {
    absl::StatusOr<OpenedEndpoint> opened = Open(name, sender_geometry);
    st = opened.status();
    if (st.ok()) opened->ep->tracker.Finish(key);
  }
  done(st);
}

}  // namespace cleave::transport
