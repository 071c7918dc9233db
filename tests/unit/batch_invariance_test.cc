// Batch invariance of the forward pass. The logits of a sequence's token must be bitwise the same
// however the token was batched: alone or beside other sequences' prefill chunks and decode tokens,
// in prefill chunks of any size, in decode batches of any size, after a prefix that an earlier
// pass computed (a prefix-cache hit), on any number of threads. This is what makes greedy output
// identical token for token between `cleave generate` and a serving worker whose batches mix
// requests (ARCHITECTURE.md, "Invariants").
//
// Every schedule below runs one target sequence with fixed tokens (teacher forcing, so each
// position's logits exist in every schedule), records the logits of every position it computes,
// and compares them with memcmp against the offline schedule: prefill in chunks of 512, then one
// token per step, alone. Models: the bundled stories260K, two HF golden models (bf16 weights;
// a sliding window of 8), and two random models written here (hidden 132 with a ragged K tail,
// head_dim 64, f32 / bf16 weights, one with a sliding window of 100). Contexts of 320 positions
// cross the attention kernels' 256-position partitions.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/gemm.h"
#include "cleave/model/forward_batch.h"
#include "cleave/model/generator.h"
#include "cleave/model/kv_cache.h"
#include "cleave/model/decoder.h"
#include "cleave/model/llama2c.h"
#include "cleave/model/safetensors.h"
#include "gtest/gtest.h"

namespace cleave::model {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kSeed = 0xba7c4;  // printed with every failure
constexpr int kBlockSize = 16;

// Sanitizer builds are unoptimised (CMake's Debug) and some 50x slower: they run every schedule
// kind on every model, with fewer variations of each.
#if defined(__OPTIMIZE__)
constexpr bool kFullMatrix = true;
#else
constexpr bool kFullMatrix = false;
#endif

template <typename T>
std::vector<T> Pick(std::vector<T> full, std::vector<T> reduced) {
  return kFullMatrix ? full : reduced;
}

// ---------------------------------------------------------------------------------------------
// Models.

// A random Llama/Mistral checkpoint unlike the goldens: hidden 132 leaves a K tail after the
// 8-wide loops, head_dim 64 fills the attention kernels' vector loops, 640 positions allow
// contexts past the decode split. Small enough for sanitizer builds.
absl::Status WriteWideModel(const fs::path& dir, kernels::DType dtype, int sliding_window) {
  constexpr int kHidden = 132, kHeads = 2, kKvHeads = 1, kHeadDim = 64, kFfn = 200, kVocab = 300;
  constexpr int kLayers = 2;
  fs::create_directories(dir);
  {
    std::ofstream cfg(dir / "config.json");
    cfg << "{\"architectures\": [\""
        << (sliding_window > 0 ? "MistralForCausalLM" : "LlamaForCausalLM")
        << "\"], \"hidden_size\": " << kHidden << ", \"intermediate_size\": " << kFfn
        << ", \"num_hidden_layers\": " << kLayers << ", \"num_attention_heads\": " << kHeads
        << ", \"num_key_value_heads\": " << kKvHeads << ", \"head_dim\": " << kHeadDim
        << ", \"vocab_size\": " << kVocab
        << ", \"max_position_embeddings\": 640, \"rms_norm_eps\": 1e-5, \"rope_theta\": 10000.0,"
        << " \"tie_word_embeddings\": false, \"bos_token_id\": 1, \"eos_token_id\": 2,"
        << " \"torch_dtype\": \"" << (dtype == kernels::DType::kBF16 ? "bfloat16" : "float32")
        << "\", \"sliding_window\": "
        << (sliding_window > 0 ? std::to_string(sliding_window) : std::string("null")) << "}\n";
  }
  std::mt19937 rng(kSeed);
  // Owned storage for every tensor; TensorToWrite borrows it.
  std::vector<std::vector<float>> f32;
  std::vector<std::vector<uint16_t>> b16;
  std::vector<TensorToWrite> tensors;
  const auto add = [&](const std::string& name, std::vector<int64_t> shape, float mean, float sd,
                       bool is_matrix) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::normal_distribution<float> dist(mean, sd);
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = dist(rng);
    if (is_matrix && dtype == kernels::DType::kBF16) {
      std::vector<uint16_t> bits(v.size());
      for (size_t i = 0; i < v.size(); ++i) bits[i] = kernels::F32ToBf16(v[i]);
      b16.push_back(std::move(bits));
      tensors.push_back({name, dtype, std::move(shape), b16.back().data()});
    } else {
      f32.push_back(std::move(v));
      tensors.push_back({name, kernels::DType::kF32, std::move(shape), f32.back().data()});
    }
  };
  f32.reserve(64);
  b16.reserve(64);
  const float in_sd = 1.0f / std::sqrt(static_cast<float>(kHidden));
  add("model.embed_tokens.weight", {kVocab, kHidden}, 0.0f, 1.0f, true);
  add("lm_head.weight", {kVocab, kHidden}, 0.0f, in_sd, true);
  add("model.norm.weight", {kHidden}, 1.0f, 0.1f, false);
  for (int l = 0; l < kLayers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    add(p + "input_layernorm.weight", {kHidden}, 1.0f, 0.1f, false);
    add(p + "post_attention_layernorm.weight", {kHidden}, 1.0f, 0.1f, false);
    add(p + "self_attn.q_proj.weight", {kHeads * kHeadDim, kHidden}, 0.0f, 2 * in_sd, true);
    add(p + "self_attn.k_proj.weight", {kKvHeads * kHeadDim, kHidden}, 0.0f, 2 * in_sd, true);
    add(p + "self_attn.v_proj.weight", {kKvHeads * kHeadDim, kHidden}, 0.0f, in_sd, true);
    add(p + "self_attn.o_proj.weight", {kHidden, kHeads * kHeadDim}, 0.0f,
        1.0f / std::sqrt(static_cast<float>(kHeads * kHeadDim)), true);
    add(p + "mlp.gate_proj.weight", {kFfn, kHidden}, 0.0f, in_sd, true);
    add(p + "mlp.up_proj.weight", {kFfn, kHidden}, 0.0f, in_sd, true);
    add(p + "mlp.down_proj.weight", {kHidden, kFfn}, 0.0f,
        1.0f / std::sqrt(static_cast<float>(kFfn)), true);
  }
  return WriteSafetensors(dir / "model.safetensors", tensors, {});
}

