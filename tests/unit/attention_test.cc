// Paged attention (attention.h) on the CPU backend against a plain-loop reference.
//
// Every batch lives in a paged cache whose block tables are shuffled (a sequence's blocks are
// neither contiguous nor in order), and every slot that holds no token — the tail of a sequence's
// last block, spare blocks — is NaN, so a kernel that reads outside a sequence's KV poisons its
// output. The reference materialises each query's whole score row in double and takes an
// ordinary softmax.
#include "cleave/kernels/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {
namespace {

constexpr uint32_t kSeed = 20240611;
constexpr double kAtol = 1e-5;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

struct SeqSpec {
  int cached;  // tokens already in the cache
  int q_len;   // new tokens in this pass
};

struct Case {
  std::string name;
  std::vector<SeqSpec> seqs;
  int hq, hk, dh, block_size;
  int window = 0;
};

std::string Describe(const Case& c) {
  std::string s = c.name + " Hq/Hk=" + std::to_string(c.hq) + "/" + std::to_string(c.hk) +
                  " Dh=" + std::to_string(c.dh) + " bs=" + std::to_string(c.block_size) +
                  " window=" + std::to_string(c.window) + " seqs(cached+new)=";
  for (const SeqSpec& q : c.seqs)
    s += std::to_string(q.cached) + "+" + std::to_string(q.q_len) + " ";
  return s;
}

// One batch and the paged cache it reads, with the new tokens' K/V written by WriteKvCache.
struct PagedBatch {
  Case c;
  int num_tokens = 0, num_seqs = 0, num_blocks = 0, max_blocks = 0;
  std::vector<float> q, out, k_cache, v_cache, k_new, v_new;
  std::vector<int32_t> qsl, seq_lens, block_tables, slot_mapping;

