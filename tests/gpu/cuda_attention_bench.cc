// Throughput of the CUDA paged-attention ops, as ratios against a baseline measured in the same run
// on the same device. Decode is memory-bound: bytes it must move (every K and V row of every
// context once, plus q and out) / time, over a device-to-device copy's bandwidth (read + write
// counted). Target (issue): decode at batch 64, context 4096, 32 q / 8 KV heads, head_dim 128,
// block 16, bf16 cache >= 0.80 of the copy. Each call includes the op's validation round trip (one
// stream synchronisation). Prefill is reported in TFLOP/s of causal attention: 4 * Dh * Hq flops per
// visible (query, key) pair (QK^T and PV, 2 each). Prints a markdown table. Run by tests/gpu/run.sh;
// needs a CUDA device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cleave/kernels/attention.h"
#include "cleave/kernels/tensor.h"
#include "gpu_bench_util.h"

namespace cleave::kernels {
namespace {

using namespace gpubench;  // NOLINT: the shared benchmark vocabulary

template <typename T>
void* Upload(const std::vector<T>& v) {
  void* p = DeviceAlloc(v.size() * sizeof(T));
  CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return p;
}

// A batch of B sequences of `context` KV positions each, `q_len` of them new, in a paged cache whose
// blocks are handed out in shuffled order (as a long-running server's are). Caches are zeros.
struct Batch {
  int64_t b, q_len, context, hq, hk, dh, block_size, max_blocks, num_blocks;
  DType cache;
  void *q, *out, *k, *v, *qsl, *seq_lens, *tables;
  PagedAttentionArgs args;

