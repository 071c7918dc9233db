// Requests waiting for placement, in policy order: FCFS (arrival) or PRIORITY (lower `priority`
// value first, then arrival). Entries are deleted lazily: a cancelled or re-queued request leaves
// a stale entry whose ticket no longer matches the request's, skipped when it reaches the front.
// Not thread-safe; owned by SchedulerCore::Impl.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>

#include "cleave/scheduler/scheduler_core.h"
#include "request.h"

namespace cleave::scheduler {

class WaitingQueue {
 public:
  struct Entry {
    RequestId id = 0;
    uint64_t ticket = 0;
  };
  using IsLive = std::function<bool(const Entry&)>;

  explicit WaitingQueue(Policy policy) : policy_(policy) {}

  // Newly admitted: behind everything of its class.
  void PushBack(Request& request);
  // Preempted or re-run: ahead of everything of its class.
  void PushFront(Request& request);
  // The first live entry (stale ones in front are dropped), or nullptr. A placed request's
  // entry goes stale by itself (its state changes), so there is no PopFront.
  const Entry* Front(const IsLive& is_live);
  // Drops stale entries when they outnumber the live ones.
  void MaybeCompact(int num_live, const IsLive& is_live);

 private:
  int ClassOf(const Request& request) const {
    return policy_ == Policy::kPriority ? request.priority : 0;
  }

  const Policy policy_;
  uint64_t next_ticket_ = 1;
  size_t size_ = 0;
  std::map<int, std::deque<Entry>> classes_;  // priority class -> entries, front first
};

}  // namespace cleave::scheduler