  int64_t Slot(int b, int pos) const {
    return static_cast<int64_t>(block_tables[b * max_blocks + pos / c.block_size]) * c.block_size +
           pos % c.block_size;
  }
  Tensor KCache() {
    return Tensor(k_cache.data(), DType::kF32, {num_blocks, c.block_size, c.hk, c.dh});
  }
  Tensor VCache() {
    return Tensor(v_cache.data(), DType::kF32, {num_blocks, c.block_size, c.hk, c.dh});
  }
  PagedAttentionArgs Args() {
    PagedAttentionArgs a;
    a.q = Tensor(q.data(), DType::kF32, {num_tokens, c.hq, c.dh});
    a.k_cache = KCache();
    a.v_cache = VCache();
    a.query_start_loc = Tensor(qsl.data(), DType::kI32, {num_seqs + 1});
    a.seq_lens = Tensor(seq_lens.data(), DType::kI32, {num_seqs});
    a.block_tables = Tensor(block_tables.data(), DType::kI32, {num_seqs, max_blocks});
    a.scale = 1.0f / std::sqrt(static_cast<float>(c.dh));
    a.sliding_window = c.window;
    a.out = Tensor(out.data(), DType::kF32, {num_tokens, c.hq, c.dh});
    return a;
  }
};

void FillUniform(std::vector<float>& v, float lo, float hi, std::mt19937& rng) {
  std::uniform_real_distribution<float> dist(lo, hi);
  for (float& x : v) x = dist(rng);
}

// Builds the batch, fills the cached prefixes directly and writes the new tokens through
// WriteKvCache (so the reference, which reads the cache, checks that kernel too).
PagedBatch MakeBatch(const Case& c, std::mt19937& rng) {
  PagedBatch pb;
  pb.c = c;
  pb.num_seqs = static_cast<int>(c.seqs.size());
  int total_blocks = 0;
  pb.qsl.push_back(0);
  for (const SeqSpec& s : c.seqs) {
    const int seq_len = s.cached + s.q_len;
    const int blocks = (seq_len + c.block_size - 1) / c.block_size;
    total_blocks += blocks;
    pb.max_blocks = std::max(pb.max_blocks, blocks);
    pb.seq_lens.push_back(seq_len);
    pb.qsl.push_back(pb.qsl.back() + s.q_len);
  }
  pb.num_tokens = pb.qsl.back();
  pb.max_blocks += 1;                // a column of -1 padding that must never be followed
  pb.num_blocks = total_blocks + 3;  // spare blocks, left NaN
  std::vector<int32_t> ids(pb.num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  pb.block_tables.assign(static_cast<size_t>(pb.num_seqs) * pb.max_blocks, -1);
  int next_id = 0;
  for (int b = 0; b < pb.num_seqs; ++b) {
    const int blocks = (pb.seq_lens[b] + c.block_size - 1) / c.block_size;
    for (int i = 0; i < blocks; ++i) pb.block_tables[b * pb.max_blocks + i] = ids[next_id++];
  }

  const size_t row = static_cast<size_t>(c.hk) * c.dh;
  pb.k_cache.assign(static_cast<size_t>(pb.num_blocks) * c.block_size * row, kNaN);
  pb.v_cache = pb.k_cache;
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (int b = 0; b < pb.num_seqs; ++b) {
    for (int p = 0; p < c.seqs[b].cached; ++p) {
      const size_t base = static_cast<size_t>(pb.Slot(b, p)) * row;
      for (size_t i = 0; i < row; ++i) {
        pb.k_cache[base + i] = unit(rng);
        pb.v_cache[base + i] = unit(rng);
      }
    }
  }
  pb.k_new.resize(static_cast<size_t>(pb.num_tokens) * row);
  pb.v_new.resize(pb.k_new.size());
  FillUniform(pb.k_new, -1.0f, 1.0f, rng);
  FillUniform(pb.v_new, -1.0f, 1.0f, rng);
  for (int b = 0; b < pb.num_seqs; ++b) {
    for (int i = 0; i < c.seqs[b].q_len; ++i) {
      pb.slot_mapping.push_back(static_cast<int32_t>(pb.Slot(b, c.seqs[b].cached + i)));
    }
  }
  // Sharper than unit scores, so the softmax is far from uniform.
  pb.q.resize(static_cast<size_t>(pb.num_tokens) * c.hq * c.dh);
  FillUniform(pb.q, -2.0f, 2.0f, rng);
  pb.out.assign(pb.q.size(), kNaN);

  Tensor k(pb.k_new.data(), DType::kF32, {pb.num_tokens, c.hk, c.dh});
  Tensor v(pb.v_new.data(), DType::kF32, {pb.num_tokens, c.hk, c.dh});
  Tensor slots(pb.slot_mapping.data(), DType::kI32, {pb.num_tokens});
  Tensor kc = pb.KCache(), vc = pb.VCache();
  const absl::Status st = WriteKvCache(k, v, slots, kc, vc);
  EXPECT_TRUE(st.ok()) << st;
  return pb;
}

// out[t, h, :] of the whole batch, from the paged cache, in double.
std::vector<float> Reference(const PagedBatch& pb) {
  const Case& c = pb.c;
  const int group = c.hq / c.hk;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dh));
  std::vector<float> out(pb.q.size());
  for (int b = 0; b < pb.num_seqs; ++b) {
    for (int i = 0; i < c.seqs[b].q_len; ++i) {
      const int t = pb.qsl[b] + i, pos = c.seqs[b].cached + i;
      const int lo = c.window > 0 ? std::max(0, pos - c.window + 1) : 0;
      for (int h = 0; h < c.hq; ++h) {
        const int kvh = h / group;
        const float* qv = pb.q.data() + (static_cast<size_t>(t) * c.hq + h) * c.dh;
        std::vector<double> scores;
        for (int p = lo; p <= pos; ++p) {
          const float* kv = pb.k_cache.data() + (pb.Slot(b, p) * c.hk + kvh) * c.dh;
          double s = 0.0;
          for (int d = 0; d < c.dh; ++d) s += static_cast<double>(qv[d]) * kv[d];
          scores.push_back(s * scale);
        }
        const double mx = *std::max_element(scores.begin(), scores.end());
        double sum = 0.0;
        for (double& s : scores) sum += (s = std::exp(s - mx));
        std::vector<double> acc(c.dh, 0.0);
        for (int p = lo; p <= pos; ++p) {
          const float* vv = pb.v_cache.data() + (pb.Slot(b, p) * c.hk + kvh) * c.dh;
          for (int d = 0; d < c.dh; ++d) acc[d] += scores[p - lo] * vv[d];
        }
        float* o = out.data() + (static_cast<size_t>(t) * c.hq + h) * c.dh;
        for (int d = 0; d < c.dh; ++d) o[d] = static_cast<float>(acc[d] / sum);
      }
    }
  }
  return out;
}

// NaN-aware: a NaN anywhere counts as an infinite error.
double MaxAbsErr(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double e = std::fabs(static_cast<double>(a[i]) - b[i]);
    err = std::isnan(e) ? std::numeric_limits<double>::infinity() : std::max(err, e);
  }
  return err;
}

void Report(const std::string& what, const Case& c, double err) {
  std::printf("[attention] seed=%u %s %s max_abs_err=%.3g\n", kSeed, what.c_str(),
              Describe(c).c_str(), err);
}

