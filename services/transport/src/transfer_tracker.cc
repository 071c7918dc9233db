#include "transfer_tracker.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cleave/common/metrics.h"

namespace cleave::transport {

struct TransferTracker::Transfer {
  TransferKey key;
  std::vector<int32_t> blocks;  // the agreement: sorted, unique
  int state_slot = -1;          // the agreed state slot; < 0: none
  // [kv_row * blocks.size() + slot]: 1 once that block's K and V landed in that KV layer.
  std::vector<uint8_t> landed;
  size_t landed_count = 0;
  // [state_row]: 1 once that state layer's slot landed. Empty when no slot is agreed.
  std::vector<uint8_t> state_landed;
  size_t state_landed_count = 0;
  int writers = 0;       // BeginLayer / BeginState tickets not yet ended
  bool removed = false;  // no longer in the map: late EndLayers change nothing
  std::chrono::steady_clock::time_point expected_at;  // Expect: the transfer's seconds start here
};

TransferTracker::TransferTracker(const KvGeometry& geometry, ReceiverCallbacks callbacks)
    : geometry_(geometry), callbacks_(std::move(callbacks)) {
  const int n = std::max(geometry_.num_layers, 0);
  kv_row_.assign(n, -1);
  state_row_.assign(n, -1);
  for (int l = 0; l < n; ++l) {
    if (geometry_.is_state_layer(l)) {
      state_row_[l] = static_cast<int>(num_state_layers_++);
    } else {
      kv_row_[l] = static_cast<int>(num_kv_layers_++);
    }
  }
}

TransferTracker::~TransferTracker() = default;

void TransferTracker::Expect(TransferKey key, std::vector<int32_t> blocks, int state_slot) {
  auto t = std::make_shared<Transfer>();
  t->key = key;
  if (callbacks_.metrics.seconds) t->expected_at = std::chrono::steady_clock::now();
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  t->landed.assign(blocks.size() * num_kv_layers_, 0);
  t->blocks = std::move(blocks);
  t->state_slot = state_slot < 0 ? -1 : state_slot;
  if (t->state_slot >= 0) t->state_landed.assign(num_state_layers_, 0);
  std::unique_lock lock(mu_);
  RemoveAndDrain(lock, key);
  ended_.erase(key);
  transfers_[key] = std::move(t);
  agreed_.notify_all();
}

void TransferTracker::Forget(TransferKey key) {
  std::unique_lock lock(mu_);
  RemoveAndDrain(lock, key);
  MarkEnded(key);
}

void TransferTracker::ForgetAll() {
  std::unique_lock lock(mu_);
  std::vector<TransferKey> keys;
  keys.reserve(transfers_.size());
  for (const auto& [key, t] : transfers_) keys.push_back(key);
  for (TransferKey key : keys) {
    RemoveAndDrain(lock, key);
    MarkEnded(key);
  }
}

void TransferTracker::AwaitAgreement(std::unique_lock<std::mutex>& lock, TransferKey key) {
  const bool known = agreed_.wait_for(lock, std::chrono::milliseconds(kAgreementWaitMs), [&] {
    return silenced_.load() || transfers_.contains(key) || ended_.contains(key);
  });
  // ExpectKv reaches this worker before the sender is even told to start, so a transfer still
  // unknown after the wait belongs to an agreement this worker never got or dropped (a scheduler
  // it lost, a partition that healed): its remaining frames are discarded at once instead of each
  // waiting again, which would stall every transfer queued behind them on the connection.
  if (!known) MarkEnded(key);
}

void TransferTracker::MarkEnded(TransferKey key) {
  if (ended_.insert(key).second) {
    ended_order_.push_back(key);
    if (ended_order_.size() > kMaxEnded) {
      ended_.erase(ended_order_.front());
      ended_order_.pop_front();
    }
  }
  agreed_.notify_all();
}

std::shared_ptr<TransferTracker::Transfer> TransferTracker::FindAgreed(
    std::unique_lock<std::mutex>& lock, TransferKey key) {
  AwaitAgreement(lock, key);
  auto it = transfers_.find(key);
  return it == transfers_.end() ? nullptr : it->second;
}

TransferTracker::LayerTicket TransferTracker::Refuse(std::unique_lock<std::mutex>& lock,
                                                     TransferKey key, std::string why) {
  LayerTicket ticket;
  ticket.verdict = Verdict::kRefuse;
  ticket.why = std::move(why);
  RemoveAndDrain(lock, key);
  MarkEnded(key);
  lock.unlock();
  CallFailed(key, ticket.why);
  return ticket;
}

TransferTracker::LayerTicket TransferTracker::BeginLayer(TransferKey key, uint64_t layer,
                                                         std::span<const int32_t> blocks) {
  std::unique_lock lock(mu_);
  std::shared_ptr<Transfer> transfer = FindAgreed(lock, key);
  if (!transfer) return LayerTicket{};  // kDiscard
  Transfer& t = *transfer;

  if (layer >= static_cast<uint64_t>(geometry_.num_layers)) {
    return Refuse(
        lock, key,
        absl::StrCat("layer ", layer, " out of range (num_layers ", geometry_.num_layers, ")"));
  }
  if (kv_row_[layer] < 0) {
    return Refuse(lock, key, absl::StrCat("layer ", layer, " is a state layer: no KV blocks"));
  }
  LayerTicket ticket;
  std::vector<uint8_t> seen(t.blocks.size(), 0);
  for (size_t i = 0; i < blocks.size(); ++i) {
    const int32_t b = blocks[i];
    const auto pos = std::lower_bound(t.blocks.begin(), t.blocks.end(), b);
    if (b < 0 || b >= geometry_.num_blocks) {
      return Refuse(
          lock, key,
          absl::StrCat("block ", b, " out of range (num_blocks ", geometry_.num_blocks, ")"));
    }
    if (pos == t.blocks.end() || *pos != b) {
      return Refuse(lock, key, absl::StrCat("block ", b, " was not agreed for this transfer"));
    }
    const auto slot = static_cast<uint32_t>(pos - t.blocks.begin());
    if (seen[slot]) {
      return Refuse(lock, key, absl::StrCat("block ", b, " appears twice in one frame"));
    }
    seen[slot] = 1;
    ticket.slots.push_back(slot);
  }
  ++t.writers;
  ticket.verdict = Verdict::kWrite;
  ticket.transfer = std::move(transfer);
  ticket.layer = static_cast<uint32_t>(layer);
  return ticket;
}

TransferTracker::LayerTicket TransferTracker::BeginState(TransferKey key, uint64_t layer,
                                                         uint64_t slot) {
  std::unique_lock lock(mu_);
  std::shared_ptr<Transfer> transfer = FindAgreed(lock, key);
  if (!transfer) return LayerTicket{};  // kDiscard
  Transfer& t = *transfer;

  if (layer >= static_cast<uint64_t>(geometry_.num_layers)) {
    return Refuse(
        lock, key,
        absl::StrCat("layer ", layer, " out of range (num_layers ", geometry_.num_layers, ")"));
  }
  if (state_row_[layer] < 0) {
    return Refuse(lock, key, absl::StrCat("layer ", layer, " is a KV layer: no state"));
  }
  if (slot >= static_cast<uint64_t>(std::max(geometry_.num_state_slots, 0))) {
    return Refuse(lock, key,
                  absl::StrCat("state slot ", slot, " out of range (num_state_slots ",
                               geometry_.num_state_slots, ")"));
  }
  if (t.state_slot < 0) {
    return Refuse(lock, key, "no state slot was agreed for this transfer");
  }
  if (slot != static_cast<uint64_t>(t.state_slot)) {
    return Refuse(lock, key,
                  absl::StrCat("state slot ", slot, " was not agreed for this transfer (",
                               t.state_slot, " was)"));
  }
  ++t.writers;
  LayerTicket ticket;
  ticket.verdict = Verdict::kWrite;
  ticket.transfer = std::move(transfer);
  ticket.layer = static_cast<uint32_t>(layer);
  ticket.is_state = true;
  return ticket;
}

void TransferTracker::EndLayer(LayerTicket& ticket, bool written, const std::string& why) {
  if (ticket.verdict != Verdict::kWrite || !ticket.transfer) return;
  std::shared_ptr<Transfer> t = std::move(ticket.transfer);
  std::unique_lock lock(mu_);
  --t->writers;
  if (written && !t->removed && ticket.is_state) {
    uint8_t& l = t->state_landed[static_cast<size_t>(state_row_[ticket.layer])];
    t->state_landed_count += l == 0;
    l = 1;
  } else if (written && !t->removed) {
    const size_t base = static_cast<size_t>(kv_row_[ticket.layer]) * t->blocks.size();
    for (uint32_t slot : ticket.slots) {
      uint8_t& l = t->landed[base + slot];
      t->landed_count += l == 0;
      l = 1;
    }
  }
  writes_done_.notify_all();
  if (written && !t->removed && callbacks_.metrics.bytes) {
    callbacks_.metrics.bytes->Inc(
        ticket.is_state ? geometry_.conv_state_bytes + geometry_.ssm_state_bytes
                        : 2 * ticket.slots.size() * geometry_.block_bytes());
  }
  if (written || t->removed) return;
  // The payload stopped part-way: those blocks hold a mix of old and new bytes.
  const TransferKey key = t->key;
  RemoveAndDrain(lock, key);
  MarkEnded(key);
  lock.unlock();
  CallFailed(key, why.empty() ? "frame truncated" : why);
}

void TransferTracker::Finish(TransferKey key) {
  std::unique_lock lock(mu_);
  AwaitAgreement(lock, key);
  std::shared_ptr<Transfer> t = RemoveAndDrain(lock, key);
  MarkEnded(key);
  lock.unlock();
  if (!t) return;  // cancelled, already failed, or a duplicate finish
  const size_t want = t->landed.size();
  const size_t want_state = t->state_landed.size();
  if (t->landed_count == want && t->state_landed_count == want_state) {
    if (callbacks_.metrics.seconds) {
      callbacks_.metrics.seconds->Observe(
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t->expected_at).count());
    }
    CallReady(key);
  } else {
    CallFailed(key, absl::StrCat("incomplete: ", t->landed_count, " of ", want,
                                 " (layer, block) pairs and ", t->state_landed_count, " of ",
                                 want_state, " state layers arrived before the finish frame"));
  }
}

