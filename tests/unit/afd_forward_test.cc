// Attention-FFN disaggregation, end to end inside one test process but over real loopback
// sockets: an attention-only model instance drives AfdForward against FFN services (the FFN
// role's real service, each holding its share of the experts), and every decode step's logits
// must equal, bit for bit, the colocated model's Forward over the same batch, for m = 1, 2, 3
// micro-batches, on a dense, two MoE (one with a shared expert and a dense layer), a hybrid
// Jamba-style and a pure Mamba golden model. Then the failure paths: an FFN service that stops
// mid-stream fails the step at once (no hang) and the group recovers when a replacement comes;
// a peer that claims experts it does not hold gets an error answer, not a wrong result.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cleave/common/metrics.h"
#include "cleave/common/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/model/decoder.h"
#include "cleave/model/expert_placement.h"
#include "cleave/model/forward_batch.h"
#include "cleave/model/kv_cache.h"
#include "cleave/worker/afd.h"
#include "cleave/worker/ffn_service.h"
#include "gtest/gtest.h"

namespace cleave::worker {
namespace {

constexpr int kBlockSize = 16;
constexpr int kSeqs = 7;

std::string GoldenDir(const std::string& name) { return "tests/data/golden/" + name; }

// One FFN worker: its model (only its experts bound), its service and metrics.
struct FfnWorker {
  metrics::Registry registry;
  std::unique_ptr<model::DecoderModel> model;
  std::unique_ptr<FfnService> service;
  model::FfnShardPlan plan;
};

absl::StatusOr<std::unique_ptr<FfnWorker>> StartFfn(const std::string& dir, const model::FfnShardPlan& plan) {
  auto w = std::make_unique<FfnWorker>();
  w->plan = plan;
  model::LoadOptions load;
  load.part = model::LoadOptions::Part::kFfn;
  load.experts = plan.experts;
  load.shared_expert = plan.shared_expert;
  CLEAVE_ASSIGN_OR_RETURN(w->model, model::DecoderModel::Load(dir, load));
  WorkerProcessOptions o;
  CLEAVE_ASSIGN_OR_RETURN(w->service, FfnService::Start(*w->model, plan, o, w->registry));
  return w;
}

v1::AfdPeers PeersOf(const std::vector<std::unique_ptr<FfnWorker>>& workers) {
  v1::AfdPeers peers;
  for (size_t i = 0; i < workers.size(); ++i) {
    v1::AfdPeer* p = peers.add_peers();
    p->set_worker_id(i + 1);
    p->set_name("ffn-" + std::to_string(i));
    *p->mutable_shard() = workers[i]->service->shard();
  }
  peers.set_complete(true);
  return peers;
}

transport::ActivationOptions ActivationFor(const model::ModelConfig& c) {
  transport::ActivationOptions a;
  a.hidden_size = c.hidden_size;
  a.num_layers = c.num_hidden_layers;
  return a;
}

// kSeqs requests with prompts of different lengths, prefilled identically into two caches.
struct Requests {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<int32_t>> blocks;
};

Requests MakeRequests(const model::ModelConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  Requests r;
  int next_block = 0;
  for (int s = 0; s < kSeqs; ++s) {
    const int len = 3 + static_cast<int>(rng() % 20);
    std::vector<int32_t> t(len);
    for (auto& x : t) x = static_cast<int32_t>(rng() % c.vocab_size);
    r.tokens.push_back(t);
    std::vector<int32_t> b;
    for (int i = 0; i < 3; ++i) b.push_back(next_block++);  // 48 positions: prompt + decode steps
    r.blocks.push_back(b);
  }
  return r;
}

model::ForwardBatch Batch(const Requests& r, int first, int last, bool prefill) {
  model::ForwardBatch b;
  for (int s = first; s < last; ++s) {
    const auto& t = r.tokens[s];
    const int start = prefill ? 0 : static_cast<int>(t.size()) - 1;
    b.AddSequence(std::span(t).subspan(start), start, r.blocks[s], kBlockSize, true, s);
  }
  EXPECT_TRUE(b.Finalize().ok());
  return b;
}

int Argmax(const float* row, int n) { return static_cast<int>(std::max_element(row, row + n) - row); }

class AfdForwardTest : public ::testing::TestWithParam<std::string> {};

TEST_P(AfdForwardTest, DecodeLogitsBitIdenticalToColocated) {
  const std::string dir = GoldenDir(GetParam());
  auto full = model::DecoderModel::Load(dir);
  ASSERT_TRUE(full.ok()) << full.status();
  const model::ModelConfig& c = (*full)->config();
  model::LoadOptions attn_load;
  attn_load.part = model::LoadOptions::Part::kAttention;
  auto attn = model::DecoderModel::Load(dir, attn_load);
  ASSERT_TRUE(attn.ok()) << attn.status();
  auto plans = model::PlaceExperts(c, 2);
  ASSERT_TRUE(plans.ok());
  std::vector<std::unique_ptr<FfnWorker>> ffn;
  for (const auto& plan : *plans) {
    auto w = StartFfn(dir, plan);
    ASSERT_TRUE(w.ok()) << w.status();
    ffn.push_back(std::move(*w));
  }

  for (int m = 1; m <= 3; ++m) {
    SCOPED_TRACE("micro_batches " + std::to_string(m));
    const int slots = c.has_ssm_state() ? kSeqs : 0;
    auto ref_cache = model::KvCache::Create(c, kSeqs * 3, kBlockSize, kernels::CpuBackend(), slots);
    auto afd_cache = model::KvCache::Create(c, kSeqs * 3, kBlockSize, kernels::CpuBackend(), slots);
    ASSERT_TRUE(ref_cache.ok() && afd_cache.ok());
    Requests r = MakeRequests(c, 17 + m);
    // Prefill with the colocated model in both caches (the attention worker gets its KV from a
    // prefill worker the same way).
    model::Workspace ws;
    std::vector<float> logits;
    model::ForwardBatch prefill = Batch(r, 0, kSeqs, true);
    ASSERT_TRUE((*full)->Forward(prefill, **ref_cache, ws, logits).ok());
    ASSERT_TRUE((*full)->Forward(prefill, **afd_cache, ws, logits).ok());
    for (int s = 0; s < kSeqs; ++s) r.tokens[s].push_back(Argmax(&logits[s * c.vocab_size], c.vocab_size));

    FfnGroup group(ActivationFor(c));
    group.SetPeers(PeersOf(ffn));
    AfdForward afd(**attn, **afd_cache, group, AfdOptions{m, 5000});
    for (int step = 0; step < 6; ++step) {
      model::ForwardBatch whole = Batch(r, 0, kSeqs, false);
      std::vector<float> want;
      ASSERT_TRUE((*full)->Forward(whole, **ref_cache, ws, want).ok());
      std::vector<int> tokens(kSeqs, 1);
      const std::vector<int> starts = SplitMicroBatches(tokens, m);
      ASSERT_EQ(static_cast<int>(starts.size()), m + 1);
      std::vector<model::ForwardBatch> mbs;
      for (int i = 0; i < m; ++i) mbs.push_back(Batch(r, starts[i], starts[i + 1], false));
      std::vector<float> got;
      absl::Status st = afd.Run(mbs, got);
      ASSERT_TRUE(st.ok()) << st;
      ASSERT_EQ(got.size(), want.size());
      ASSERT_EQ(0, std::memcmp(got.data(), want.data(), want.size() * sizeof(float))) << "step " << step;
      for (int s = 0; s < kSeqs; ++s) r.tokens[s].push_back(Argmax(&want[s * c.vocab_size], c.vocab_size));
    }
    const AfdStats stats = afd.TakeStats();
    const bool has_ffn = std::any_of(c.layer_ffn.begin(), c.layer_ffn.end(),
                                     [](model::FfnKind k) { return k != model::FfnKind::kNone; });
    EXPECT_EQ(stats.steps, 6u);
    if (has_ffn) {
      EXPECT_GT(stats.calls, 0u);
      EXPECT_GT(stats.bytes_sent, 0);
      EXPECT_GE(stats.round_trip_us, stats.compute_us);
    } else {
      EXPECT_EQ(stats.calls, 0u);  // a Mamba model has no FFN to ship
    }
  }

  // Every expert's tokens were counted by its owner only.
  for (const auto& w : ffn) {
    const std::string text = w->registry.Render();
    for (int e = 0; e < c.moe.num_experts; ++e) {
      const bool owned = std::find(w->plan.experts.begin(), w->plan.experts.end(), e) != w->plan.experts.end();
      const std::string series = "expert=\"" + std::to_string(e) + "\"";
      EXPECT_EQ(owned, text.find(series) != std::string::npos) << "expert " << e;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Goldens, AfdForwardTest,
                         ::testing::Values("llama_gqa_tied", "mixtral", "qwen2_moe", "jamba", "mamba"));

TEST(ExpertPlacement, EveryExpertOwnedOnceAndBalanced) {
  auto config = model::LoadModelConfig(GoldenDir("qwen2_moe"));
  ASSERT_TRUE(config.ok());
  for (int shards = 1; shards <= 5; ++shards) {
    auto plans = model::PlaceExperts(*config, shards);
    ASSERT_TRUE(plans.ok());
    std::vector<int> owners(config->moe.num_experts, 0);
    int shared = 0;
    int64_t lo = INT64_MAX, hi = 0;
    for (const auto& p : *plans) {
      for (int e : p.experts) ++owners[e];
      shared += p.shared_expert ? 1 : 0;
      lo = std::min(lo, p.expert_bytes);
      hi = std::max(hi, p.expert_bytes);
    }
    for (int n : owners) EXPECT_EQ(n, 1);
    EXPECT_EQ(shared, 1);
    // LPT: no shard exceeds the lightest by more than the largest item (the shared expert).
    const int64_t largest = 3LL * config->hidden_size * config->moe.shared_expert_intermediate_size * 4;
    EXPECT_LE(hi - lo, largest) << shards << " shards";
  }
  EXPECT_FALSE(model::PlaceExperts(*config, 0).ok());
  EXPECT_FALSE(model::ExplicitShard(*config, {0, 0}, false).ok());
  EXPECT_FALSE(model::ExplicitShard(*config, {99}, false).ok());
}

class AfdFailureTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = GoldenDir("mixtral");
    auto full = model::DecoderModel::Load(dir_);
    ASSERT_TRUE(full.ok());
    full_ = std::move(*full);
    model::LoadOptions attn_load;
    attn_load.part = model::LoadOptions::Part::kAttention;
    auto attn = model::DecoderModel::Load(dir_, attn_load);
    ASSERT_TRUE(attn.ok());
    attn_ = std::move(*attn);
    auto cache = model::KvCache::Create(full_->config(), kSeqs * 3, kBlockSize, kernels::CpuBackend(), 0);
    ASSERT_TRUE(cache.ok());
    cache_ = std::move(*cache);
    r_ = MakeRequests(full_->config(), 5);
    model::Workspace ws;
    std::vector<float> logits;
    ASSERT_TRUE(full_->Forward(Batch(r_, 0, kSeqs, true), *cache_, ws, logits).ok());
    for (int s = 0; s < kSeqs; ++s) r_.tokens[s].push_back(1);
  }
  absl::Status Step(AfdForward& afd) {
    std::vector<model::ForwardBatch> mbs{Batch(r_, 0, 3, false), Batch(r_, 3, kSeqs, false)};
    std::vector<float> logits;
    return afd.Run(mbs, logits);
  }

  std::string dir_;
  std::unique_ptr<model::DecoderModel> full_, attn_;
  std::unique_ptr<model::KvCache> cache_;
  Requests r_;
};

TEST_F(AfdFailureTest, FfnWorkerGoneFailsFastThenRecovers) {
  auto plans = model::PlaceExperts(full_->config(), 2);
  ASSERT_TRUE(plans.ok());
  std::vector<std::unique_ptr<FfnWorker>> ffn;
  for (const auto& plan : *plans) ffn.push_back(std::move(StartFfn(dir_, plan).value()));
  FfnGroup group(ActivationFor(full_->config()));
  group.SetPeers(PeersOf(ffn));
  AfdForward afd(*attn_, *cache_, group, AfdOptions{2, 5000});
  ASSERT_TRUE(Step(afd).ok());

  ffn[1]->service->Stop();
  const auto start = std::chrono::steady_clock::now();
  absl::Status st = Step(afd);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("ffn-1"), std::string::npos) << st;
  EXPECT_LT(seconds, 3.0);
  // While it is gone every step fails at once, naming the expert's owner.
  st = Step(afd);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("ffn-1"), std::string::npos) << st;