// Decode-shaped batches: one new token per sequence.
Case DecodeCase(std::string name, std::vector<int> cached, int hq, int hk, int dh, int bs,
                int window = 0) {
  Case c{std::move(name), {}, hq, hk, dh, bs, window};
  for (int n : cached) c.seqs.push_back({n, 1});
  return c;
}

TEST(PagedAttention, PrefillMatchesReference) {
  const std::vector<Case> cases = {
      {"prefill", {{0, 5}, {0, 17}, {0, 1}}, 8, 2, 64, 16},
      {"chunked", {{20, 7}, {50, 33}, {0, 16}}, 4, 1, 128, 16},
      {"block1", {{5, 3}, {0, 10}, {9, 1}}, 1, 1, 8, 1},
      {"block32", {{100, 70}}, 8, 8, 128, 32},
      {"several_tiles", {{3, 150}, {0, 65}}, 1, 1, 64, 16},
      {"no_new_tokens_in_one_seq", {{10, 0}, {31, 40}}, 8, 2, 64, 16},
      {"head_dim_tail", {{13, 9}}, 4, 2, 12, 16},
      {"window_chunked", {{60, 40}, {0, 50}}, 8, 2, 64, 16, 13},
      {"window_block1", {{7, 20}}, 4, 1, 8, 1, 5},
      {"window_wider_than_seq", {{10, 10}}, 8, 8, 64, 32, 100},
  };
  std::mt19937 rng(kSeed);
  for (const Case& c : cases) {
    SCOPED_TRACE(Describe(c));
    PagedBatch pb = MakeBatch(c, rng);
    const absl::Status st = PagedAttentionPrefill(pb.Args());
    ASSERT_TRUE(st.ok()) << st;
    const double err = MaxAbsErr(pb.out, Reference(pb));
    Report("prefill", c, err);
    EXPECT_LT(err, kAtol);
  }
}

// Decode against the reference, and against prefill on the same q_len = 1 batch, which must agree
// bitwise (batch invariance). The long contexts (> 256 positions) are split into partitions
// whose states are merged.
TEST(PagedAttention, DecodeMatchesReferenceAndPrefill) {
  const std::vector<Case> cases = {
      DecodeCase("decode", {0, 16, 99, 2999}, 8, 2, 64, 16),
      DecodeCase("decode_mqa_long", {2999, 700}, 4, 1, 128, 32),
      DecodeCase("decode_block1_split", {300, 4}, 1, 1, 8, 1),
      DecodeCase("decode_partition_edges", {255, 256, 511, 512}, 8, 8, 128, 16),
      DecodeCase("decode_window", {2999, 100, 1000}, 8, 2, 64, 16, 1000),
      DecodeCase("decode_small_window", {40}, 4, 1, 8, 1, 3),
  };
  std::mt19937 rng(kSeed + 1);
  for (const Case& c : cases) {
    SCOPED_TRACE(Describe(c));
    PagedBatch pb = MakeBatch(c, rng);
    absl::Status st = PagedAttentionDecode(pb.Args());
    ASSERT_TRUE(st.ok()) << st;
    const std::vector<float> decoded = pb.out;
    const double err = MaxAbsErr(decoded, Reference(pb));
    Report("decode", c, err);
    EXPECT_LT(err, kAtol);

    std::fill(pb.out.begin(), pb.out.end(), kNaN);
    st = PagedAttentionPrefill(pb.Args());
    ASSERT_TRUE(st.ok()) << st;
    const double diff = MaxAbsErr(decoded, pb.out);
    Report("decode_vs_prefill", c, diff);
    EXPECT_EQ(std::memcmp(decoded.data(), pb.out.data(), decoded.size() * sizeof(float)), 0)
        << "decode and prefill differ, max abs " << diff;
  }
}

// Rows [t0, t1) of sequence 0 of `pb` (whose new tokens start at position 0) as a pass of their
// own over KV length t1: a prefill chunk, or (t1 = t0 + 1) a decode step.
std::vector<float> RunRows(PagedBatch& pb, int t0, int t1, bool decode) {
  const Case& c = pb.c;
  const size_t row = static_cast<size_t>(c.hq) * c.dh;
  std::vector<int32_t> qsl = {0, t1 - t0}, lens = {t1};
  std::vector<float> out((t1 - t0) * row, kNaN);
  PagedAttentionArgs a = pb.Args();
  a.q = Tensor(pb.q.data() + t0 * row, DType::kF32, {t1 - t0, c.hq, c.dh});
  a.query_start_loc = Tensor(qsl.data(), DType::kI32, {2});
  a.seq_lens = Tensor(lens.data(), DType::kI32, {1});
  a.block_tables = Tensor(pb.block_tables.data(), DType::kI32, {1, pb.max_blocks});
  a.out = Tensor(out.data(), DType::kF32, {t1 - t0, c.hq, c.dh});
  const absl::Status st = decode ? PagedAttentionDecode(a) : PagedAttentionPrefill(a);
  EXPECT_TRUE(st.ok()) << st;
  return out;
}