// Loads (once per process) the model a test parameter names.
class ModelRegistry {
 public:
  static ModelRegistry& Get() {
    static ModelRegistry* r = new ModelRegistry();
    return *r;
  }
  ~ModelRegistry() = delete;

  absl::StatusOr<const DecoderModel*> Load(const std::string& name) {
    auto it = models_.find(name);
    if (it != models_.end()) return it->second.get();
    fs::path dir;
    if (name == "stories260K") {
      dir = "models/stories260K";
      if (!fs::exists(dir / "model.safetensors")) {  // scripts/setup-model.sh not run: convert
        dir = tmp_ / "stories260K";
        Llama2cConvertOptions opts;
        opts.checkpoint = "../shared/models/stories260K/stories260K.bin";
        opts.out_dir = dir;
        CLEAVE_RETURN_IF_ERROR(ConvertLlama2c(opts));
      }
    } else if (name == "wide_f32") {
      dir = tmp_ / name;
      CLEAVE_RETURN_IF_ERROR(WriteWideModel(dir, kernels::DType::kF32, 0));
    } else if (name == "wide_bf16_swa") {
      dir = tmp_ / name;
      CLEAVE_RETURN_IF_ERROR(WriteWideModel(dir, kernels::DType::kBF16, 100));
    } else {
      dir = fs::path("tests/data/golden") / name;
    }
    CLEAVE_ASSIGN_OR_RETURN(std::unique_ptr<DecoderModel> model, DecoderModel::Load(dir));
    const DecoderModel* raw = model.get();
    models_[name] = std::move(model);
    return raw;
  }