  Batch(int64_t b_, int64_t q_len_, int64_t context_, int64_t hq_, int64_t hk_, int64_t dh_, int64_t bs, DType dt)
      : b(b_), q_len(q_len_), context(context_), hq(hq_), hk(hk_), dh(dh_), block_size(bs), cache(dt) {
    max_blocks = (context + bs - 1) / bs;
    num_blocks = b * max_blocks;
    const int64_t t = b * q_len;
    const size_t esize = dt == DType::kBF16 ? 2 : 4;
    const size_t cache_bytes = static_cast<size_t>(num_blocks * bs * hk * dh) * esize;
    q = DeviceAlloc(t * hq * dh * 4);
    out = DeviceAlloc(t * hq * dh * 4);
    k = DeviceAlloc(cache_bytes);
    v = DeviceAlloc(cache_bytes);
    std::vector<int32_t> ids(num_blocks), qsl_h(b + 1), lens(b, static_cast<int32_t>(context));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(7));
    for (int64_t i = 0; i <= b; ++i) qsl_h[i] = static_cast<int32_t>(i * q_len);
    qsl = Upload(qsl_h);
    seq_lens = Upload(lens);
    tables = Upload(ids);
    args.q = Dev(q, DType::kF32, {t, hq, dh});
    args.out = Dev(out, DType::kF32, {t, hq, dh});
    args.k_cache = Dev(k, dt, {num_blocks, bs, hk, dh});
    args.v_cache = Dev(v, dt, {num_blocks, bs, hk, dh});
    args.query_start_loc = Dev(qsl, DType::kI32, {b + 1});
    args.seq_lens = Dev(seq_lens, DType::kI32, {b});
    args.block_tables = Dev(tables, DType::kI32, {b, max_blocks});
    args.scale = 0.088f;
  }
  Batch(const Batch&) = delete;
  Batch& operator=(const Batch&) = delete;
  ~Batch() {
    for (void* p : {q, out, k, v, qsl, seq_lens, tables}) cudaFree(p);
  }
  std::string Shape() const {
    char s[200];
    std::snprintf(s, sizeof(s), "B %ld x %ld new / %ld ctx, Hq %ld, Hk %ld, Dh %ld, block %ld, %s cache",
                  static_cast<long>(b), static_cast<long>(q_len), static_cast<long>(context), static_cast<long>(hq),
                  static_cast<long>(hk), static_cast<long>(dh), static_cast<long>(block_size),
                  std::string(DTypeName(cache)).c_str());
    return s;
  }
};

int Main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "cuda_attention_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n\n", prop.name);

  const size_t copy_bytes = size_t{1} << 30;  // 1 GiB copied: 2 GiB moved
  const double copy_bw = CopyBandwidth(copy_bytes);
  std::printf("| kernel | shape | time (us) | achieved | ratio | baseline |\n|---|---|---|---|---|---|\n");
  std::printf("| D2D copy | 1 GiB | %.1f | %.0f GB/s | 1.00 | itself |\n", 2.0 * copy_bytes / copy_bw * 1e6,
              copy_bw / 1e9);

  for (DType dt : {DType::kBF16, DType::kF32}) {  // decode: the shape
    Batch batch(64, 1, 4096, 32, 8, 128, 16, dt);
    const double esize = dt == DType::kBF16 ? 2.0 : 4.0;
    const double bytes = 2.0 * batch.b * batch.context * batch.hk * batch.dh * esize +  // K + V
                         2.0 * batch.b * batch.hq * batch.dh * 4.0;                       // q + out
    const double s = Time([&] { Must(PagedAttentionDecode(batch.args), "PagedAttentionDecode"); });
    std::printf("| PagedAttentionDecode | %s | %.1f | %.0f GB/s | %.2f | D2D copy bandwidth%s |\n", batch.Shape().c_str(),
                s * 1e6, bytes / s / 1e9, bytes / s / copy_bw, dt == DType::kBF16 ? " (target >= 0.80)" : "");
  }
  for (DType dt : {DType::kBF16, DType::kF32}) {  // prefill: 8 prompts of 1024 tokens, no cached prefix
    Batch batch(8, 1024, 1024, 32, 8, 128, 16, dt);
    const double pairs = static_cast<double>(batch.b) * batch.q_len * (batch.q_len + 1) / 2;  // causal
    const double flops = 4.0 * batch.dh * batch.hq * pairs;
    const double s = Time([&] { Must(PagedAttentionPrefill(batch.args), "PagedAttentionPrefill"); }, 10);
    std::printf("| PagedAttentionPrefill (f32 CUDA cores) | %s | %.1f | %.1f TFLOP/s | - | none (causal flops) |\n",
                batch.Shape().c_str(), s * 1e6, flops / s / 1e12);
  }
  {  // WriteKvCache: a prefill's worth of new tokens into a bf16 cache.
    const int64_t t = 8192, hk = 8, dh = 128, bs = 16, num_blocks = t / bs;
    void* k = DeviceAlloc(t * hk * dh * 4);
    void* v = DeviceAlloc(t * hk * dh * 4);
    void* kc = DeviceAlloc(num_blocks * bs * hk * dh * 2);
    void* vc = DeviceAlloc(num_blocks * bs * hk * dh * 2);
    std::vector<int32_t> slots(t);
    std::iota(slots.begin(), slots.end(), 0);
    void* sl = Upload(slots);
    Tensor tk = Dev(k, DType::kF32, {t, hk, dh}), tv = Dev(v, DType::kF32, {t, hk, dh});
    Tensor tkc = Dev(kc, DType::kBF16, {num_blocks, bs, hk, dh}), tvc = Dev(vc, DType::kBF16, {num_blocks, bs, hk, dh});
    Tensor ts = Dev(sl, DType::kI32, {t});
    const double bytes = 2.0 * t * hk * dh * (4.0 + 2.0) + t * 4.0;
    const double s = Time([&] { Must(WriteKvCache(tk, tv, ts, tkc, tvc), "WriteKvCache"); });
    std::printf("| WriteKvCache | T %ld, Hk %ld, Dh %ld, f32 -> bf16 cache | %.1f | %.0f GB/s | %.2f | D2D copy "
                "bandwidth |\n",
                static_cast<long>(t), static_cast<long>(hk), static_cast<long>(dh), s * 1e6, bytes / s / 1e9,
                bytes / s / copy_bw);
    for (void* p : {k, v, kc, vc, sl}) cudaFree(p);
  }
  return 0;
}

}  // namespace
}  // namespace cleave::kernels

int main() { return cleave::kernels::Main(); }