// Batch invariance: a query's output is bitwise the same whether its sequence is prefilled in one
// pass beside another sequence, in chunks of any size alone, or decoded one position at a time,
// on any thread count; contexts cross several 256-position partitions, with and without windows.
TEST(PagedAttention, ChunkingDecodeAndBatchDoNotChangeAQuerysOutput) {
  std::mt19937 rng(kSeed + 9);
  const std::vector<Case> cases = {
      {"invariance", {{0, 600}, {0, 37}}, 8, 2, 64, 16},
      {"invariance_window", {{0, 600}, {0, 300}}, 4, 1, 64, 16, 100},
      {"invariance_window_small_dh", {{0, 530}, {0, 5}}, 8, 4, 8, 1, 7},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(Describe(c));
    PagedBatch pb = MakeBatch(c, rng);
    ASSERT_TRUE(PagedAttentionPrefill(pb.Args()).ok());
    EXPECT_LT(MaxAbsErr(pb.out, Reference(pb)), kAtol);
    const int len = c.seqs[0].q_len;
    const size_t row = static_cast<size_t>(c.hq) * c.dh;
    for (int threads : {1, 3}) {
      SetCpuThreads(threads);
      for (int chunk : {1, 7, 32, 100, 257}) {
        for (int t0 = 0; t0 < len; t0 += chunk) {
          const int t1 = std::min(len, t0 + chunk);
          for (bool decode : {false, true}) {
            if (decode && t1 - t0 != 1) continue;
            const std::vector<float> got = RunRows(pb, t0, t1, decode);
            ASSERT_EQ(std::memcmp(got.data(), pb.out.data() + t0 * row, got.size() * sizeof(float)),
                      0)
                << (decode ? "decode" : "prefill") << " rows [" << t0 << ", " << t1 << ") with "
                << threads << " threads differ from the batched prefill";
          }
        }
      }
    }
    SetCpuThreads(0);
  }
}

// Work is split by thread count (decode items take more or fewer KV heads), but each head's
// arithmetic is fixed, so results must be bitwise identical for any pool size.
TEST(PagedAttention, ResultDoesNotDependOnThreadCount) {
  std::mt19937 rng(kSeed + 8);
  const std::vector<Case> cases = {
      DecodeCase("threads_decode", {0, 300, 1200, 40}, 16, 8, 64, 16),
      DecodeCase("threads_decode_odd_heads", {700, 5}, 6, 3, 64, 16),
      {"threads_prefill", {{100, 50}, {0, 70}}, 8, 2, 64, 16},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(Describe(c));
    PagedBatch pb = MakeBatch(c, rng);
    const bool decode = c.seqs[0].q_len == 1;
    std::vector<float> first;
    for (int threads : {1, 2, 3, 7, 16}) {
      SetCpuThreads(threads);
      std::fill(pb.out.begin(), pb.out.end(), kNaN);
      const absl::Status st =
          decode ? PagedAttentionDecode(pb.Args()) : PagedAttentionPrefill(pb.Args());
      ASSERT_TRUE(st.ok()) << st;
      if (first.empty()) {
        first = pb.out;
        EXPECT_LT(MaxAbsErr(first, Reference(pb)), kAtol);
      } else {
        EXPECT_EQ(std::memcmp(first.data(), pb.out.data(), first.size() * sizeof(float)), 0)
            << threads << " threads";
      }
    }
  }
  SetCpuThreads(0);  // back to the default pool
}

