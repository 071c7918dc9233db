// The worker engine without processes: colocated mixed batches, and prefill -> decode over the
// in-process KV transport, must produce exactly the tokens offline generation produces.
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "cleave/model/generator.h"
#include "cleave/model/decoder.h"
#include "cleave/transport/kv_transport.h"
#include "cleave/worker/engine.h"
#include "engine_test_util.h"
#include "gtest/gtest.h"

namespace cleave::worker {
namespace {

constexpr int kBs = 16;

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto m = model::DecoderModel::Load("models/stories260K");
    ASSERT_TRUE(m.ok()) << m.status() << " (run scripts/setup-model.sh)";
    model_ = m->release();
  }
  static void TearDownTestSuite() { delete model_; }

  static std::vector<int32_t> Offline(const std::vector<int32_t>& prompt, int max_tokens) {
    return testing_util::OfflineGreedy(*model_, prompt, max_tokens);
  }

  static std::vector<int32_t> Prompt(int n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> p = {1};
    for (int i = 1; i < n; ++i) p.push_back(3 + static_cast<int32_t>(rng() % 500));
    return p;
  }

  static v1::SchedulerMessage Add(uint64_t id, const std::vector<int32_t>& tokens, int num_prompt, int computed,
                                  std::vector<int32_t> blocks, int max_new) {
    return testing_util::MakeAdd(id, tokens, num_prompt, computed, blocks, max_new);
  }

  static std::vector<int32_t> Range(int begin, int n) {
    std::vector<int32_t> v(n);
    for (int i = 0; i < n; ++i) v[i] = begin + i;
    return v;
  }

  static model::DecoderModel* model_;
};
model::DecoderModel* EngineTest::model_ = nullptr;

TEST_F(EngineTest, ColocatedMixedBatchesMatchOffline) {
  auto cache = model::KvCache::Create(model_->config(), 256, kBs, kernels::CpuBackend());
  ASSERT_TRUE(cache.ok());
  std::map<uint64_t, std::vector<int32_t>> got;
  std::map<uint64_t, bool> finished;
  EngineOptions opts;
  opts.role = v1::WORKER_ROLE_COLOCATED;
  opts.max_batch_tokens = 37;  // forces chunked prefill mixed with other requests' decode tokens
  Engine engine(*model_, **cache, opts, nullptr, [&](v1::WorkerMessage m) {
    ASSERT_EQ(m.step().failures_size(), 0) << m.step().failures(0).message();
    for (const auto& t : m.step().tokens()) {
      got[t.request_id()].push_back(t.token_id());
      if (t.finished()) finished[t.request_id()] = true;
    }
  });
  const std::vector<int> lens = {5, 70, 16, 33, 120};
  const int max_new = 24;
  int next_block = 0;
  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < lens.size(); ++i) {
    prompts.push_back(Prompt(lens[i], static_cast<uint32_t>(i)));
    const int nblocks = (lens[i] + max_new + kBs - 1) / kBs;
    engine.Post(Add(i + 1, prompts.back(), lens[i], 0, Range(next_block, nblocks), max_new));
    next_block += nblocks;
    engine.Step();  // requests arrive while others run
  }
  for (int i = 0; i < 500 && engine.Step(); ++i) {
  }
  for (size_t i = 0; i < lens.size(); ++i) {
    EXPECT_TRUE(finished[i + 1]);
    EXPECT_EQ(got[i + 1], Offline(prompts[i], max_new)) << "request " << i + 1;
  }
  EXPECT_EQ(engine.num_requests(), 0);
}

