// A test double of EngineClient for unit tests of the frontend: each submitted request plays a
// script (tokens at a fixed interval, then finished; or an error; or "hang" until cancelled) on
// one engine thread, so callbacks arrive off the caller's thread as from the real client.
// Records every submit and cancel so tests can check what the frontend asked for.
//
// Header-only on purpose: only tests include it.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "cleave/frontend/engine_client.h"

namespace cleave::frontend::testing {

class ScriptedEngine : public EngineClient {
 public:
  struct Script {
    std::vector<EngineToken> tokens;
    bool finished_by_length = false;   // the last event's flag
    absl::Status error;                // not ok: the last event is this error (after the tokens)
    int retry_after_s = 0;
    std::chrono::milliseconds interval{0};  // between token events
    size_t tokens_per_event = 1;
    bool hang = false;                 // after the tokens, never finish (until Cancel)
    bool first_event_in_submit = false;  // deliver the first event synchronously inside Submit
  };
  using Scripter = std::function<Script(const v1::SubmitRequest&)>;

  explicit ScriptedEngine(Scripter scripter) : scripter_(std::move(scripter)) {
    thread_ = std::thread([this] { Run(); });
  }
  ~ScriptedEngine() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  uint64_t Submit(v1::SubmitRequest request, Callback callback) override {
    Script script = scripter_(request);
    uint64_t id = 0;
    bool sync = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      id = next_id_++;
      submitted_.push_back(request);
      Request& r = requests_[id];
      r.callback = std::move(callback);
      r.script = std::move(script);
      sync = r.script.first_event_in_submit;
      if (!sync) queue_.emplace(std::chrono::steady_clock::now(), id);
    }
    if (sync) {
      Step(id);
      std::lock_guard<std::mutex> lock(mu_);
      if (requests_.count(id)) queue_.emplace(std::chrono::steady_clock::now(), id);
    }
    cv_.notify_all();
    changed_.notify_all();
    return id;
  }

  void Cancel(uint64_t id, bool finished) override {
    std::lock_guard<std::recursive_mutex> deliver(deliver_mu_);  // waits out a running callback
    std::lock_guard<std::mutex> lock(mu_);
    cancels_.emplace_back(id, finished);
    requests_.erase(id);
    cv_.notify_all();
    changed_.notify_all();
  }

  bool Ready() override { return ready_; }
  void set_ready(bool ready) { ready_ = ready; }

  // One worker whose used blocks are the requests still running (a leak shows as used > 0).
  absl::StatusOr<v1::StatsResponse> Stats() override {
    std::lock_guard<std::mutex> lock(mu_);
    v1::StatsResponse stats;
    v1::WorkerStats* w = stats.add_workers();
    w->set_worker_id(1);
    w->set_name("scripted-0");
    w->set_role(v1::WORKER_ROLE_COLOCATED);
    w->set_num_kv_blocks(100000);
    w->set_used_blocks(static_cast<int32_t>(requests_.size()));
    w->set_free_blocks(100000 - static_cast<int32_t>(requests_.size()));
    w->set_num_running(static_cast<int32_t>(requests_.size()));
    stats.set_num_running(static_cast<int32_t>(requests_.size()));
    return stats;
  }

  std::vector<v1::SubmitRequest> submitted() {
    std::lock_guard<std::mutex> lock(mu_);
    return submitted_;
  }
  std::vector<std::pair<uint64_t, bool>> cancels() {
    std::lock_guard<std::mutex> lock(mu_);
    return cancels_;
  }
  size_t active() {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_.size();
  }
  // Waits until `pred(active(), cancels().size(), submitted().size())` holds or the timeout.
  bool WaitFor(std::function<bool(size_t active, size_t cancels, size_t submitted)> pred,
               std::chrono::milliseconds timeout = std::chrono::milliseconds(5000)) {
    std::unique_lock<std::mutex> lock(mu_);
    return changed_.wait_for(lock, timeout, [&] {
      return pred(requests_.size(), cancels_.size(), submitted_.size());
    });
  }

 private:
  struct Request {
    Callback callback;
    Script script;
    size_t pos = 0;
    bool accepted = false;
  };

  // Plays the next event of request `id`; returns whether more are due.
  bool Step(uint64_t id) {
    std::lock_guard<std::recursive_mutex> deliver(deliver_mu_);
    EngineEvent event;
    Callback callback;
    bool more = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = requests_.find(id);
      if (it == requests_.end()) return false;
      Request& r = it->second;
      callback = r.callback;
      if (!r.script.error.ok() && r.pos >= r.script.tokens.size()) {
        event.error = r.script.error;
        event.retry_after_s = r.script.retry_after_s;
      } else {
        event.accepted = !r.accepted;
        r.accepted = true;
        for (size_t k = 0; k < r.script.tokens_per_event && r.pos < r.script.tokens.size(); ++k) {
          event.tokens.push_back(r.script.tokens[r.pos++]);
        }
        const bool end = r.pos >= r.script.tokens.size();
        event.finished = end && !r.script.hang && r.script.error.ok();
        event.finished_by_length = event.finished && r.script.finished_by_length;
        more = !end || !r.script.error.ok();
      }
      if (!event.error.ok() || event.finished) requests_.erase(it);
      if (event.tokens.empty() && !event.finished && event.error.ok() && !event.accepted) {
        return false;  // hanging with nothing left to say
      }
    }
    changed_.notify_all();
    callback(event);  // under deliver_mu_ only, so Cancel from inside it does not deadlock
    return more;
  }

  void Run() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      if (queue_.empty()) {
        cv_.wait(lock);
        continue;
      }
      auto [due, id] = *queue_.begin();
      if (std::chrono::steady_clock::now() < due) {
        cv_.wait_until(lock, due);
        continue;
      }
      queue_.erase(queue_.begin());
      std::chrono::milliseconds interval{0};
      if (auto it = requests_.find(id); it != requests_.end()) interval = it->second.script.interval;
      lock.unlock();
      const bool more = Step(id);
      lock.lock();
      if (more && requests_.count(id)) queue_.emplace(std::chrono::steady_clock::now() + interval, id);
      changed_.notify_all();
    }
  }

  Scripter scripter_;
  std::mutex mu_;
  std::recursive_mutex deliver_mu_;  // held while a callback runs; Cancel waits for it
  std::condition_variable cv_;
  std::condition_variable changed_;
  std::multimap<std::chrono::steady_clock::time_point, uint64_t> queue_;
  std::map<uint64_t, Request> requests_;
  std::vector<v1::SubmitRequest> submitted_;
  std::vector<std::pair<uint64_t, bool>> cancels_;
  uint64_t next_id_ = 1;
  bool stop_ = false;
  std::atomic<bool> ready_{true};
  std::thread thread_;
};

}  // namespace cleave::frontend::testing
