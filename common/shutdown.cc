#include "cleave/common/shutdown.h"

#include <pthread.h>
#include <signal.h>

#include <thread>

namespace cleave {

void SignalThread(ShutdownLatch* latch) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  int sig = 0;
  while (sigwait(&set, &sig) == 0) {
    {
      std::lock_guard lock(latch->mu_);
      if (latch->signal_ == 0) latch->signal_ = sig;
      latch->requested_ = true;
    }
    latch->cv_.notify_all();
  }
}

ShutdownLatch& ShutdownLatch::InstallSignalHandlers() {
  static ShutdownLatch* latch = [] {
    auto* l = new ShutdownLatch();
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    std::thread(SignalThread, l).detach();
    return l;
  }();
  return *latch;
}

void ShutdownLatch::Request() {
  {
    std::lock_guard lock(mu_);
    requested_ = true;
  }
  cv_.notify_all();
}

bool ShutdownLatch::requested() const {
  std::lock_guard lock(mu_);
  return requested_;
}

void ShutdownLatch::Wait() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return requested_; });
}

bool ShutdownLatch::WaitFor(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [&] { return requested_; });
}

int ShutdownLatch::signal() const {
  std::lock_guard lock(mu_);
  return signal_;
}

}  // namespace cleave
