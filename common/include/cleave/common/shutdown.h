// Orderly shutdown on SIGINT / SIGTERM for long-running roles. The signals are blocked in every
// thread (install before starting any) and taken synchronously by one sigwait() thread, so no
// work happens inside an async signal handler.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

namespace cleave {

class ShutdownLatch {
 public:
  // Process-wide latch set by SIGINT/SIGTERM. Call from main() before creating threads. Threads
  // that libraries started before main() (OpenBLAS) get the signals redirected to the latch too.
  static ShutdownLatch& InstallSignalHandlers();

  void Request();
  bool requested() const;
  void Wait();
  // True when shutdown was requested within `timeout`.
  bool WaitFor(std::chrono::milliseconds timeout);
  // The signal that triggered it (0 when requested in-process).
  int signal() const;

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool requested_ = false;
  int signal_ = 0;
  friend void SignalThread(ShutdownLatch*);
};

}  // namespace cleave
