#include "cleave/common/shutdown.h"

#include <pthread.h>
#include <signal.h>
#include <ucontext.h>
#include <unistd.h>

#include <thread>

namespace cleave {

namespace {

// Runs only in a thread that left SIGINT/SIGTERM unblocked: threads a library started before
// main() (OpenBLAS starts its pool from a shared-library constructor) did not inherit the mask
// set below, and the kernel may hand a process-directed SIGTERM to one of them, whose default
// action would kill the process before sigwait() sees it — no drain, no clean exit. The handler
// blocks both signals in that thread for good (the mask restored when a handler returns is the
// one saved in its ucontext) and raises the signal for the process again, where it reaches the
// next such thread or, once none is left, stays pending until sigwait() takes it. Each thread
// runs this at most once, so the re-raising ends. Async-signal-safe (kill; sigaddset only sets a
// bit in the saved mask).
void RedirectToSigwait(int sig, siginfo_t*, void* context) {
  auto* uc = static_cast<ucontext_t*>(context);
  sigaddset(&uc->uc_sigmask, SIGINT);
  sigaddset(&uc->uc_sigmask, SIGTERM);
  kill(getpid(), sig);
}

}  // namespace

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
    struct sigaction sa {};
    sa.sa_sigaction = RedirectToSigwait;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sa.sa_mask = set;
    sigaction(SIGINT, &sa, nullptr);
    sigaction(SIGTERM, &sa, nullptr);
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
