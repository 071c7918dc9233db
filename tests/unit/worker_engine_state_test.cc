// The worker engine with models that carry Mamba state (Mamba, Jamba): several requests prefilled
// in chunks on a prefill engine, each in its own state slot, their KV and conv/SSM state shipped
// over the in-process transport into other slots of a decode engine, which continues them. Tokens
// must equal offline generation; a bad slot fails the request, not the process.
#include <atomic>
#include <chrono>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "cleave/model/decoder.h"
#include "cleave/model/generator.h"
#include "cleave/transport/kv_transport.h"
#include "cleave/worker/engine.h"
#include "engine_test_util.h"
#include "gtest/gtest.h"

namespace cleave::worker {
namespace {

constexpr int kBs = 16;

std::vector<int32_t> Prompt(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p;
  for (int i = 0; i < n; ++i) p.push_back(3 + static_cast<int32_t>(rng() % 250));
  return p;
}

v1::SchedulerMessage Add(uint64_t id, const std::vector<int32_t>& tokens, int num_prompt, int computed,
                         const std::vector<int32_t>& blocks, int max_new, int slot) {
  return testing_util::MakeAdd(id, tokens, num_prompt, computed, blocks, max_new, slot);
}

class StateEngineTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    auto m = model::DecoderModel::Load(std::string("tests/data/golden/") + GetParam());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    ASSERT_TRUE(model_->config().has_ssm_state());
  }

  std::vector<int32_t> Offline(const std::vector<int32_t>& prompt, int max_tokens) {
    return testing_util::OfflineGreedy(*model_, prompt, max_tokens);
  }

  std::unique_ptr<model::DecoderModel> model_;
};