// q and out as column slices of wider rows (a fused qkv projection), k/v likewise.
TEST(PagedAttention, AcceptsStridedQueryKeyValueAndOutput) {
  std::mt19937 rng(kSeed + 2);
  const Case c{"strided", {{30, 12}, {0, 9}}, 8, 2, 64, 16};
  PagedBatch pb = MakeBatch(c, rng);
  const std::vector<float> want = Reference(pb);

  const int64_t t = pb.num_tokens, fused_heads = c.hq + 2 * c.hk;
  std::vector<float> fused(static_cast<size_t>(t) * fused_heads * c.dh);
  std::vector<float> wide_out(static_cast<size_t>(t) * (c.hq + 3) * c.dh, kNaN);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t h = 0; h < fused_heads; ++h) {
      for (int64_t d = 0; d < c.dh; ++d) {
        const float v = h < c.hq          ? pb.q[(i * c.hq + h) * c.dh + d]
                        : h < c.hq + c.hk ? pb.k_new[(i * c.hk + h - c.hq) * c.dh + d]
                                          : pb.v_new[(i * c.hk + h - c.hq - c.hk) * c.dh + d];
        fused[(i * fused_heads + h) * c.dh + d] = v;
      }
    }
  }
  Tensor qkv(fused.data(), DType::kF32, {t, fused_heads, c.dh});
  // Rewrite the new tokens from the strided views into a cache whose new slots are NaN again.
  for (int32_t slot : pb.slot_mapping) {
    std::fill_n(pb.k_cache.begin() + slot * c.hk * c.dh, c.hk * c.dh, kNaN);
    std::fill_n(pb.v_cache.begin() + slot * c.hk * c.dh, c.hk * c.dh, kNaN);
  }
  Tensor kc = pb.KCache(), vc = pb.VCache();
  Tensor slots(pb.slot_mapping.data(), DType::kI32, {t});
  absl::Status st =
      WriteKvCache(qkv.Narrow(1, c.hq, c.hk), qkv.Narrow(1, c.hq + c.hk, c.hk), slots, kc, vc);
  ASSERT_TRUE(st.ok()) << st;

  PagedAttentionArgs args = pb.Args();
  args.q = qkv.Narrow(1, 0, c.hq);
  args.out = Tensor(wide_out.data(), DType::kF32, {t, c.hq + 3, c.dh}).Narrow(1, 2, c.hq);
  st = PagedAttentionPrefill(args);
  ASSERT_TRUE(st.ok()) << st;
  std::vector<float> got;
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t h = 0; h < c.hq + 3; ++h) {
      const float* row = wide_out.data() + (i * (c.hq + 3) + h) * c.dh;
      if (h < 2 || h >= c.hq + 2) {  // columns outside the view stay untouched
        EXPECT_TRUE(std::isnan(row[0])) << "token " << i << " column " << h;
      } else {
        got.insert(got.end(), row, row + c.dh);
      }
    }
  }
  const double err = MaxAbsErr(got, want);
  Report("strided", c, err);
  EXPECT_LT(err, kAtol);
}

// With a sliding window, blocks wholly before the window are never read: a scheduler may have
// freed them already and left -1 in their place.
TEST(PagedAttention, IgnoresBlocksBeforeTheWindow) {
  std::mt19937 rng(kSeed + 3);
  const Case c = DecodeCase("window_freed_blocks", {999, 70}, 8, 2, 64, 16, 100);
  PagedBatch pb = MakeBatch(c, rng);
  const std::vector<float> want = Reference(pb);
  for (int b = 0; b < pb.num_seqs; ++b) {
    const int first_visible = std::max(0, pb.seq_lens[b] - c.window);
    for (int i = 0; i < first_visible / c.block_size; ++i)
      pb.block_tables[b * pb.max_blocks + i] = -1;
  }
  absl::Status st = PagedAttentionDecode(pb.Args());
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_LT(MaxAbsErr(pb.out, want), kAtol);
  st = PagedAttentionPrefill(pb.Args());
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_LT(MaxAbsErr(pb.out, want), kAtol);
}

TEST(PagedAttention, EmptyBatchIsANoOp) {
  std::vector<int32_t> qsl = {0};
  std::vector<float> cache(2 * 4 * 2 * 8, 0.0f);
  PagedAttentionArgs a;
  a.q = Tensor(nullptr, DType::kF32, {0, 4, 8});
  a.out = Tensor(nullptr, DType::kF32, {0, 4, 8});
  a.k_cache = Tensor(cache.data(), DType::kF32, {2, 4, 2, 8});
  a.v_cache = a.k_cache;
  a.query_start_loc = Tensor(qsl.data(), DType::kI32, {1});
  a.seq_lens = Tensor(nullptr, DType::kI32, {0});
  a.block_tables = Tensor(nullptr, DType::kI32, {0, 3});
  EXPECT_TRUE(PagedAttentionPrefill(a).ok());
  EXPECT_TRUE(PagedAttentionDecode(a).ok());
}

