// Whether the frontend still takes generation requests, and how many it holds. SIGTERM starts a
// drain: from then on new generations are refused (HTTP 503, gRPC UNAVAILABLE, /ready 503, gRPC
// health NOT_SERVING) while the ones already admitted run to completion; the process stops its
// servers once none is held, or when its grace period is over.
//
// Threads: every member may be called from any thread. An Admission may be released on any
// thread (a GenerateCall dies on an I/O thread, a gRPC reactor on a gRPC thread).
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <utility>

namespace cleave::frontend {

class FrontendLifecycle {
 public:
  // One admitted generation request (all its choices). It counts as in flight until destroyed:
  // hold it until the response's last byte is out, or the drain may cut the response short.
  class Admission {
   public:
    explicit Admission(FrontendLifecycle* owner) : owner_(owner) {}
    Admission(Admission&& other) noexcept : owner_(std::exchange(other.owner_, nullptr)) {}
    Admission& operator=(Admission&& other) noexcept {
      if (this != &other) {
        Release();
        owner_ = std::exchange(other.owner_, nullptr);
      }
      return *this;
    }
    Admission(const Admission&) = delete;
    Admission& operator=(const Admission&) = delete;
    ~Admission() { Release(); }

   private:
    void Release() {
      if (owner_ != nullptr) owner_->Release();
      owner_ = nullptr;
    }
    FrontendLifecycle* owner_;
  };

  // nullopt while draining: the caller refuses the request (and admits nothing).
  std::optional<Admission> TryAdmit() {
    std::lock_guard lock(mu_);
    if (draining_) return std::nullopt;
    ++in_flight_;
    return Admission(this);
  }

  // Idempotent. Admissions already given stay valid.
  void BeginDrain() {
    std::lock_guard lock(mu_);
    draining_ = true;
  }

  bool draining() const {
    std::lock_guard lock(mu_);
    return draining_;
  }

  int in_flight() const {
    std::lock_guard lock(mu_);
    return in_flight_;
  }

  // Blocks until no admission is held (true) or `deadline` passes (false).
  bool WaitIdle(std::chrono::steady_clock::time_point deadline) {
    std::unique_lock lock(mu_);
    return idle_.wait_until(lock, deadline, [&] { return in_flight_ == 0; });
  }

 private:
  void Release() {
    std::lock_guard lock(mu_);
    if (--in_flight_ == 0) idle_.notify_all();
  }

  mutable std::mutex mu_;
  std::condition_variable idle_;
  bool draining_ = false;
  int in_flight_ = 0;
};

}  // namespace cleave::frontend
