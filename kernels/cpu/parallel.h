// Internal to the CPU backend: a persistent worker pool for the kernels' own loops (OpenBLAS
// keeps its own pool for GEMM). Sized by SetCpuThreads(); ParallelFor from inside a worker runs
// inline, so nested calls cannot deadlock.
#pragma once

#include <cstdint>
#include <functional>

namespace cleave::kernels::cpu {

// Splits [0, n) into contiguous ranges of at least `min_chunk` items and runs fn(begin, end) on
// the pool, the caller's thread taking one share; returns when every range is done.
// Thread-safe: concurrent callers are serialised on the pool.
void ParallelFor(int64_t n, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& fn);

int PoolThreads();

}  // namespace cleave::kernels::cpu