void TransferTracker::Fail(TransferKey key, const std::string& why) {
  std::unique_lock lock(mu_);
  std::shared_ptr<Transfer> t = RemoveAndDrain(lock, key);
  MarkEnded(key);
  lock.unlock();
  if (t) CallFailed(key, why);
}

std::shared_ptr<TransferTracker::Transfer> TransferTracker::RemoveAndDrain(
    std::unique_lock<std::mutex>& lock, TransferKey key) {
  auto it = transfers_.find(key);
  if (it == transfers_.end()) return nullptr;
  std::shared_ptr<Transfer> t = std::move(it->second);
  transfers_.erase(it);
  t->removed = true;
  // Bounded by the I/O timeout: a pinned write is a recv() that fails once its peer stalls.
  writes_done_.wait(lock, [&] { return t->writers == 0; });
  return t;
}

void TransferTracker::CallReady(TransferKey key) {
  if (callbacks_.metrics.ok) callbacks_.metrics.ok->Inc();
  if (!silenced_.load() && callbacks_.on_ready) callbacks_.on_ready(key.request_id, key.attempt);
}

void TransferTracker::CallFailed(TransferKey key, const std::string& why) {
  if (callbacks_.metrics.failed) callbacks_.metrics.failed->Inc();
  if (!silenced_.load() && callbacks_.on_failed) {
    callbacks_.on_failed(key.request_id, key.attempt, why);
  }
}

}  // namespace cleave::transport
