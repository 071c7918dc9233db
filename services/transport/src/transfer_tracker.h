// The receiving side's book of agreed transfers, shared by every backend so that a frame is
// judged by the same rules whether it came over TCP or a memcpy.
//
// Per (request_id, attempt) it holds what the scheduler agreed (Expect: blocks, and a state slot
// or none) and which (KV layer, block) pairs and which state layers have landed. A frame's bytes
// are written only between BeginLayer / BeginState (which check the frame against the agreement
// and pin the transfer) and EndLayer. Forget / Finish / Fail wait for pinned writes of that
// transfer to end before they return, so once Forget returns nothing more is written for it and
// its blocks and slot can be handed to another request.
//
// A transfer's life:
//
//   Expect ──> open ──Begin{Layer,State}/EndLayer (any number, any layer order)──> open
//                │                                                        │
//                ├── Finish: every (KV layer, block) and, with a slot agreed, every state
//                │   layer landed                   ──> on_ready,  removed
//                ├── Finish: some missing           ──> on_failed("incomplete"), removed
//                ├── a frame breaks the agreement   ──> on_failed(why), removed
//                └── Forget                         ──> removed, no callback
//   Frames for a removed key are discarded: a late frame after a cancel is normal, not an error.
//   A frame (or finish) for a key neither expected nor ended waits up to kAgreementWaitMs for
//   its Expect: the scheduler sends ExpectKv to the decode worker and the request to the prefill
//   worker at the same moment, over different connections, so the first frame may win the race.
//
// Thread-safe. Callbacks run on the calling thread, never under the tracker's lock, so they
// may call back into Expect / Forget. ReceiverCallbacks::metrics (when set) counts the payload
// bytes of every frame written, each transfer's outcome (on_ready / on_failed; Forget is not an
// outcome) and the Expect -> on_ready time, so every backend's receiver counts alike.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include <deque>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "cleave/transport/kv_transport.h"

namespace cleave::transport {

struct TransferKey {
  uint64_t request_id = 0;
  uint32_t attempt = 0;
  bool operator==(const TransferKey&) const = default;
  template <typename H>
  friend H AbslHashValue(H h, const TransferKey& k) {
    return H::combine(std::move(h), k.request_id, k.attempt);
  }
};

class TransferTracker {
 public:
  struct Transfer;  // one agreed transfer; defined in the .cc

  enum class Verdict {
    kWrite,    // write the payload into the store, then call EndLayer
    kDiscard,  // not expected (never, or no longer): drop the payload silently
    kRefuse,   // broke the agreement: on_failed has run; drop the payload
  };
  struct LayerTicket {
    Verdict verdict = Verdict::kDiscard;
    std::string why;                     // kRefuse: the reason given to on_failed
    std::shared_ptr<Transfer> transfer;  // kWrite: the pinned transfer
    uint32_t layer = 0;                  // kWrite: where the frame lands
    bool is_state = false;               // kWrite: a STATE frame (into the agreed slot)
    std::vector<uint32_t> slots;         // kWrite, LAYER: index of each block in the agreement
  };

  TransferTracker(const KvGeometry& geometry, ReceiverCallbacks callbacks);
  ~TransferTracker();
  TransferTracker(const TransferTracker&) = delete;
  TransferTracker& operator=(const TransferTracker&) = delete;

  const KvGeometry& geometry() const { return geometry_; }

  // Replaces any earlier agreement for `key` (dropping what had landed). state_slot < 0: no
  // state is agreed (state frames are refused, and readiness needs none).
  void Expect(TransferKey key, std::vector<int32_t> blocks, int state_slot = -1);
  void Forget(TransferKey key);
  void ForgetAll();

  // Checks layer < num_layers and is a KV layer, and that every id is in range, agreed for
  // `key` and not repeated in the frame. Call only after CheckLayerFraming (layer_checks.h).
  LayerTicket BeginLayer(TransferKey key, uint64_t layer, std::span<const int32_t> blocks);
  // Checks layer < num_layers and is a state layer, and slot < num_state_slots and is the slot
  // agreed for `key`. Call only after CheckStateFraming (layer_checks.h).
  LayerTicket BeginState(TransferKey key, uint64_t layer, uint64_t slot);
  // Ends a kWrite ticket of either kind. written == false (the payload did not fully arrive)
  // fails the transfer with `why`.
  void EndLayer(LayerTicket& ticket, bool written, const std::string& why = "");

  // The sender's finish frame: on_ready if complete, else on_failed("incomplete ...").
  void Finish(TransferKey key);
  // Fails an open transfer (connection dropped, frame truncated); no-op when not expected.
  void Fail(TransferKey key, const std::string& why);

  // Receiver shutting down: from now on no callback runs, so none can reach an owner that is
  // being destroyed.
  void Silence() {
    silenced_.store(true);
    std::lock_guard lock(mu_);
    agreed_.notify_all();
  }

 private:
  // Waits for the agreement of `key`, then returns it; nullptr when there is none (kDiscard).
  std::shared_ptr<Transfer> FindAgreed(std::unique_lock<std::mutex>& lock, TransferKey key);
  // Refuses a frame that broke the agreement: removes `key`, then on_failed(why) unlocked.
  LayerTicket Refuse(std::unique_lock<std::mutex>& lock, TransferKey key, std::string why);
  // Removes `key` and waits until no write holds it; nullptr when it was not expected.
  std::shared_ptr<Transfer> RemoveAndDrain(std::unique_lock<std::mutex>& lock, TransferKey key);
  void CallReady(TransferKey key);
  void CallFailed(TransferKey key, const std::string& why);

  // Waits until `key` is expected or known to have ended (bounded by kAgreementWaitMs).
  void AwaitAgreement(std::unique_lock<std::mutex>& lock, TransferKey key);
  // Remembers that `key` ended (finished, failed, forgotten) so its late frames do not wait.
  void MarkEnded(TransferKey key);

  static constexpr int kAgreementWaitMs = 2000;
  static constexpr size_t kMaxEnded = 16384;

  const KvGeometry geometry_;
  // Per layer: its row among the KV layers (landed bookkeeping), or -1 for a state layer; and
  // its row among the state layers, or -1 for a KV layer.
  std::vector<int> kv_row_, state_row_;
  size_t num_kv_layers_ = 0, num_state_layers_ = 0;
  const ReceiverCallbacks callbacks_;
  std::atomic<bool> silenced_{false};
  std::mutex mu_;
  std::condition_variable writes_done_;  // a pinned write ended
  absl::flat_hash_map<TransferKey, std::shared_ptr<Transfer>> transfers_;
  std::condition_variable agreed_;  // an Expect or an end arrived
  absl::flat_hash_set<TransferKey> ended_;
  std::deque<TransferKey> ended_order_;  // FIFO bound on ended_
};

}  // namespace cleave::transport