TEST_P(StateEngineTest, PrefillShipsStateToDecodeSlots) {
  const model::ModelConfig& c = model_->config();
  auto pcache = model::KvCache::Create(c, 64, kBs, kernels::CpuBackend(), /*num_state_slots=*/3);
  auto dcache = model::KvCache::Create(c, 64, kBs, kernels::CpuBackend(), /*num_state_slots=*/5);
  ASSERT_TRUE(pcache.ok() && dcache.ok());
  KvCacheStore dstore(**dcache, c);
  std::map<uint64_t, int> ready;
  transport::ReceiverCallbacks cb;
  cb.on_ready = [&](uint64_t id, uint32_t) { ++ready[id]; };
  cb.on_failed = [&](uint64_t, uint32_t, const std::string& why) { ADD_FAILURE() << why; };
  const std::string addr = std::string("inproc://state-engine-") + GetParam();
  auto receiver = transport::CreateKvReceiver(addr, {}, dstore, cb);
  ASSERT_TRUE(receiver.ok()) << receiver.status();
  transport::TransportOptions sopts;
  sopts.geometry = dstore.geometry();
  sopts.geometry.num_blocks = 0;
  sopts.geometry.num_state_slots = 0;
  auto sender = transport::CreateKvSender(sopts);

  // Three requests at once, prefilled in 24-token chunks (the 70-token one takes 3 chunks),
  // from prefill slots {2, 0, 1} into decode slots {4, 1, 3}.
  const std::vector<int> lens = {70, 9, 33};
  const std::vector<int> p_slots = {2, 0, 1}, d_slots = {4, 1, 3};
  const int max_new = 12;
  std::vector<std::vector<int32_t>> prompts, p_blocks, d_blocks;
  std::map<uint64_t, std::vector<int32_t>> got;
  std::atomic<int> sent = 0;
  EngineOptions popts;
  popts.role = v1::WORKER_ROLE_PREFILL;
  popts.max_batch_tokens = 24;
  Engine prefill(*model_, **pcache, popts, sender.get(), [&](v1::WorkerMessage m) {
    if (m.has_kv_sent()) ++sent;
    for (const auto& t : m.step().tokens()) got[t.request_id()].push_back(t.token_id());
    ASSERT_EQ(m.step().failures_size(), 0) << m.step().failures(0).message();
  });
  int next_p = 0, next_d = 0;
  for (size_t i = 0; i < lens.size(); ++i) {
    prompts.push_back(Prompt(lens[i], 100 + static_cast<uint32_t>(i)));
    const int pn = (lens[i] + kBs - 1) / kBs, dn = (lens[i] + max_new + kBs - 1) / kBs;
    p_blocks.emplace_back();
    d_blocks.emplace_back();
    for (int b = 0; b < pn; ++b) p_blocks.back().push_back(next_p++);
    for (int b = 0; b < dn; ++b) d_blocks.back().push_back(next_d++);
    (*receiver)->Expect(i + 1, 1, std::vector<int32_t>(d_blocks.back().begin(), d_blocks.back().begin() + pn),
                        d_slots[i]);
    v1::SchedulerMessage add = Add(i + 1, prompts.back(), lens[i], 0, p_blocks.back(), max_new, p_slots[i]);
    auto* target = add.mutable_add()->mutable_kv_target();
    target->set_address(addr);
    for (int32_t b : d_blocks.back()) target->add_blocks(b);
    target->set_state_slot(d_slots[i]);
    prefill.Post(add);
  }
  while (prefill.Step()) {
  }
  for (int i = 0; i < 400 && sent < 3; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_EQ(sent, 3);
  EXPECT_EQ(ready, (std::map<uint64_t, int>{{1, 1}, {2, 1}, {3, 1}}));

  EngineOptions dopts;
  dopts.role = v1::WORKER_ROLE_DECODE;
  Engine decode(*model_, **dcache, dopts, nullptr, [&](v1::WorkerMessage m) {
    ASSERT_EQ(m.step().failures_size(), 0) << m.step().failures(0).message();
    for (const auto& t : m.step().tokens()) got[t.request_id()].push_back(t.token_id());
  });
  for (size_t i = 0; i < lens.size(); ++i) {
    std::vector<int32_t> tokens = prompts[i];
    ASSERT_EQ(got[i + 1].size(), 1u);
    tokens.push_back(got[i + 1][0]);
    decode.Post(Add(i + 1, tokens, lens[i], lens[i], d_blocks[i], max_new - 1, d_slots[i]));
  }
  while (decode.Step()) {
  }
  for (size_t i = 0; i < lens.size(); ++i) {
    EXPECT_EQ(got[i + 1], Offline(prompts[i], max_new)) << GetParam() << " request " << i + 1;
  }
}

TEST_P(StateEngineTest, BadStateSlotFailsTheRequest) {
  auto cache = model::KvCache::Create(model_->config(), 8, kBs, kernels::CpuBackend(), 2);
  ASSERT_TRUE(cache.ok());
  std::vector<std::string> failures;
  std::vector<int32_t> tokens;
  Engine engine(*model_, **cache, EngineOptions{}, nullptr, [&](v1::WorkerMessage m) {
    for (const auto& f : m.step().failures()) failures.push_back(f.message());
    for (const auto& t : m.step().tokens()) tokens.push_back(t.token_id());
  });
  engine.Post(Add(1, {5, 6, 7}, 3, 0, {0}, 2, 2));   // slot outside the pool
  engine.Post(Add(2, {5, 6, 7}, 3, 0, {1}, 2, -1));  // no slot for a stateful model
  engine.Post(Add(3, {5, 6, 7}, 3, 0, {2}, 2, 1));   // fine
  while (engine.Step()) {
  }
  ASSERT_EQ(failures.size(), 2u);
  EXPECT_NE(failures[0].find("state slot"), std::string::npos) << failures[0];
  EXPECT_EQ(tokens, Offline({5, 6, 7}, 2));
  EXPECT_EQ(engine.num_requests(), 0);
}

INSTANTIATE_TEST_SUITE_P(Families, StateEngineTest, ::testing::Values("mamba", "jamba"));

}  // namespace
}  // namespace cleave::worker
