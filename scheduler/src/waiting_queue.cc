#include "waiting_queue.h"

namespace cleave::scheduler {

void WaitingQueue::PushBack(Request& request) {
  request.queue_ticket = next_ticket_++;
  classes_[ClassOf(request)].push_back({request.id, request.queue_ticket});
  ++size_;
}

void WaitingQueue::PushFront(Request& request) {
  request.queue_ticket = next_ticket_++;
  classes_[ClassOf(request)].push_front({request.id, request.queue_ticket});
  ++size_;
}

const WaitingQueue::Entry* WaitingQueue::Front(const IsLive& is_live) {
  while (!classes_.empty()) {
    auto& entries = classes_.begin()->second;
    while (!entries.empty() && !is_live(entries.front())) {
      entries.pop_front();
      --size_;
    }
    if (!entries.empty()) return &entries.front();
    classes_.erase(classes_.begin());
  }
  return nullptr;
}

void WaitingQueue::MaybeCompact(int num_live, const IsLive& is_live) {
  if (size_ < 64 || size_ <= 2 * static_cast<size_t>(num_live)) return;
  size_ = 0;
  for (auto it = classes_.begin(); it != classes_.end();) {
    std::deque<Entry> kept;
    for (const Entry& e : it->second) {
      if (is_live(e)) kept.push_back(e);
    }
    size_ += kept.size();
    if (kept.empty()) {
      it = classes_.erase(it);
    } else {
      it->second = std::move(kept);
      ++it;
    }
  }
}

}  // namespace cleave::scheduler
