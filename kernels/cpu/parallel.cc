#include "parallel.h"

#include <cblas.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "cleave/kernels/gemm.h"

namespace cleave::kernels {
namespace cpu {
namespace {

thread_local bool t_in_worker = false;

class Pool {
 public:
  explicit Pool(int threads) { Resize(threads); }
  ~Pool() { Stop(); }

  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Safe against concurrent Run(): takes the same lock. New workers start from the current
  // generation so they never replay a finished job.
  void Resize(int threads) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    Stop();
    stop_ = false;
    const uint64_t generation = generation_;
    for (int i = 0; i + 1 < threads; ++i) {
      workers_.emplace_back([this, i, generation] { Loop(i, generation); });
    }
  }

  void Run(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    const int64_t max_parts = std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk));
    const int parts = static_cast<int>(std::min<int64_t>(threads(), max_parts));
    if (parts <= 1) {
      fn(0, n);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      parts_ = parts;
      pending_ = parts - 1;
      ++generation_;
    }
    cv_.notify_all();
    // The caller's own share counts as pool work, so a ParallelFor nested inside it runs inline
    // instead of waiting on run_mu_, which this thread holds.
    const bool was_worker = t_in_worker;
    t_in_worker = true;
    RunPart(0);
    t_in_worker = was_worker;
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [this] { return pending_ == 0; });
    fn_ = nullptr;
  }

 private:
  void RunPart(int part) {
    const int64_t begin = n_ * part / parts_;
    const int64_t end = n_ * (part + 1) / parts_;
    if (begin < end) (*fn_)(begin, end);
  }

  void Loop(int index, uint64_t seen) {
    t_in_worker = true;
    for (;;) {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      const int part = index + 1;
      if (part >= parts_) continue;
      lock.unlock();
      RunPart(part);
      lock.lock();
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  int parts_ = 0;
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

int DefaultThreads() { return std::max(1u, std::thread::hardware_concurrency()); }

Pool& GlobalPool() {
  static Pool* pool = new Pool(DefaultThreads());
  return *pool;
}

}  // namespace

void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (t_in_worker) {
    fn(0, n);
    return;
  }
  GlobalPool().Run(n, min_chunk, fn);
}

int PoolThreads() { return GlobalPool().threads(); }

}  // namespace cpu

void SetCpuThreads(int n) {
  const int threads = n <= 0 ? cpu::DefaultThreads() : n;
  cpu::GlobalPool().Resize(threads);
  openblas_set_num_threads(threads);
}

int CpuThreads() { return cpu::PoolThreads(); }

}  // namespace cleave::kernels
