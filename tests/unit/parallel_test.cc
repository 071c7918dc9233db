// The CPU kernels' worker pool: ParallelFor hands out every index exactly once for any thread
// count, chunk size and problem size, runs nested calls inline, serialises concurrent callers,
// and a kernel built on it gives the same answer whatever SetCpuThreads says.
#include "../../kernels/cpu/parallel.h"  // internal to the CPU backend; no public header

#include <gtest/gtest.h>

#include <atomic>
#include <cstdint>
#include <mutex>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "cleave/kernels/gemm.h"
#include "unit/kernel_test_util.h"

namespace cleave::kernels {
namespace {

// Restores the default pool size however a test exits.
class ParallelForTest : public ::testing::Test {
 protected:
  void TearDown() override { SetCpuThreads(0); }
};

// Runs ParallelFor(n, min_chunk) and checks the ranges: each index visited once, ranges
// non-empty, and no more ranges than threads or than n / min_chunk allows.
void ExpectExactCover(int64_t n, int64_t min_chunk, int threads) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> ranges;
  cpu::ParallelFor(n, min_chunk, [&](int64_t begin, int64_t end) {
    {
      std::lock_guard<std::mutex> lock(mu);
      ranges.emplace_back(begin, end);
    }
    for (int64_t i = begin; i < end; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
  });
  for (int64_t i = 0; i < n; ++i) {
    ASSERT_EQ(hits[static_cast<size_t>(i)].load(), 1)
        << "index " << i << " of n=" << n << " min_chunk=" << min_chunk << " threads=" << threads;
  }
  if (n == 0) {
    EXPECT_TRUE(ranges.empty());
    return;
  }
  const int64_t max_parts = std::max<int64_t>(1, n / std::max<int64_t>(1, min_chunk));
  EXPECT_LE(static_cast<int64_t>(ranges.size()), std::min<int64_t>(threads, max_parts))
      << "n=" << n << " min_chunk=" << min_chunk;
  for (const auto& [b, e] : ranges) EXPECT_LT(b, e);
}

TEST_F(ParallelForTest, CoversEveryIndexOnceForSeveralThreadCounts) {
  for (int threads : {1, 2, 4, 3}) {
    SetCpuThreads(threads);
    ASSERT_EQ(CpuThreads(), threads);
    for (int64_t n : {0, 1, 2, 7, 63, 129, 1000, 100003}) {
      for (int64_t min_chunk : {0, 1, 7, 64, 1 << 20}) ExpectExactCover(n, min_chunk, threads);
    }
  }
}

TEST_F(ParallelForTest, RepeatedResizesKeepWorking) {
  // Resizing after the pool has already run work: new workers must not replay an old job.
  for (int round = 0; round < 20; ++round) {
    const int threads = 1 + round % 4;
    SetCpuThreads(threads);
    ExpectExactCover(1000, 1, threads);
  }
}

TEST_F(ParallelForTest, NestedCallsRunInline) {
  SetCpuThreads(4);
  std::vector<std::atomic<int>> hits(64 * 64);
  cpu::ParallelFor(64, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      cpu::ParallelFor(64, 1, [&](int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) hits[static_cast<size_t>(i * 64 + j)].fetch_add(1);
      });
    }
  });
  for (auto& h : hits) ASSERT_EQ(h.load(), 1);
}

TEST_F(ParallelForTest, ConcurrentCallersAreSerialisedSafely) {
  SetCpuThreads(4);
  constexpr int kCallers = 4;
  constexpr int64_t kN = 5000;
  std::vector<std::vector<std::atomic<int>>> hits(kCallers);
  for (auto& h : hits) h = std::vector<std::atomic<int>>(kN);
  std::vector<std::thread> callers;
  for (int c = 0; c < kCallers; ++c) {
    callers.emplace_back([&, c] {
      for (int rep = 0; rep < 50; ++rep) {
        cpu::ParallelFor(kN, 16, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) hits[c][static_cast<size_t>(i)].fetch_add(1);
        });
      }
    });
  }
  for (auto& t : callers) t.join();
  for (auto& h : hits)
    for (auto& x : h) ASSERT_EQ(x.load(), 50);
}

TEST_F(ParallelForTest, LinearIsIndependentOfThreadCount) {
  // The 16-bit GEMV path gives each output to one thread with a fixed summation order, so the
  // result is bitwise identical for every pool size.
  const int64_t m = 2, n = 259, k = 515;
  std::mt19937 rng(testing_util::kSeed);
  std::vector<uint16_t> w =
      testing_util::ToBf16(testing_util::RandomFloats(static_cast<size_t>(n * k), rng));
  std::vector<float> x = testing_util::RandomFloats(static_cast<size_t>(m * k), rng);
  Tensor xt(x.data(), DType::kF32, {m, k}), wt(w.data(), DType::kBF16, {n, k});
  std::vector<float> first;
  for (int threads : {1, 2, 4}) {
    SetCpuThreads(threads);
    std::vector<float> y(static_cast<size_t>(m * n));
    Tensor yt(y.data(), DType::kF32, {m, n});
    ASSERT_TRUE(Linear(xt, wt, nullptr, yt).ok());
    if (first.empty()) {
      first = y;
    } else {
      EXPECT_EQ(y, first) << "threads=" << threads;
    }
  }
}

}  // namespace
}  // namespace cleave::kernels
