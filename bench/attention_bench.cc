// Paged attention on the CPU backend, Llama-3-8B-like heads (Hq = 32, Hk = 8, Dh = 128), block 16.
//
// bytes_per_second counts the K and V bytes a pass must read at least once (each sequence's KV
// for every KV head): decode is bound by it, so it is the number to compare with the machine's
// memory bandwidth; prefill also reports flops. Block tables are shuffled, as they are in a
// long-running server.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "cleave/kernels/attention.h"

namespace cleave::kernels {
namespace {

constexpr int kHq = 32, kHk = 8, kDh = 128, kBlock = 16;

// B sequences of `ctx` tokens each, `q_len` of them new in this pass.
struct Batch {
  Batch(int b, int ctx, int q_len) : num_seqs(b) {
    const int blocks_per_seq = (ctx + kBlock - 1) / kBlock;
    num_blocks = b * blocks_per_seq;
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
    k_cache.resize(static_cast<size_t>(num_blocks) * kBlock * kHk * kDh);
    v_cache.resize(k_cache.size());
    for (float& x : k_cache) x = unit(rng);
    for (float& x : v_cache) x = unit(rng);
    std::vector<int32_t> ids(num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    block_tables = ids;  // row b = the next blocks_per_seq shuffled ids
    max_blocks = blocks_per_seq;
    qsl.push_back(0);
    for (int i = 0; i < b; ++i) {
      qsl.push_back(qsl.back() + q_len);
      seq_lens.push_back(ctx);
    }
    num_tokens = qsl.back();
    q.resize(static_cast<size_t>(num_tokens) * kHq * kDh);
    for (float& x : q) x = unit(rng);
    out.resize(q.size());
    kv_bytes = static_cast<int64_t>(b) * ctx * kHk * kDh * sizeof(float) * 2;
  }

  PagedAttentionArgs Args() {
    PagedAttentionArgs a;
    a.q = Tensor(q.data(), DType::kF32, {num_tokens, kHq, kDh});
    a.k_cache = Tensor(k_cache.data(), DType::kF32, {num_blocks, kBlock, kHk, kDh});
    a.v_cache = Tensor(v_cache.data(), DType::kF32, {num_blocks, kBlock, kHk, kDh});
    a.query_start_loc = Tensor(qsl.data(), DType::kI32, {num_seqs + 1});
    a.seq_lens = Tensor(seq_lens.data(), DType::kI32, {num_seqs});
    a.block_tables = Tensor(block_tables.data(), DType::kI32, {num_seqs, max_blocks});
    a.scale = 1.0f / std::sqrt(static_cast<float>(kDh));
    a.out = Tensor(out.data(), DType::kF32, {num_tokens, kHq, kDh});
    return a;
  }

  int num_seqs, num_tokens = 0, num_blocks = 0, max_blocks = 0;
  int64_t kv_bytes = 0;
  std::vector<float> q, out, k_cache, v_cache;
  std::vector<int32_t> qsl, seq_lens, block_tables;
};

void BM_PagedAttentionDecode(benchmark::State& state) {
  Batch batch(static_cast<int>(state.range(0)), static_cast<int>(state.range(1)), 1);
  const PagedAttentionArgs args = batch.Args();
  for (auto _ : state) {
    const absl::Status st = PagedAttentionDecode(args);
    if (!st.ok()) {
      state.SkipWithError(std::string(st.message()).c_str());
      break;
    }
    benchmark::DoNotOptimize(batch.out.data());
  }
  state.SetBytesProcessed(state.iterations() * batch.kv_bytes);
  state.SetItemsProcessed(state.iterations() * batch.num_tokens);  // tokens decoded
}
BENCHMARK(BM_PagedAttentionDecode)
    ->ArgNames({"batch", "context"})
    ->Args({1, 512})
    ->Args({1, 4096})
    ->Args({16, 512})
    ->Args({16, 4096})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void BM_PagedAttentionPrefill(benchmark::State& state) {
  const int tokens = static_cast<int>(state.range(0));
  Batch batch(1, tokens, tokens);
  const PagedAttentionArgs args = batch.Args();
  for (auto _ : state) {
    const absl::Status st = PagedAttentionPrefill(args);
    if (!st.ok()) {
      state.SkipWithError(std::string(st.message()).c_str());
      break;
    }
    benchmark::DoNotOptimize(batch.out.data());
  }
  state.SetBytesProcessed(state.iterations() * batch.kv_bytes);
  state.SetItemsProcessed(state.iterations() * batch.num_tokens);  // prompt tokens
  // Prefill is bound by arithmetic, not by KV bytes: 2 * Dh multiply-adds (q.k and p*v) per query
  // head per causal (query, key) pair.
  const double pairs = 0.5 * tokens * (tokens + 1.0);
  state.counters["flops"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * pairs * kHq * kDh * 4.0,
                         benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PagedAttentionPrefill)
    ->ArgName("tokens")
    ->Arg(512)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace cleave::kernels

BENCHMARK_MAIN();
