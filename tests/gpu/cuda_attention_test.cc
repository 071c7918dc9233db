// The CUDA paged-attention ops (cuda_attention_ops.h) against the CPU reference: the same public
// calls (kernels::WriteKvCache / PagedAttentionPrefill / PagedAttentionDecode) on host tensors, on
// fresh random inputs (seed printed; CLEAVE_GPU_TEST_SEED=N repeats a run). Outputs are poisoned
// (NaN) before each device call, so an element the kernel forgot fails; block tables are shuffled,
// and every cache slot that holds no token is NaN, so a kernel that reads outside a sequence's KV
// poisons its output.
//
// bf16 caches: the CPU op takes f32 only, so it runs on the f32 values rounded to bf16 (the very
// values the device widens), and the tolerance stays the f32 one.
//
// Tolerance (attention): atol 1e-4 + rtol 1e-4. Both sides accumulate in f32 in different orders
// (and the CPU's vectorised exp is ~2 ulp off expf); outputs are convex combinations of N(0, 1)
// values, so the expected error is ~1e-6 even over 4096 keys, and 1e-4 leaves a wide margin while
// catching any masking or indexing bug (those are O(0.1)). WriteKvCache is a copy: exact.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cleave/kernels/attention.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/tensor.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"

namespace cleave::kernels {
namespace {

using namespace gputest;  // NOLINT: the shared test vocabulary

constexpr float kAtol = 1e-4f, kRtol = 1e-4f;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct SeqSpec {
  int cached;  // tokens already in the cache
  int q_len;   // new tokens of this pass
};

struct Case {
  std::string name;
  std::vector<SeqSpec> seqs;
  int hq, hk, dh, block_size;
  int window = 0;
  DType cache = DType::kF32;
  bool strided = false;  // q / out rows with a head pitch of Dh + 1 (unaligned, element-wise paths)
};

std::string Describe(const Case& c) {
  std::string s = c.name + " Hq/Hk=" + std::to_string(c.hq) + "/" + std::to_string(c.hk) + " Dh=" +
                  std::to_string(c.dh) + " bs=" + std::to_string(c.block_size) + " window=" +
                  std::to_string(c.window) + " cache=" + std::string(DTypeName(c.cache)) +
                  (c.strided ? " strided" : "") + " seqs(cached+new)=";
  for (const SeqSpec& q : c.seqs) s += std::to_string(q.cached) + "+" + std::to_string(q.q_len) + " ";
  return s;
}

// A batch on the host: metadata, q (head pitch `pitch`), and the paged caches as f32 (for a bf16
// case already rounded to bf16).
struct HostBatch {
  int t = 0, b = 0, num_blocks = 0, max_blocks = 0, pitch = 0;
  std::vector<int32_t> qsl, seq_lens, block_tables;
  std::vector<float> q, k_cache, v_cache;
};

float RoundBf16(float x) { return Bf16ToF32(F32ToBf16(x)); }

HostBatch MakeBatch(const Case& c, uint32_t salt) {
  HostBatch h;
  h.b = static_cast<int>(c.seqs.size());
  h.pitch = c.dh + (c.strided ? 1 : 0);
  h.qsl.push_back(0);
  int total_blocks = 0;
  for (const SeqSpec& s : c.seqs) {
    h.qsl.push_back(h.qsl.back() + s.q_len);
    h.seq_lens.push_back(s.cached + s.q_len);
    const int blocks = (s.cached + s.q_len + c.block_size - 1) / c.block_size;
    total_blocks += blocks;
    h.max_blocks = std::max(h.max_blocks, blocks + 1);  // + a -1 padding entry
  }
  h.t = h.qsl.back();
  h.num_blocks = total_blocks + 3;  // spare blocks stay NaN
  std::vector<int32_t> ids(h.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::mt19937 rng(Seed() ^ (salt * 0x85ebca6bu));
  std::shuffle(ids.begin(), ids.end(), rng);
  h.block_tables.assign(static_cast<size_t>(h.b) * h.max_blocks, -1);
  const size_t row = static_cast<size_t>(c.hk) * c.dh;
  const size_t cache_size = static_cast<size_t>(h.num_blocks) * c.block_size * row;
  h.k_cache.assign(cache_size, kNaN);
  h.v_cache.assign(cache_size, kNaN);
  const std::vector<float> kr = Random(cache_size, 1.0f, salt + 1), vr = Random(cache_size, 1.0f, salt + 2);
  int next = 0;
  for (int b = 0; b < h.b; ++b) {
    const int seq_len = h.seq_lens[b];
    for (int i = 0; i * c.block_size < seq_len; ++i) h.block_tables[b * h.max_blocks + i] = ids[next++];
    for (int p = 0; p < seq_len; ++p) {
      const size_t at = (static_cast<size_t>(h.block_tables[b * h.max_blocks + p / c.block_size]) * c.block_size +
                         p % c.block_size) * row;
      for (size_t e = 0; e < row; ++e) {
        h.k_cache[at + e] = c.cache == DType::kBF16 ? RoundBf16(kr[at + e]) : kr[at + e];
        h.v_cache[at + e] = c.cache == DType::kBF16 ? RoundBf16(vr[at + e]) : vr[at + e];
      }
    }
    // Blocks wholly before the window are never read: the ops must not even check their ids.
    if (c.window > 0) {
      const int first_visible = std::max(0, c.seqs[b].cached - c.window + 1);
      for (int i = 0; i < first_visible / c.block_size; ++i) h.block_tables[b * h.max_blocks + i] = -1;
    }
  }
  h.q = Random(static_cast<size_t>(h.t) * c.hq * h.pitch, 1.0f, salt + 3);
  return h;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = F32ToBf16(v[i]);
  return out;
}

// [T, Hq, Dh] views of a buffer with head pitch `pitch`.
Tensor Heads(void* data, const Case& c, const HostBatch& h, Device dev) {
  return Tensor(data, DType::kF32, {h.t, c.hq, h.pitch}, dev).Narrow(2, 0, c.dh);
}

// The logical [T, Hq, Dh] elements of a pitched buffer.
std::vector<float> Unpitch(const std::vector<float>& v, const Case& c, const HostBatch& h) {
  std::vector<float> out;
  for (int64_t r = 0; r < static_cast<int64_t>(h.t) * c.hq; ++r)
    out.insert(out.end(), v.begin() + r * h.pitch, v.begin() + r * h.pitch + c.dh);
  return out;
}

// Device copies of a batch.
struct DeviceBatch {
  std::unique_ptr<DeviceArray> q, k, v, qsl, seq_lens, tables, out;
  PagedAttentionArgs args;
};

std::unique_ptr<DeviceBatch> Upload(Backend& be, const Case& c, const HostBatch& h) {
  auto d = std::make_unique<DeviceBatch>();
  d->q = gputest::Upload(be, h.q);
  if (c.cache == DType::kBF16) {
    d->k = gputest::Upload(be, ToBf16(h.k_cache));
    d->v = gputest::Upload(be, ToBf16(h.v_cache));
  } else {
    d->k = gputest::Upload(be, h.k_cache);
    d->v = gputest::Upload(be, h.v_cache);
  }
  d->qsl = gputest::Upload(be, h.qsl);
  d->seq_lens = gputest::Upload(be, h.seq_lens);
  d->tables = gputest::Upload(be, h.block_tables);
  d->out = DeviceArray::Poisoned(be, h.q.size() * sizeof(float));
  PagedAttentionArgs& a = d->args;
  a.q = Heads(d->q->data(), c, h, Device::Cuda(0));
  const std::initializer_list<int64_t> cache_shape = {h.num_blocks, c.block_size, c.hk, c.dh};
  a.k_cache = d->k->View(c.cache, cache_shape);
  a.v_cache = d->v->View(c.cache, cache_shape);
  a.query_start_loc = d->qsl->View(DType::kI32, {h.b + 1});
  a.seq_lens = d->seq_lens->View(DType::kI32, {h.b});
  a.block_tables = d->tables->View(DType::kI32, {h.b, h.max_blocks});
  a.scale = 1.0f / std::sqrt(static_cast<float>(c.dh));
  a.sliding_window = c.window;
  a.out = Heads(d->out->data(), c, h, Device::Cuda(0));
  return d;
}

// The CPU reference on the host batch (f32 caches).
std::vector<float> RunCpu(const Case& c, HostBatch& h, bool decode) {
  std::vector<float> out(h.q.size(), 0.0f);
  PagedAttentionArgs a;
  a.q = Heads(h.q.data(), c, h, Device::Cpu());
  const std::initializer_list<int64_t> cache_shape = {h.num_blocks, c.block_size, c.hk, c.dh};
  a.k_cache = Tensor(h.k_cache.data(), DType::kF32, cache_shape);
  a.v_cache = Tensor(h.v_cache.data(), DType::kF32, cache_shape);
  a.query_start_loc = Tensor(h.qsl.data(), DType::kI32, {h.b + 1});
  a.seq_lens = Tensor(h.seq_lens.data(), DType::kI32, {h.b});
  a.block_tables = Tensor(h.block_tables.data(), DType::kI32, {h.b, h.max_blocks});
  a.scale = 1.0f / std::sqrt(static_cast<float>(c.dh));
  a.sliding_window = c.window;
  a.out = Heads(out.data(), c, h, Device::Cpu());
  const absl::Status st = decode ? PagedAttentionDecode(a) : PagedAttentionPrefill(a);
  EXPECT_TRUE(st.ok()) << st;
  return Unpitch(out, c, h);
}

void ExpectMatchesCpu(Backend& be, const Case& c, bool decode, uint32_t salt) {
  SCOPED_TRACE(Describe(c));
  HostBatch h = MakeBatch(c, salt);
  const std::vector<float> want = RunCpu(c, h, decode);
  auto d = Upload(be, c, h);
  const absl::Status st = decode ? PagedAttentionDecode(d->args) : PagedAttentionPrefill(d->args);
  ASSERT_TRUE(st.ok()) << st;
  ExpectClose(Unpitch(d->out->Download<float>(), c, h), want, kAtol, kRtol, c.name);
}

std::vector<SeqSpec> Decodes(std::initializer_list<int> contexts) {
  std::vector<SeqSpec> s;
  for (int n : contexts) s.push_back({n - 1, 1});
  return s;
}

// ---- Prefill ----------------------------------------------------------------------------------

TEST_F(CudaOps, PagedAttentionPrefillMatchesCpu) {
  const DType f32 = DType::kF32, bf16 = DType::kBF16;
  const std::vector<Case> cases = {
      {"one sequence, MHA", {{0, 100}}, 8, 8, 64, 16},
      {"chunked prefill, GQA 4", {{0, 37}, {60, 128}, {200, 5}}, 16, 4, 128, 16},
      {"GQA 8, bf16", {{300, 70}, {0, 33}}, 32, 4, 128, 32, 0, bf16},
      {"sliding window", {{0, 90}, {130, 40}}, 8, 2, 64, 16, 50},
      {"sliding window, bf16", {{0, 90}, {130, 40}, {17, 1}}, 8, 2, 64, 16, 50, bf16},
      {"head_dim 256", {{20, 40}, {0, 3}}, 4, 2, 256, 16},
      {"head_dim 80, group 3, strided", {{10, 45}, {0, 20}}, 6, 2, 80, 16, 0, f32, true},
      {"head_dim 36, bf16, strided", {{5, 30}}, 4, 4, 36, 32, 0, bf16, true},
      {"head_dim 30 (element-wise loads)", {{9, 25}, {0, 4}}, 4, 2, 30, 16},
      {"head_dim 30, bf16", {{9, 25}}, 4, 2, 30, 16, 0, bf16},
      {"empty sequences", {{0, 0}, {40, 20}, {7, 0}}, 8, 4, 64, 16},
      {"long prompt, GQA 4, bf16", {{0, 700}, {1000, 300}}, 8, 2, 128, 16, 0, bf16},
  };
  uint32_t salt = 100;
  for (const Case& c : cases) ExpectMatchesCpu(backend(), c, /*decode=*/false, salt++);
}

// ---- Decode -----------------------------------------------------------------------------------

TEST_F(CudaOps, PagedAttentionDecodeMatchesCpu) {
  const DType f32 = DType::kF32, bf16 = DType::kBF16;
  const std::vector<Case> cases = {
      {"uneven contexts, GQA 4", Decodes({1, 17, 300, 1000}), 16, 4, 128, 16},
      {"uneven contexts, GQA 4, bf16", Decodes({1, 17, 300, 1000}), 16, 4, 128, 16, 0, bf16},
      // A small batch with long contexts: many partitions per sequence (split-K + merge).
      {"split-K, bf16", Decodes({4096, 2500}), 32, 8, 128, 16, 0, bf16},
      {"split-K, f32", Decodes({4096, 700}), 32, 8, 128, 16},
      {"GQA 8, head_dim 64, window", Decodes({50, 400, 2000}), 16, 2, 64, 32, 100, bf16},
      {"MHA, head_dim 64", Decodes({33, 513, 1025}), 4, 4, 64, 16},
      {"GQA 16 (two query chunks)", Decodes({600, 5}), 16, 1, 128, 16},
      {"head_dim 256, GQA 2", Decodes({300, 1500}), 4, 2, 256, 16, 0, f32},
      {"head_dim 256, bf16", Decodes({300, 1500}), 4, 2, 256, 16, 0, bf16},
      {"head_dim 80, group 3, strided", Decodes({77, 900}), 6, 2, 80, 16, 0, f32, true},
      {"head_dim 80, bf16", Decodes({77, 900}), 6, 2, 80, 16, 0, bf16},
      {"head_dim 36, bf16 (element-wise path)", Decodes({77, 900}), 4, 2, 36, 16, 0, bf16},
      {"head_dim 36, f32, strided", Decodes({100, 2}), 4, 2, 36, 32, 0, f32, true},
      {"head_dim 30, f32 (element-wise path)", Decodes({100, 1200}), 4, 1, 30, 16},
  };
  uint32_t salt = 200;
  for (const Case& c : cases) ExpectMatchesCpu(backend(), c, /*decode=*/true, salt++);
}

// A decode batch shaped like serving: 64 sequences of uneven context.
TEST_F(CudaOps, PagedAttentionDecodeLargeBatchMatchesCpu) {
  std::mt19937 rng(Seed() ^ 0x5eedu);
  std::uniform_int_distribution<int> len(1, 1500);
  std::vector<SeqSpec> seqs;
  for (int b = 0; b < 64; ++b) seqs.push_back({len(rng) - 1, 1});
  ExpectMatchesCpu(backend(), {"batch 64", seqs, 32, 8, 128, 16, 0, DType::kBF16}, /*decode=*/true, 300);
  ExpectMatchesCpu(backend(), {"batch 64", seqs, 32, 8, 128, 16, 0, DType::kF32}, /*decode=*/true, 301);
}

// ---- Bad arguments ----------------------------------------------------------------------------

// Bad metadata is InvalidArgument with the CPU's message; a good call afterwards still works.
TEST_F(CudaOps, PagedAttentionRefusesBadMetadata) {
  const Case c{"bad", Decodes({40, 70}), 8, 2, 64, 16};
  for (bool decode : {false, true}) {
    SCOPED_TRACE(decode ? "decode" : "prefill");
    HostBatch h = MakeBatch(c, 400);
    const std::vector<float> want = RunCpu(c, h, decode);
    const auto expect_refused = [&](HostBatch bad) {
      std::vector<float> host_out(h.q.size());
      PagedAttentionArgs a;
      a.q = Heads(bad.q.data(), c, bad, Device::Cpu());
      a.k_cache = Tensor(bad.k_cache.data(), DType::kF32, {bad.num_blocks, c.block_size, c.hk, c.dh});
      a.v_cache = Tensor(bad.v_cache.data(), DType::kF32, {bad.num_blocks, c.block_size, c.hk, c.dh});
      a.query_start_loc = Tensor(bad.qsl.data(), DType::kI32, {bad.b + 1});
      a.seq_lens = Tensor(bad.seq_lens.data(), DType::kI32, {bad.b});
      a.block_tables = Tensor(bad.block_tables.data(), DType::kI32, {bad.b, bad.max_blocks});
      a.out = Heads(host_out.data(), c, bad, Device::Cpu());
      const absl::Status cpu = decode ? PagedAttentionDecode(a) : PagedAttentionPrefill(a);
      auto d = Upload(backend(), c, bad);
      const absl::Status gpu = decode ? PagedAttentionDecode(d->args) : PagedAttentionPrefill(d->args);
      EXPECT_EQ(gpu.code(), absl::StatusCode::kInvalidArgument) << gpu;
      EXPECT_EQ(gpu.message(), cpu.message());
    };
    HostBatch bad = h;
    bad.block_tables[1 * h.max_blocks + 2] = h.num_blocks;  // a block id past the cache
    expect_refused(bad);
    bad = h;
    bad.seq_lens[0] = h.max_blocks * c.block_size + 1;  // more KV than the table row holds
    expect_refused(bad);
    bad = h;
    bad.qsl = {0, 3, 2};  // decode: sequence 0 has 3 new tokens; prefill: the starts decrease
    expect_refused(bad);
    bad = h;
    bad.seq_lens[1] = 0;  // fewer KV positions than new tokens
    expect_refused(bad);

    auto d = Upload(backend(), c, h);
    const absl::Status st = decode ? PagedAttentionDecode(d->args) : PagedAttentionPrefill(d->args);
    ASSERT_TRUE(st.ok()) << st;
    ExpectClose(Unpitch(d->out->Download<float>(), c, h), want, kAtol, kRtol, "after the bad calls");
  }
}

TEST_F(CudaOps, PagedAttentionRefusesBadShapes) {
  const Case c{"shapes", Decodes({40, 70}), 8, 2, 64, 16};
  HostBatch h = MakeBatch(c, 500);
  auto d = Upload(backend(), c, h);
  PagedAttentionArgs a = d->args;
  a.k_cache = d->k->View(DType::kF16, {h.num_blocks, c.block_size, c.hk, c.dh});  // f16: not a cache dtype
  a.v_cache = a.k_cache;
  EXPECT_EQ(PagedAttentionDecode(a).code(), absl::StatusCode::kInvalidArgument);
  a = d->args;
  a.q = Tensor(h.q.data(), DType::kF32, {h.t, c.hq, c.dh});  // on the host
  EXPECT_EQ(PagedAttentionPrefill(a).code(), absl::StatusCode::kInvalidArgument);
  a = d->args;
  a.v_cache = d->v->View(DType::kBF16, {h.num_blocks, c.block_size, c.hk, c.dh});  // dtypes differ
  EXPECT_EQ(PagedAttentionDecode(a).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(PagedAttentionDecode(d->args).ok());
  ExpectClose(Unpitch(d->out->Download<float>(), c, h), RunCpu(c, h, true), kAtol, kRtol, "after bad shapes");
}

// ---- WriteKvCache -----------------------------------------------------------------------------

// A copy (bf16: rounded as F32ToBf16): bit-exact against the CPU op. Padding slots (-1) skip.
TEST_F(CudaOps, WriteKvCacheMatchesCpuAndRefusesBadSlots) {
  struct WriteCase {
    int t, hk, dh, num_blocks, block_size;
    DType cache;
    bool strided;  // k / v heads with a pitch of Dh + 1
  };
  const std::vector<WriteCase> cases = {
      {37, 4, 64, 8, 16, DType::kF32, false},  {37, 4, 64, 8, 16, DType::kBF16, false},
      {19, 2, 36, 4, 8, DType::kF32, true},    {19, 2, 36, 4, 8, DType::kBF16, true},
      {5, 8, 128, 3, 32, DType::kBF16, false},
  };
  uint32_t salt = 600;
  for (const WriteCase& w : cases) {
    SCOPED_TRACE(std::string(DTypeName(w.cache)) + " dh " + std::to_string(w.dh) + (w.strided ? " strided" : ""));
    const int pitch = w.dh + (w.strided ? 1 : 0);
    const int64_t num_slots = static_cast<int64_t>(w.num_blocks) * w.block_size;
    const size_t cache_size = static_cast<size_t>(num_slots) * w.hk * w.dh;
    std::vector<float> k = Random(static_cast<size_t>(w.t) * w.hk * pitch, 1.0f, salt);
    std::vector<float> v = Random(k.size(), 1.0f, salt + 1);
    std::vector<float> kc = Random(cache_size, 1.0f, salt + 2), vc = Random(cache_size, 1.0f, salt + 3);
    if (w.cache == DType::kBF16) {
      for (float& x : kc) x = RoundBf16(x);
      for (float& x : vc) x = RoundBf16(x);
    }
    std::vector<int32_t> slots(num_slots);
    std::iota(slots.begin(), slots.end(), 0);
    std::mt19937 rng(Seed() ^ salt);
    std::shuffle(slots.begin(), slots.end(), rng);
    slots.resize(w.t);
    slots[1] = -1;
    slots[w.t - 1] = -1;
    salt += 10;
    const auto view = [&](float* p, Device dev) {
      return Tensor(p, DType::kF32, {w.t, w.hk, pitch}, dev).Narrow(2, 0, w.dh);
    };
    const std::initializer_list<int64_t> cache_shape = {w.num_blocks, w.block_size, w.hk, w.dh};
    std::vector<float> want_k = kc, want_v = vc;
    Tensor hkc(want_k.data(), DType::kF32, cache_shape), hvc(want_v.data(), DType::kF32, cache_shape);
    ASSERT_TRUE(WriteKvCache(view(k.data(), Device::Cpu()), view(v.data(), Device::Cpu()),
                             Tensor(slots.data(), DType::kI32, {w.t}), hkc, hvc)
                    .ok());

    auto dk = gputest::Upload(backend(), k), dv = gputest::Upload(backend(), v);
    auto dkc = w.cache == DType::kBF16 ? gputest::Upload(backend(), ToBf16(kc)) : gputest::Upload(backend(), kc);
    auto dvc = w.cache == DType::kBF16 ? gputest::Upload(backend(), ToBf16(vc)) : gputest::Upload(backend(), vc);
    std::vector<int32_t> bad_slots = slots;
    bad_slots[2] = static_cast<int32_t>(num_slots);  // one past the cache
    auto dslots = gputest::Upload(backend(), slots), dbad = gputest::Upload(backend(), bad_slots);
    Tensor tkc = dkc->View(w.cache, cache_shape), tvc = dvc->View(w.cache, cache_shape);
    const Tensor tk = view(static_cast<float*>(dk->data()), Device::Cuda(0));
    const Tensor tv = view(static_cast<float*>(dv->data()), Device::Cuda(0));
    const absl::Status bad = WriteKvCache(tk, tv, dbad->View(DType::kI32, {w.t}), tkc, tvc);
    EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(WriteKvCache(tk, tv, dslots->View(DType::kI32, {w.t}), hkc, tvc).code(),
              absl::StatusCode::kInvalidArgument);  // a host cache with a device one
    // The good call rewrites every slot the bad one wrote, and the bad one wrote nothing else.
    const absl::Status st = WriteKvCache(tk, tv, dslots->View(DType::kI32, {w.t}), tkc, tvc);
    ASSERT_TRUE(st.ok()) << st;
    if (w.cache == DType::kBF16) {
      EXPECT_EQ(dkc->Download<uint16_t>(), ToBf16(want_k));
      EXPECT_EQ(dvc->Download<uint16_t>(), ToBf16(want_v));
    } else {
      ExpectClose(dkc->Download<float>(), want_k, 0.0f, 0.0f, "k_cache");
      ExpectClose(dvc->Download<float>(), want_v, 0.0f, 0.0f, "v_cache");
    }
  }
}

// WriteKvCache into a bf16 cache, then both attention ops read it back: the serving path.
TEST_F(CudaOps, WriteKvCacheThenAttendBf16) {
  Case c{"write then attend", {{30, 20}, {0, 45}}, 8, 2, 64, 16, 0, DType::kBF16};
  HostBatch h = MakeBatch(c, 700);
  // The new tokens' K/V: overwrite their slots through WriteKvCache on both sides.
  const int row = c.hk * c.dh;
  std::vector<float> k = Random(static_cast<size_t>(h.t) * row, 1.0f, 701), v = Random(k.size(), 1.0f, 702);
  for (float& x : k) x = RoundBf16(x);
  for (float& x : v) x = RoundBf16(x);
  std::vector<int32_t> slots;
  for (int b = 0; b < h.b; ++b) {
    for (int p = c.seqs[b].cached; p < h.seq_lens[b]; ++p) {
      slots.push_back(h.block_tables[b * h.max_blocks + p / c.block_size] * c.block_size + p % c.block_size);
    }
  }
  auto d = Upload(backend(), c, h);
  auto dk = gputest::Upload(backend(), k), dv = gputest::Upload(backend(), v), ds = gputest::Upload(backend(), slots);
  ASSERT_TRUE(WriteKvCache(dk->View(DType::kF32, {h.t, c.hk, c.dh}), dv->View(DType::kF32, {h.t, c.hk, c.dh}),
                           ds->View(DType::kI32, {h.t}), d->args.k_cache, d->args.v_cache)
                  .ok());
  const std::initializer_list<int64_t> cache_shape = {h.num_blocks, c.block_size, c.hk, c.dh};
  Tensor hkc(h.k_cache.data(), DType::kF32, cache_shape), hvc(h.v_cache.data(), DType::kF32, cache_shape);
  ASSERT_TRUE(WriteKvCache(Tensor(k.data(), DType::kF32, {h.t, c.hk, c.dh}),
                           Tensor(v.data(), DType::kF32, {h.t, c.hk, c.dh}),
                           Tensor(slots.data(), DType::kI32, {h.t}), hkc, hvc)
                  .ok());
  const std::vector<float> want = RunCpu(c, h, /*decode=*/false);
  ASSERT_TRUE(PagedAttentionPrefill(d->args).ok());
  ExpectClose(Unpitch(d->out->Download<float>(), c, h), want, kAtol, kRtol, "prefill after WriteKvCache");
}

}  // namespace
}  // namespace cleave::kernels