  // A replacement registers (new address): the scheduler sends new peers, the group runs again.
  ffn[1] = std::move(StartFfn(dir_, (*plans)[1]).value());
  group.SetPeers(PeersOf(ffn));
  EXPECT_TRUE(Step(afd).ok());
}

TEST_F(AfdFailureTest, PeerClaimingExpertsItLacksGetsAnErrorNotAWrongAnswer) {
  auto plans = model::PlaceExperts(full_->config(), 2);
  ASSERT_TRUE(plans.ok());
  std::vector<std::unique_ptr<FfnWorker>> ffn;
  for (const auto& plan : *plans) ffn.push_back(std::move(StartFfn(dir_, plan).value()));
  FfnGroup group(ActivationFor(full_->config()));
  v1::AfdPeers lie = PeersOf(ffn);
  // Worker 0 claims every expert; worker 1 claims none.
  lie.mutable_peers(0)->mutable_shard()->clear_experts();
  for (int e = 0; e < full_->config().moe.num_experts; ++e) lie.mutable_peers(0)->mutable_shard()->add_experts(e);
  lie.mutable_peers(1)->mutable_shard()->clear_experts();
  group.SetPeers(lie);
  AfdForward afd(*attn_, *cache_, group, AfdOptions{2, 5000});
  absl::Status st = Step(afd);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("is not on this FFN worker"), std::string::npos) << st;
  // The truth restores service on the same connections.
  group.SetPeers(PeersOf(ffn));
  EXPECT_TRUE(Step(afd).ok());
}

TEST(SplitMicroBatches, BalancedContiguousNonEmpty) {
  EXPECT_EQ(SplitMicroBatches(std::vector<int>{1, 1, 1, 1}, 2), (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(SplitMicroBatches(std::vector<int>{1, 1, 1}, 3), (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(SplitMicroBatches(std::vector<int>{1, 1}, 3), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(SplitMicroBatches(std::vector<int>{1}, 2), (std::vector<int>{0, 1}));
  EXPECT_EQ(SplitMicroBatches(std::vector<int>{1, 1, 1, 1, 1}, 1), (std::vector<int>{0, 5}));
  // Tokens, not requests, are balanced: a long prefill chunk gets a run to itself.
  EXPECT_EQ(SplitMicroBatches(std::vector<int>{10, 1, 1, 1}, 2), (std::vector<int>{0, 1, 4}));
}

}  // namespace
}  // namespace cleave::worker
