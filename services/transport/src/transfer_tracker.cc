#include "transfer_tracker.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/strings/str_cat.h"

namespace cleave::transport {

struct TransferTracker::Transfer {
  TransferKey key;
  std::vector<int32_t> blocks;  // the agreement: sorted, unique
  std::vector<uint8_t>
      landed;  // [layer * blocks.size() + slot]: 1 once that block's K and V landed
  size_t landed_count = 0;
  int writers = 0;       // BeginLayer tickets not yet ended
  bool removed = false;  // no longer in the map: late EndLayers change nothing
};

TransferTracker::TransferTracker(const KvGeometry& geometry, ReceiverCallbacks callbacks)
    : geometry_(geometry), callbacks_(std::move(callbacks)) {}

TransferTracker::~TransferTracker() = default;

void TransferTracker::Expect(TransferKey key, std::vector<int32_t> blocks) {
  auto t = std::make_shared<Transfer>();
  t->key = key;
  std::sort(blocks.begin(), blocks.end());
  blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
  t->landed.assign(blocks.size() * static_cast<size_t>(std::max(geometry_.num_layers, 0)), 0);
  t->blocks = std::move(blocks);
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

void TransferTracker::AwaitAgreement(std::unique_lock<std::mutex>& lock, TransferKey key) {
  agreed_.wait_for(lock, std::chrono::milliseconds(kAgreementWaitMs),
                   [&] { return silenced_.load() || transfers_.contains(key) || ended_.contains(key); });
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

TransferTracker::LayerTicket TransferTracker::BeginLayer(TransferKey key, uint64_t layer,
                                                         std::span<const int32_t> blocks) {
  LayerTicket ticket;
  std::unique_lock lock(mu_);
  AwaitAgreement(lock, key);
  auto it = transfers_.find(key);
  if (it == transfers_.end()) return ticket;  // kDiscard
  Transfer& t = *it->second;

  if (layer >= static_cast<uint64_t>(geometry_.num_layers)) {
    ticket.why =
        absl::StrCat("layer ", layer, " out of range (num_layers ", geometry_.num_layers, ")");
  }
  std::vector<uint8_t> seen(ticket.why.empty() ? t.blocks.size() : 0, 0);
  for (size_t i = 0; i < blocks.size() && ticket.why.empty(); ++i) {
    const int32_t b = blocks[i];
    const auto pos = std::lower_bound(t.blocks.begin(), t.blocks.end(), b);
    if (b < 0 || b >= geometry_.num_blocks) {
      ticket.why =
          absl::StrCat("block ", b, " out of range (num_blocks ", geometry_.num_blocks, ")");
    } else if (pos == t.blocks.end() || *pos != b) {
      ticket.why = absl::StrCat("block ", b, " was not agreed for this transfer");
    } else {
      const auto slot = static_cast<uint32_t>(pos - t.blocks.begin());
      if (seen[slot]) ticket.why = absl::StrCat("block ", b, " appears twice in one frame");
      seen[slot] = 1;
      ticket.slots.push_back(slot);
    }
  }
  if (!ticket.why.empty()) {
    ticket.verdict = Verdict::kRefuse;
    ticket.slots.clear();
    RemoveAndDrain(lock, key);
    MarkEnded(key);
    lock.unlock();
    CallFailed(key, ticket.why);
    return ticket;
  }
  ++t.writers;
  ticket.verdict = Verdict::kWrite;
  ticket.transfer = it->second;
  ticket.layer = static_cast<uint32_t>(layer);
  return ticket;
}

void TransferTracker::EndLayer(LayerTicket& ticket, bool written, const std::string& why) {
  if (ticket.verdict != Verdict::kWrite || !ticket.transfer) return;
  std::shared_ptr<Transfer> t = std::move(ticket.transfer);
  std::unique_lock lock(mu_);
  --t->writers;
  if (written && !t->removed) {
    const size_t base = static_cast<size_t>(ticket.layer) * t->blocks.size();
    for (uint32_t slot : ticket.slots) {
      uint8_t& l = t->landed[base + slot];
      t->landed_count += l == 0;
      l = 1;
    }
  }
  writes_done_.notify_all();
  if (written || t->removed) return;
  // The payload stopped part-way: those blocks hold a mix of old and new bytes.
  const TransferKey key = t->key;
  RemoveAndDrain(lock, key);
  MarkEnded(key);
  lock.unlock();
  CallFailed(key, why.empty() ? "layer frame truncated" : why);
}

void TransferTracker::Finish(TransferKey key) {
  std::unique_lock lock(mu_);
  AwaitAgreement(lock, key);
  std::shared_ptr<Transfer> t = RemoveAndDrain(lock, key);
  MarkEnded(key);
  lock.unlock();
  if (!t) return;  // cancelled, already failed, or a duplicate finish
  const size_t want = t->landed.size();
  if (t->landed_count == want) {
    CallReady(key);
  } else {
    CallFailed(key, absl::StrCat("incomplete: ", t->landed_count, " of ", want,
                                 " (layer, block) pairs arrived before the finish frame"));
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
  if (!silenced_.load() && callbacks_.on_ready) callbacks_.on_ready(key.request_id, key.attempt);
}

void TransferTracker::CallFailed(TransferKey key, const std::string& why) {
  if (!silenced_.load() && callbacks_.on_failed) {
    callbacks_.on_failed(key.request_id, key.attempt, why);
  }
}

}  // namespace cleave::transport