TEST(WriteKvCache, ScattersRowsAndSkipsNegativeSlots) {
  constexpr int kBlocks = 3, kBs = 4, kHk = 2, kDh = 8, kT = 5;
  const float sentinel = -7.0f;
  std::vector<float> kc(kBlocks * kBs * kHk * kDh, sentinel), vc = kc;
  std::vector<float> k(kT * kHk * kDh), v(k.size());
  std::mt19937 rng(kSeed + 4);
  FillUniform(k, -1.0f, 1.0f, rng);
  FillUniform(v, -1.0f, 1.0f, rng);
  std::vector<int32_t> slots = {3, -1, 0, 11, -5};
  Tensor kt(k.data(), DType::kF32, {kT, kHk, kDh}), vt(v.data(), DType::kF32, {kT, kHk, kDh});
  Tensor st(slots.data(), DType::kI32, {kT});
  Tensor kct(kc.data(), DType::kF32, {kBlocks, kBs, kHk, kDh}),
      vct(vc.data(), DType::kF32, {kBlocks, kBs, kHk, kDh});
  const absl::Status status = WriteKvCache(kt, vt, st, kct, vct);
  ASSERT_TRUE(status.ok()) << status;
  const int row = kHk * kDh;
  for (int slot = 0; slot < kBlocks * kBs; ++slot) {
    const int t = static_cast<int>(std::find(slots.begin(), slots.end(), slot) - slots.begin());
    for (int i = 0; i < row; ++i) {
      if (t < kT) {
        ASSERT_EQ(kc[slot * row + i], k[t * row + i]) << "slot " << slot;
        ASSERT_EQ(vc[slot * row + i], v[t * row + i]) << "slot " << slot;
      } else {
        ASSERT_EQ(kc[slot * row + i], sentinel) << "slot " << slot << " was written";
        ASSERT_EQ(vc[slot * row + i], sentinel) << "slot " << slot << " was written";
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bad inputs: each returns InvalidArgument naming the problem and writes nothing.

struct BadInput {
  std::string name;
  std::string message;  // a fragment the error must contain
  std::function<void(PagedBatch&, PagedAttentionArgs&)> corrupt;
};

Case ValidationCase() { return {"validation", {{5, 3}, {0, 4}}, 4, 2, 8, 4}; }

TEST(PagedAttentionValidation, RejectsBadInputsAndLeavesOutputUntouched) {
  using Args = PagedAttentionArgs;
  const std::vector<BadInput> bad = {
      {"q dtype", "q bf16[7, 4, 8] must be f32",
       [](PagedBatch& pb, Args& a) {
         a.q = Tensor(pb.q.data(), DType::kBF16, {7, 4, 8});
       }},
      {"q rank", "q f32[7, 32] must have shape [*, *, *]",
       [](PagedBatch& pb, Args& a) {
         a.q = Tensor(pb.q.data(), DType::kF32, {7, 32});
       }},
      {"k_cache dtype", "k_cache i32[",
       [](PagedBatch& pb, Args& a) {
         a.k_cache = Tensor(pb.k_cache.data(), DType::kI32, {pb.num_blocks, 4, 2, 8});
       }},
      {"v_cache shape", "v_cache f32[",
       [](PagedBatch& pb, Args& a) {
         a.v_cache = Tensor(pb.v_cache.data(), DType::kF32, {pb.num_blocks, 4, 2, 4});
       }},
      {"query_start_loc dtype", "query_start_loc i64[3] must be i32",
       [](PagedBatch& pb, Args& a) {
         a.query_start_loc = Tensor(pb.qsl.data(), DType::kI64, {3});
       }},
      {"block_tables rank", "block_tables i32[2] must have shape [*, *]",
       [](PagedBatch& pb, Args& a) {
         a.block_tables = Tensor(pb.block_tables.data(), DType::kI32, {2});
       }},
      {"Hq not a multiple of Hk", "multiple of num_kv_heads",
       [](PagedBatch& pb, Args& a) {
         a.q = Tensor(pb.q.data(), DType::kF32, {7, 3, 8});
         a.out = Tensor(pb.out.data(), DType::kF32, {7, 3, 8});
       }},
      {"head dims differ", "head_dim",
       [](PagedBatch& pb, Args& a) {
         a.q = Tensor(pb.q.data(), DType::kF32, {7, 2, 16});
         a.out = Tensor(pb.out.data(), DType::kF32, {7, 2, 16});
       }},
      {"out shape", "out f32[6, 4, 8] must have shape [7, 4, 8]",
       [](PagedBatch& pb, Args& a) {
         a.out = Tensor(pb.out.data(), DType::kF32, {6, 4, 8});
       }},
      {"seq_lens shorter than B", "batch sizes disagree",
       [](PagedBatch& pb, Args& a) { a.seq_lens = Tensor(pb.seq_lens.data(), DType::kI32, {1}); }},
      {"block_tables rows != B", "batch sizes disagree",
       [](PagedBatch& pb, Args& a) {
         a.block_tables = Tensor(pb.block_tables.data(), DType::kI32, {1, pb.max_blocks});
       }},
      {"query_start_loc not starting at 0", "query_start_loc must run from 0",
       [](PagedBatch& pb, Args&) { pb.qsl[0] = 1; }},
      {"query_start_loc not ending at T", "query_start_loc must run from 0",
       [](PagedBatch& pb, Args&) { pb.qsl[2] = 6; }},
      {"query_start_loc decreasing", "decreases", [](PagedBatch& pb, Args&) { pb.qsl[1] = 8; }},
      {"q_len > seq_len", "new tokens but seq_len",
       [](PagedBatch& pb, Args&) { pb.seq_lens[1] = 3; }},
      {"negative seq_len", "seq_len", [](PagedBatch& pb, Args&) { pb.seq_lens[1] = -1; }},
      {"seq_len past the block table row", "block_tables rows hold",
       [](PagedBatch& pb, Args&) { pb.seq_lens[0] = pb.max_blocks * 4 + 1; }},
      {"block id past the cache", "outside the cache",
       [](PagedBatch& pb, Args&) { pb.block_tables[0] = pb.num_blocks; }},
      {"negative block id inside the sequence", "outside the cache",
       [](PagedBatch& pb, Args&) { pb.block_tables[pb.max_blocks + 0] = -1; }},
      {"negative sliding window", "sliding_window",
       [](PagedBatch&, Args& a) { a.sliding_window = -1; }},
      {"non-finite scale", "scale",
       [](PagedBatch&, Args& a) { a.scale = std::numeric_limits<float>::quiet_NaN(); }},
      {"missing data", "has no data",
       [](PagedBatch&, Args& a) {
         a.q = Tensor(nullptr, DType::kF32, {7, 4, 8});
       }},
  };
  std::mt19937 rng(kSeed + 5);
  PagedBatch pb = MakeBatch(ValidationCase(), rng);
  const std::vector<float> want = Reference(pb);
  for (const BadInput& b : bad) {
    SCOPED_TRACE(b.name);
    PagedBatch broken = pb;  // fresh buffers each time
    std::fill(broken.out.begin(), broken.out.end(), 3.0f);
    PagedAttentionArgs args = broken.Args();
    b.corrupt(broken, args);
    const absl::Status st = PagedAttentionPrefill(args);
    std::printf("[attention] rejected (%s): %s\n", b.name.c_str(),
                std::string(st.message()).c_str());
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_EQ(std::string(st.message()).rfind("PagedAttentionPrefill: ", 0), 0u) << st;
    EXPECT_NE(std::string(st.message()).find(b.message), std::string::npos) << st;
    EXPECT_TRUE(std::all_of(broken.out.begin(), broken.out.end(), [](float x) {
      return x == 3.0f;
    })) << "a rejected call wrote to out";
  }
  // The kernels keep no state: the valid batch still works after all the rejections.
  const absl::Status st = PagedAttentionPrefill(pb.Args());
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_LT(MaxAbsErr(pb.out, want), kAtol);
}

TEST(PagedAttentionValidation, DecodeNeedsOneTokenPerSequence) {
  std::mt19937 rng(kSeed + 6);
  PagedBatch prefill = MakeBatch(ValidationCase(), rng);
  absl::Status st = PagedAttentionDecode(prefill.Args());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;

  // T == B but the tokens are spread 2 + 0 instead of 1 + 1.
  PagedBatch decode = MakeBatch(DecodeCase("decode_validation", {5, 9}, 4, 2, 8, 4), rng);
  const std::vector<float> want = Reference(decode);
  PagedBatch broken = decode;
  broken.qsl[1] = 2;
  st = PagedAttentionDecode(broken.Args());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(std::string(st.message()).find("exactly one new token"), std::string::npos) << st;

  st = PagedAttentionDecode(decode.Args());
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_LT(MaxAbsErr(decode.out, want), kAtol);
}

// A stand-in for another backend's stream: the CPU kernels must refuse it, not run on it.
class FakeCudaStream final : public Stream {
 public:
  Device device() const override { return Device::Cuda(0); }
  absl::Status Synchronize() override { return absl::OkStatus(); }
  void* native_handle() const override { return nullptr; }
};

TEST(PagedAttentionValidation, RejectsNonCpuTensorsAndStreams) {
  std::mt19937 rng(kSeed + 7);
  PagedBatch pb = MakeBatch(ValidationCase(), rng);
  PagedAttentionArgs a = pb.Args();
  a.q = Tensor(pb.q.data(), DType::kF32, {7, 4, 8}, Device::Cuda(0));
  absl::Status st = PagedAttentionPrefill(a);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_NE(std::string(st.message()).find("cuda:0"), std::string::npos) << st;

  FakeCudaStream cuda_stream;
  st = PagedAttentionDecode(pb.Args(), &cuda_stream);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  Tensor kc = pb.KCache(), vc = pb.VCache();
  Tensor k(pb.k_new.data(), DType::kF32, {7, 2, 8}), v(pb.v_new.data(), DType::kF32, {7, 2, 8});
  Tensor slots(pb.slot_mapping.data(), DType::kI32, {7});
  st = WriteKvCache(k, v, slots, kc, vc, &cuda_stream);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;

  // The CPU backend's own stream is accepted.
  auto cpu_stream = CpuBackend().CreateStream();
  ASSERT_TRUE(cpu_stream.ok()) << cpu_stream.status();
  st = PagedAttentionPrefill(pb.Args(), cpu_stream->get());
  EXPECT_TRUE(st.ok()) << st;
}

TEST(WriteKvCacheValidation, RejectsBadInputsAndLeavesCacheUntouched) {
  constexpr int kBlocks = 3, kBs = 4, kHk = 2, kDh = 8, kT = 3;
  std::vector<float> k(kT * kHk * kDh, 1.0f), v = k;
  std::vector<float> kc(kBlocks * kBs * kHk * kDh, 0.0f), vc = kc;
  std::vector<int32_t> good_slots = {0, 5, 11};
  struct Bad {
    std::string name, message;
    std::function<absl::Status(std::vector<int32_t>&)> call;
  };
  auto call = [&](const Tensor& kt, const Tensor& vt, const Tensor& s, int cache_dh) {
    Tensor kct(kc.data(), DType::kF32, {kBlocks, kBs, kHk, cache_dh});
    Tensor vct(vc.data(), DType::kF32, {kBlocks, kBs, kHk, kDh});
    return WriteKvCache(kt, vt, s, kct, vct);
  };
  const Tensor kt(k.data(), DType::kF32, {kT, kHk, kDh}), vt(v.data(), DType::kF32, {kT, kHk, kDh});
  const std::vector<Bad> bad = {
      {"slot past the cache", "past the cache",
       [&](std::vector<int32_t>& s) {
         s[2] = kBlocks * kBs;
         return call(kt, vt, Tensor(s.data(), DType::kI32, {kT}), kDh);
       }},
      {"slot_mapping dtype", "slot_mapping i64[3] must be i32",
       [&](std::vector<int32_t>& s) {
         return call(kt, vt, Tensor(s.data(), DType::kI64, {kT}), kDh);
       }},
      {"slot_mapping length", "slot_mapping i32[2] must have shape [3]",
       [&](std::vector<int32_t>& s) {
         return call(kt, vt, Tensor(s.data(), DType::kI32, {kT - 1}), kDh);
       }},
      {"k heads differ from cache", "must be [T, Hk, Dh] of k_cache",
       [&](std::vector<int32_t>& s) {
         const Tensor k1(k.data(), DType::kF32, {kT, 1, kDh}),
             v1(v.data(), DType::kF32, {kT, 1, kDh});
         return call(k1, v1, Tensor(s.data(), DType::kI32, {kT}), kDh);
       }},
      {"v shape differs from k", "v f32[3, 2, 4] must have shape [3, 2, 8]",
       [&](std::vector<int32_t>& s) {
         return call(kt, Tensor(v.data(), DType::kF32, {kT, kHk, kDh / 2}),
                     Tensor(s.data(), DType::kI32, {kT}), kDh);
       }},
      {"caches differ", "v_cache f32[3, 4, 2, 8] must have shape [3, 4, 2, 4]",
       [&](std::vector<int32_t>& s) {
         return call(kt, vt, Tensor(s.data(), DType::kI32, {kT}), kDh / 2);
       }},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.name);
    std::vector<int32_t> slots = good_slots;
    const absl::Status st = b.call(slots);
    std::printf("[attention] rejected (%s): %s\n", b.name.c_str(),
                std::string(st.message()).c_str());
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_EQ(std::string(st.message()).rfind("WriteKvCache: ", 0), 0u) << st;
    EXPECT_NE(std::string(st.message()).find(b.message), std::string::npos) << st;
    EXPECT_TRUE(std::all_of(kc.begin(), kc.end(), [](float x) { return x == 0.0f; }))
        << "k_cache written";
    EXPECT_TRUE(std::all_of(vc.begin(), vc.end(), [](float x) { return x == 0.0f; }))
        << "v_cache written";
  }
  const absl::Status st = call(kt, vt, Tensor(good_slots.data(), DType::kI32, {kT}), kDh);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(kc[5 * kHk * kDh], 1.0f);
}

}  // namespace
}  // namespace cleave::kernels