TEST_F(EngineTest, PrefillShipsKvToDecodeOverInprocTransport) {
  auto pcache = model::KvCache::Create(model_->config(), 64, kBs, kernels::CpuBackend());
  auto dcache = model::KvCache::Create(model_->config(), 64, kBs, kernels::CpuBackend());
  ASSERT_TRUE(pcache.ok() && dcache.ok());
  KvCacheStore dstore(**dcache, model_->config());
  std::vector<std::pair<uint64_t, uint32_t>> ready;
  transport::ReceiverCallbacks cb;
  cb.on_ready = [&](uint64_t id, uint32_t attempt) { ready.emplace_back(id, attempt); };
  cb.on_failed = [&](uint64_t, uint32_t, const std::string& why) { ADD_FAILURE() << why; };
  auto receiver = transport::CreateKvReceiver("inproc://engine-test-decode", {}, dstore, cb);
  ASSERT_TRUE(receiver.ok()) << receiver.status();
  transport::TransportOptions sopts;
  sopts.geometry = dstore.geometry();
  auto sender = transport::CreateKvSender(sopts);

  const std::vector<int32_t> prompt = Prompt(75, 42);  // 5 blocks, last one partial
  const int max_new = 20;
  const std::vector<int32_t> p_blocks = {9, 3, 7, 1, 12};
  const std::vector<int32_t> d_blocks = {30, 31, 20, 21, 40, 41};  // room for decode growth
  (*receiver)->Expect(7, 1, std::vector<int32_t>(d_blocks.begin(), d_blocks.begin() + 5));

  std::vector<int32_t> first;
  std::atomic<bool> sent = false;
  EngineOptions popts;
  popts.role = v1::WORKER_ROLE_PREFILL;
  popts.max_batch_tokens = 32;  // three chunks: every layer's KV is shipped per chunk
  Engine prefill(*model_, **pcache, popts, sender.get(), [&](v1::WorkerMessage m) {
    if (m.has_kv_sent()) sent = true;
    for (const auto& t : m.step().tokens()) first.push_back(t.token_id());
    ASSERT_EQ(m.step().failures_size(), 0) << m.step().failures(0).message();
  });
  v1::SchedulerMessage add = Add(7, prompt, 75, 0, p_blocks, max_new);
  auto* target = add.mutable_add()->mutable_kv_target();
  target->set_address("inproc://engine-test-decode");
  for (int32_t b : d_blocks) target->add_blocks(b);
  prefill.Post(add);
  while (prefill.Step()) {
  }
  for (int i = 0; i < 200 && !sent; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_TRUE(sent);
  ASSERT_EQ(first.size(), 1u);
  ASSERT_EQ(ready, (std::vector<std::pair<uint64_t, uint32_t>>{{7, 1}}));

  std::vector<int32_t> got = first;
  EngineOptions dopts;
  dopts.role = v1::WORKER_ROLE_DECODE;
  Engine decode(*model_, **dcache, dopts, nullptr, [&](v1::WorkerMessage m) {
    for (const auto& t : m.step().tokens()) got.push_back(t.token_id());
  });
  std::vector<int32_t> tokens = prompt;
  tokens.push_back(first[0]);
  decode.Post(Add(7, tokens, 75, 75, d_blocks, max_new - 1));
  while (decode.Step()) {
  }
  EXPECT_EQ(got, Offline(prompt, max_new));
}

TEST_F(EngineTest, StallsWithoutBlocksUntilAppended) {
  auto cache = model::KvCache::Create(model_->config(), 16, kBs, kernels::CpuBackend());
  std::vector<int32_t> got;
  Engine engine(*model_, **cache, EngineOptions{}, nullptr, [&](v1::WorkerMessage m) {
    for (const auto& t : m.step().tokens()) got.push_back(t.token_id());
  });
  const std::vector<int32_t> prompt = Prompt(10, 5);
  engine.Post(Add(1, prompt, 10, 0, {4}, 30));  // one block: room for 16 tokens
  while (engine.Step()) {
  }
  EXPECT_EQ(got.size(), 7u);  // positions 10..15 computed, then no slot for the 17th token
  v1::SchedulerMessage append;
  append.mutable_append()->set_request_id(1);
  append.mutable_append()->set_attempt(1);
  append.mutable_append()->add_blocks(8);
  append.mutable_append()->add_blocks(2);
  engine.Post(append);
  while (engine.Step()) {
  }
  EXPECT_EQ(got, Offline(prompt, 30));
}

// The decode worker accepts a transfer into reused blocks / state slots only after the engine has
// applied earlier removes: WaitForDeltas returns once they are.
TEST_F(EngineTest, WaitForDeltasReturnsOnceRemovesAreApplied) {
  auto cache = model::KvCache::Create(model_->config(), 16, kBs, kernels::CpuBackend());
  ASSERT_TRUE(cache.ok());
  Engine engine(*model_, **cache, EngineOptions{}, nullptr, [](v1::WorkerMessage) {});
  std::thread run([&] { engine.Run(); });
  engine.WaitForDeltas();  // nothing posted: returns at once
  engine.Post(Add(1, Prompt(10, 9), 10, 0, {4}, 30));  // stalls at 16 tokens: stays running
  engine.WaitForDeltas();
  EXPECT_EQ(engine.num_requests(), 1);
  v1::SchedulerMessage remove;
  remove.mutable_remove()->set_request_id(1);
  remove.mutable_remove()->set_attempt(1);
  engine.Post(remove);
  engine.WaitForDeltas();
  EXPECT_EQ(engine.num_requests(), 0);
  engine.Stop();
  run.join();
  engine.WaitForDeltas();  // stopped: never blocks
}

TEST_F(EngineTest, BadPlanFailsTheRequestNotTheProcess) {
  auto cache = model::KvCache::Create(model_->config(), 8, kBs, kernels::CpuBackend());
  std::vector<std::string> failures;
  Engine engine(*model_, **cache, EngineOptions{}, nullptr, [&](v1::WorkerMessage m) {
    for (const auto& f : m.step().failures()) failures.push_back(f.message());
  });
  engine.Post(Add(1, {1, 2, 3}, 3, 0, {99}, 4));        // block outside the pool
  engine.Post(Add(2, {1, 70000}, 2, 0, {0}, 4));        // token outside the vocabulary
  engine.Post(Add(3, {1, 2}, 2, 5, {0}, 4));            // computed past the end
  engine.Step();
  EXPECT_EQ(failures.size(), 3u);
  EXPECT_EQ(engine.num_requests(), 0);
}

}  // namespace
}  // namespace cleave::worker