 private:
  ModelRegistry()
      : tmp_(fs::temp_directory_path() /
             ("cleave_batch_invariance_" + std::to_string(::getpid()))) {
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(Get().tmp_, ec);
    });
  }
  fs::path tmp_;
  std::map<std::string, std::unique_ptr<DecoderModel>> models_;
};

// ---------------------------------------------------------------------------------------------
// The Linear kernel on its own: a row of y must not depend on the other rows of the call.

// y = x · w^T (+ bias) for rows [row0, row0 + m) of x.
std::vector<float> LinearRows(const std::vector<float>& x, int64_t row0, int64_t m, int64_t k,
                              const kernels::Tensor& w, const kernels::Tensor* bias) {
  const int64_t n = w.dim(0);
  std::vector<float> y(static_cast<size_t>(m * n), std::nanf(""));
  kernels::Tensor xt(const_cast<float*>(x.data()) + row0 * k, kernels::DType::kF32, {m, k});
  kernels::Tensor yt(y.data(), kernels::DType::kF32, {m, n});
  const absl::Status st = kernels::Linear(xt, w, bias, yt);
  EXPECT_TRUE(st.ok()) << st;
  return y;
}

// Rows of a 130-row call against the same rows from calls of 1 to 129 rows at other offsets, for
// f32 / bf16 / f16 weights, shapes with ragged tails in n and k and several K blocks, with and
// without bias, on 1 and 3 threads (which tile the output differently).
TEST(LinearBatchInvariance, ARowDoesNotDependOnTheOtherRows) {
  constexpr int64_t kRows = 130;
  const std::vector<std::pair<int64_t, int64_t>> shapes = Pick<std::pair<int64_t, int64_t>>(
      {{37, 45}, {300, 1030}, {700, 260}}, {{37, 45}, {100, 1030}});
  const std::vector<std::pair<int64_t, int64_t>> slices = {{0, 1},   {77, 1}, {5, 2},  {1, 3},
                                                           {0, 4},   {9, 5},  {60, 7}, {3, 16},
                                                           {64, 64}, {1, 65}, {1, 129}};
  std::mt19937 rng(kSeed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (kernels::DType dt : {kernels::DType::kF32, kernels::DType::kBF16, kernels::DType::kF16}) {
    for (const auto& [n, k] : shapes) {
      std::vector<float> x(static_cast<size_t>(kRows * k)), w32(static_cast<size_t>(n * k));
      std::vector<float> bias(static_cast<size_t>(n));
      for (float& v : x) v = unit(rng);
      for (float& v : w32) v = unit(rng);
      for (float& v : bias) v = unit(rng);
      std::vector<uint16_t> w16(w32.size());
      for (size_t i = 0; i < w32.size(); ++i) {
        w16[i] =
            dt == kernels::DType::kBF16 ? kernels::F32ToBf16(w32[i]) : kernels::F32ToF16(w32[i]);
      }
      kernels::Tensor w(dt == kernels::DType::kF32 ? static_cast<void*>(w32.data()) : w16.data(),
                        dt, {n, k});
      kernels::Tensor b(bias.data(), kernels::DType::kF32, {n});
      for (const kernels::Tensor* bp : {static_cast<const kernels::Tensor*>(nullptr),
                                        static_cast<const kernels::Tensor*>(&b)}) {
        const std::string what = absl::StrCat(std::string(kernels::DTypeName(dt)), " n=", n,
                                              " k=", k, bp != nullptr ? " +bias" : "");
        const std::vector<float> full = LinearRows(x, 0, kRows, k, w, bp);
        for (int threads : {1, 3}) {
          kernels::SetCpuThreads(threads);
          for (const auto& [row0, m] : slices) {
            const std::vector<float> part = LinearRows(x, row0, m, k, w, bp);
            EXPECT_EQ(std::memcmp(part.data(), full.data() + row0 * n, part.size() * sizeof(float)),
                      0)
                << what << ": rows [" << row0 << ", " << row0 + m << ") alone, " << threads
                << " threads, differ from the same rows in a " << kRows << "-row call";
          }
        }
        kernels::SetCpuThreads(0);
        // For the record: how the fast paths (SetBatchInvariant(false)) fare on the same check.
        kernels::SetBatchInvariant(false);
        const std::vector<float> fast_full = LinearRows(x, 0, kRows, k, w, bp);
        int differing = 0;
        for (const auto& [row0, m] : slices) {
          const std::vector<float> part = LinearRows(x, row0, m, k, w, bp);
          differing += std::memcmp(part.data(), fast_full.data() + row0 * n,
                                   part.size() * sizeof(float)) != 0;
        }
        kernels::SetBatchInvariant(true);
        std::printf(
            "[ Linear %-30s ] fast paths: %d of %zu row slices differ from the %lld-row call\n",
            what.c_str(), differing, slices.size(), static_cast<long long>(kRows));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// A miniature serving worker: sequences with their own (lazily allocated) KV blocks, and one
// forward pass per Step over whatever mix of sequences and token counts the schedule asks for.

using Logits = std::vector<float>;
using LogitsByPos = std::map<int, Logits>;

struct Work {
  int seq;
  int tokens;  // new tokens this pass; 1 = a decode token
};

class Executor {
 public:
  static absl::StatusOr<std::unique_ptr<Executor>> Create(const DecoderModel& model, int num_blocks,
                                                          int block_size = kBlockSize) {
    CLEAVE_ASSIGN_OR_RETURN(
        auto cache, KvCache::Create(model.config(), num_blocks, block_size, kernels::CpuBackend()));
    return std::unique_ptr<Executor>(new Executor(model, std::move(cache), num_blocks));
  }

  // A sequence whose KV starts empty. Tracked sequences get the logits of every row they run.
  int Add(std::vector<int32_t> tokens, bool track) {
    seqs_.push_back({std::move(tokens), {}, 0, track, {}});
    return static_cast<int>(seqs_.size()) - 1;
  }

  // Prefix-cache hit: dst starts with src's first `blocks` KV blocks (shared, as the scheduler's
  // prefix cache shares them) and computes from position blocks * block_size on.
  void SharePrefix(int dst, int src, int blocks) {
    Seq& d = seqs_[dst];
    d.blocks.assign(seqs_[src].blocks.begin(), seqs_[src].blocks.begin() + blocks);
    d.done = blocks * cache_->block_size();
  }

  int done(int seq) const { return seqs_[seq].done; }
  int remaining(int seq) const {
    return static_cast<int>(seqs_[seq].tokens.size()) - seqs_[seq].done;
  }
  const LogitsByPos& logits(int seq) const { return seqs_[seq].logits; }

  absl::Status Step(const std::vector<Work>& work) {
    ForwardBatch batch;
    std::vector<std::pair<int, int>> rows;  // (seq, position) of each logits row
    const int bs = cache_->block_size();
    for (const Work& w : work) {
      Seq& s = seqs_[w.seq];
      CLEAVE_CHECK_ARG(w.tokens > 0 && s.done + w.tokens <= static_cast<int>(s.tokens.size()),
                       "schedule overruns a sequence");
      const int need = (s.done + w.tokens + bs - 1) / bs;
      if (static_cast<int>(s.blocks.size()) < need) {
        CLEAVE_ASSIGN_OR_RETURN(std::vector<int32_t> more,
                                pool_.Allocate(need - static_cast<int>(s.blocks.size())));
        s.blocks.insert(s.blocks.end(), more.begin(), more.end());
      }
      const int first_row = batch.num_tokens();
      batch.AddSequence(std::span(s.tokens).subspan(s.done, w.tokens), s.done, s.blocks, bs,
                        /*want_logits=*/!s.track);
      if (s.track) {
        for (int i = 0; i < w.tokens; ++i) {
          batch.logits_indices.push_back(first_row + i);
          rows.emplace_back(w.seq, s.done + i);
        }
      } else {
        // Its last row's logits are computed, as for sampling, and dropped.
        rows.emplace_back(-1, -1);
      }
    }
    CLEAVE_RETURN_IF_ERROR(batch.Finalize());
    // logits_indices ascend with the rows, as the scheduler's do; logits row i is rows[i].
    CLEAVE_RETURN_IF_ERROR(model_.Forward(batch, *cache_, ws_, out_));
    const int vocab = model_.config().vocab_size;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i].first < 0) continue;
      seqs_[rows[i].first].logits[rows[i].second] =
          Logits(out_.begin() + i * vocab, out_.begin() + (i + 1) * vocab);
    }
    for (const Work& w : work) seqs_[w.seq].done += w.tokens;
    return absl::OkStatus();
  }

 private:
  struct Seq {
    std::vector<int32_t> tokens;
    std::vector<int32_t> blocks;
    int done;
    bool track;
    LogitsByPos logits;
  };

  Executor(const DecoderModel& model, std::unique_ptr<KvCache> cache, int num_blocks)
      : model_(model), cache_(std::move(cache)), pool_(num_blocks) {}

  const DecoderModel& model_;
  std::unique_ptr<KvCache> cache_;
  BlockPool pool_;
  Workspace ws_;
  Logits out_;
  std::vector<Seq> seqs_;
};

// ---------------------------------------------------------------------------------------------
// Comparison.

struct Diff {
  int compared = 0, differing = 0, first_pos = -1;
  double max_abs = 0;
};

Diff Compare(const LogitsByPos& want, const LogitsByPos& got) {
  Diff d;
  for (const auto& [pos, logits] : got) {
    auto it = want.find(pos);
    if (it == want.end()) continue;
    ++d.compared;
    if (std::memcmp(logits.data(), it->second.data(), logits.size() * sizeof(float)) == 0) continue;
    if (d.differing++ == 0) d.first_pos = pos;
    for (size_t i = 0; i < logits.size(); ++i) {
      d.max_abs = std::max(d.max_abs, std::fabs(double{logits[i]} - it->second[i]));
    }
  }
  return d;
}

void ExpectBitwiseEqual(const LogitsByPos& want, const LogitsByPos& got, int expect_compared,
                        const std::string& what) {
  const Diff d = Compare(want, got);
  std::printf("[ %-52s ] seed=%#x positions=%d bitwise-different=%d max_abs=%.3g\n", what.c_str(),
              kSeed, d.compared, d.differing, d.max_abs);
  EXPECT_EQ(d.compared, expect_compared) << what;
  EXPECT_EQ(d.differing, 0) << what << ": first differing position " << d.first_pos
                            << ", max |diff| " << d.max_abs;
}

// ---------------------------------------------------------------------------------------------
// Schedules.

std::vector<int32_t> RandomTokens(std::mt19937& rng, int n, int vocab) {
  std::uniform_int_distribution<int32_t> tok(3, vocab - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  t[0] = 1;  // BOS
  for (int i = 1; i < n; ++i) t[i] = tok(rng);
  return t;
}

class BatchInvarianceTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    kernels::SetCpuThreads(0);
    auto model = ModelRegistry::Get().Load(GetParam());
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = *model;
    const ModelConfig& c = model_->config();
    vocab_ = c.vocab_size;
    // Long enough for the decode steps to run past 256 positions where the context allows.
    length_ = std::min(320, c.max_position_embeddings - 8);
    prompt_len_ = length_ - 48;
    std::mt19937 rng(kSeed);
    target_ = RandomTokens(rng, length_, vocab_);
    ASSERT_NO_FATAL_FAILURE(reference_ = Offline(target_));
    ASSERT_EQ(static_cast<int>(reference_.size()), length_);
  }
  void TearDown() override { kernels::SetCpuThreads(0); }

  std::unique_ptr<Executor> NewExecutor(int num_blocks = 2048, int block_size = kBlockSize) {
    auto ex = Executor::Create(*model_, num_blocks, block_size);
    EXPECT_TRUE(ex.ok()) << ex.status();
    return ex.ok() ? *std::move(ex) : nullptr;
  }

  // `cleave generate`'s schedule: the prompt in chunks of 512, then one token per pass, alone.
  LogitsByPos Offline(const std::vector<int32_t>& tokens, int chunk = 512) {
    auto ex = NewExecutor();
    if (ex == nullptr) return {};
    const int s = ex->Add(tokens, true);
    while (ex->done(s) < prompt_len_) {
      const absl::Status st = ex->Step({{s, std::min(chunk, prompt_len_ - ex->done(s))}});
      EXPECT_TRUE(st.ok()) << st;
      if (!st.ok()) return {};
    }
    while (ex->remaining(s) > 0) {
      const absl::Status st = ex->Step({{s, 1}});
      EXPECT_TRUE(st.ok()) << st;
      if (!st.ok()) return {};
    }
    return ex->logits(s);
  }

  // The target alone in chunks of `chunk`, prompt and continuation alike.
  LogitsByPos Chunked(int chunk, int block_size = kBlockSize) {
    auto ex = NewExecutor(2048 * kBlockSize / block_size, block_size);
    if (ex == nullptr) return {};
    const int s = ex->Add(target_, true);
    while (ex->remaining(s) > 0) {
      const absl::Status st = ex->Step({{s, std::min(chunk, ex->remaining(s))}});
      EXPECT_TRUE(st.ok()) << st;
      if (!st.ok()) return {};
    }
    return ex->logits(s);
  }

  // Continuous batching: each pass runs the target's next chunk (sizes drawn from `chunks`,
  // 1 = a decode token inside a mixed batch) among `others` other sequences, each either
  // prefilling a random chunk or decoding one token; finished ones are replaced. The target's
  // place in the batch moves every pass. With a prefix hit, a donor sequence sharing the
  // target's first `prefix_blocks` blocks runs first and the target starts from there.
  struct Mixed {
    std::vector<int> chunks = {13};
    int others = 4;
    int prefix_blocks = 0;
    uint32_t seed = kSeed;
  };
  std::pair<LogitsByPos, LogitsByPos> RunMixed(const Mixed& m) {
    auto ex = NewExecutor();
    if (ex == nullptr) return {};
    std::mt19937 rng(m.seed);
    std::uniform_int_distribution<int> other_len(2, 120), other_chunk(1, 40), coin(0, 2);
    const auto new_other = [&] {
      return ex->Add(RandomTokens(rng, other_len(rng), vocab_), false);
    };
    std::vector<int> active;
    for (int i = 0; i < m.others; ++i) active.push_back(new_other());
    const auto others_step = [&](std::vector<Work>& work) {
      for (int& o : active) {
        if (ex->remaining(o) == 0) o = new_other();
        // Decode (one token) once a third of the time, else a prefill chunk.
        const int n = coin(rng) == 0 ? 1 : std::min(other_chunk(rng), ex->remaining(o));
        work.push_back({o, n});
      }
    };
    int donor = -1;
    const int t = ex->Add(target_, true);
    if (m.prefix_blocks > 0) {
      std::vector<int32_t> donor_tokens(target_.begin(),
                                        target_.begin() + m.prefix_blocks * kBlockSize);
      const std::vector<int32_t> tail = RandomTokens(rng, 30, vocab_);
      donor_tokens.insert(donor_tokens.end(), tail.begin() + 1, tail.end());
      donor = ex->Add(donor_tokens, true);
      while (ex->remaining(donor) > 0) {
        std::vector<Work> work;
        others_step(work);
        work.insert(work.begin() + static_cast<long>(work.size() / 2),
                    Work{donor, std::min(20, ex->remaining(donor))});
        const absl::Status st = ex->Step(work);
        EXPECT_TRUE(st.ok()) << st;
        if (!st.ok()) return {};
      }
      ex->SharePrefix(t, donor, m.prefix_blocks);
    }
    for (size_t step = 0; ex->remaining(t) > 0; ++step) {
      std::vector<Work> work;
      others_step(work);
      const int n = std::min(m.chunks[step % m.chunks.size()], ex->remaining(t));
      work.insert(work.begin() + static_cast<long>(step % (work.size() + 1)), Work{t, n});
      const absl::Status st = ex->Step(work);
      EXPECT_TRUE(st.ok()) << st;
      if (!st.ok()) return {};
    }
    return {ex->logits(t), donor >= 0 ? ex->logits(donor) : LogitsByPos{}};
  }

  // The target's prompt prefilled alone, then every continuation token decoded in a pure decode
  // batch of `batch` sequences (the target in the middle), the others prefilled beforehand
  // to random lengths in mixed batches.
  LogitsByPos DecodeBatch(int batch) {
    auto ex = NewExecutor();
    if (ex == nullptr) return {};
    std::mt19937 rng(kSeed + static_cast<uint32_t>(batch));
    std::uniform_int_distribution<int> prompt_len(1, 80);
    const int steps = length_ - prompt_len_;
    std::vector<int> others;
    for (int i = 0; i + 1 < batch; ++i) {
      const int p = prompt_len(rng);
      others.push_back(ex->Add(RandomTokens(rng, p + steps, vocab_), false));
    }
    // Others' prompts, several sequences per pass under a 256-token budget.
    for (size_t i = 0; i < others.size();) {
      std::vector<Work> work;
      for (int budget = 256; i < others.size() && budget > 0; ++i) {
        const int p = ex->remaining(others[i]) - steps;
        work.push_back({others[i], p});
        budget -= p;
      }
      const absl::Status st = ex->Step(work);
      EXPECT_TRUE(st.ok()) << st;
      if (!st.ok()) return {};
    }
    const int t = ex->Add(target_, true);
    while (ex->done(t) < prompt_len_) {
      const absl::Status st = ex->Step({{t, std::min(512, prompt_len_ - ex->done(t))}});
      EXPECT_TRUE(st.ok()) << st;
      if (!st.ok()) return {};
    }
    while (ex->remaining(t) > 0) {
      std::vector<Work> work;
      for (int o : others) work.push_back({o, 1});
      work.insert(work.begin() + static_cast<long>(others.size() / 2), Work{t, 1});
      const absl::Status st = ex->Step(work);
      EXPECT_TRUE(st.ok()) << st;
      if (!st.ok()) return {};
    }
    return ex->logits(t);
  }

  const DecoderModel* model_ = nullptr;
  int vocab_ = 0, length_ = 0, prompt_len_ = 0;
  std::vector<int32_t> target_;
  LogitsByPos reference_;  // Offline(target_)
};

TEST_P(BatchInvarianceTest, PrefillChunkSizes) {
  for (int chunk : Pick<int>({1, 7, 16, 33, 100}, {1, 33})) {
    ExpectBitwiseEqual(reference_, Chunked(chunk), length_,
                       absl::StrCat(GetParam(), " alone, chunks of ", chunk));
  }
}

// A different paged layout (block size) must not matter either: tiles follow absolute positions.
TEST_P(BatchInvarianceTest, KvBlockSize) {
  for (int block : Pick<int>({1, 32}, {32})) {
    ExpectBitwiseEqual(reference_, Chunked(33, block), length_,
                       absl::StrCat(GetParam(), " chunks of 33, KV block ", block));
  }
}

TEST_P(BatchInvarianceTest, MixedBatches) {
  const std::vector<Mixed> cases = Pick<Mixed>(
      {
          {{13}, 4, 0, kSeed + 1},
          {{1, 5, 1, 1, 17, 1, 3, 64}, 3, 0, kSeed + 2},  // 1 = decode token in a prefill batch
          {{40, 1}, 9, 0, kSeed + 3},
          {{1}, 2, 0, kSeed + 4},
      },
      {{{1, 5, 1, 1, 17, 1, 3, 64}, 3, 0, kSeed + 2}});
  for (const Mixed& m : cases) {
    std::string chunks;
    for (int c : m.chunks) absl::StrAppend(&chunks, chunks.empty() ? "" : ",", c);
    ExpectBitwiseEqual(
        reference_, RunMixed(m).first, length_,
        absl::StrCat(GetParam(), " mixed, chunks {", chunks, "}, +", m.others, " seqs"));
  }
}

TEST_P(BatchInvarianceTest, DecodeBatchSizes) {
  for (int batch : Pick<int>({1, 3, 17, 64}, {17})) {
    ExpectBitwiseEqual(reference_, DecodeBatch(batch), length_,
                       absl::StrCat(GetParam(), " decode batch of ", batch));
  }
}

// A prefix-cache hit: the target's first blocks were computed by another sequence, in another
// batch; the target starts at a block boundary.
TEST_P(BatchInvarianceTest, PrefixCacheHit) {
  for (int blocks : Pick<int>({1, 3}, {3})) {
    Mixed m;
    m.chunks = {29, 1, 1, 50};
    m.prefix_blocks = blocks;
    m.seed = kSeed + 10 + static_cast<uint32_t>(blocks);
    const auto [target, donor] = RunMixed(m);
    const int prefix = blocks * kBlockSize;
    ExpectBitwiseEqual(reference_, target, length_ - prefix,
                       absl::StrCat(GetParam(), " after a ", prefix, "-token prefix hit"));
    LogitsByPos donor_prefix(donor.begin(), donor.lower_bound(prefix));
    ExpectBitwiseEqual(reference_, donor_prefix, prefix, absl::StrCat(GetParam(), " prefix donor"));
  }
}

// Thread count: the kernels split work over outputs, never over a reduction.
TEST_P(BatchInvarianceTest, ThreadCounts) {
  for (int threads : Pick<int>({1, 3, 4}, {3})) {
    kernels::SetCpuThreads(threads);
    ExpectBitwiseEqual(reference_, Offline(target_, 64), length_,
                       absl::StrCat(GetParam(), " ", threads, " threads, chunks of 64"));
    ExpectBitwiseEqual(reference_, RunMixed({{1, 9, 1, 30}, 5, 0, kSeed + 20}).first, length_,
                       absl::StrCat(GetParam(), " ", threads, " threads, mixed"));
  }
}

// The real offline path (Generator, as `cleave generate` runs it): its greedy tokens are the
// argmax of the reference's logits, and they come out the same from a mixed serving schedule.
TEST_P(BatchInvarianceTest, GreedyTokensMatchOfflineGenerator) {
  auto gen = Generator::Create(*model_, GeneratorOptions{});
  ASSERT_TRUE(gen.ok()) << gen.status();
  GenerateRequest req;
  req.prompt_ids.assign(target_.begin(), target_.begin() + prompt_len_);
  req.max_tokens = length_ - prompt_len_;
  req.ignore_eos = true;
  req.sampling.temperature = 0.0f;
  auto res = (*gen)->Generate(req);
  ASSERT_TRUE(res.ok()) << res.status();
  ASSERT_EQ(static_cast<int>(res->tokens.size()), length_ - prompt_len_);

  // Teacher-force the greedy continuation and run it batched.
  target_.resize(prompt_len_);
  target_.insert(target_.end(), res->tokens.begin(), res->tokens.end());
  reference_ = Offline(target_);
  const LogitsByPos mixed = RunMixed({{7, 1, 1, 20}, kFullMatrix ? 6 : 2, 0, kSeed + 30}).first;
  ExpectBitwiseEqual(reference_, mixed, length_, GetParam() + " greedy continuation, mixed");
  EXPECT_EQ(std::memcmp(res->first_logits.data(), mixed.at(prompt_len_ - 1).data(),
                        res->first_logits.size() * sizeof(float)),
            0)
      << "first-token logits differ from the offline generator's";
  std::vector<int32_t> argmax;
  for (int p = prompt_len_ - 1; p + 1 < length_; ++p) {
    const Logits& l = mixed.at(p);
    argmax.push_back(static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin()));
  }
  EXPECT_EQ(argmax, res->tokens) << "greedy tokens of the mixed schedule differ from offline";
}

INSTANTIATE_TEST_SUITE_P(Models, BatchInvarianceTest,
                         ::testing::Values("stories260K", "llama_bf16", "mistral_swa", "wide_f32",
                                           "wide_bf16_swa"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace cleave::model
