// SchedulerCore in colocated mode: placement, growth, event batching, prefix-cache hits,
// preemption by recompute, PRIORITY preemption at placement, FCFS head-of-line blocking.
#include <gtest/gtest.h>

#include <vector>

#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/testing/fake_messages.h"

namespace cleave::scheduler {
namespace {

using testing::BlocksNotAllFree;
using testing::Iota;
using testing::MakeSubmit;
using testing::Registration;
using testing::Sent;
using testing::StepMsg;
using testing::Token;
using testing::TokenMsg;
using testing::WorkerSpec;

constexpr FrontendId kFe = 9;

std::vector<int32_t> Ids(const google::protobuf::RepeatedField<int32_t>& f) {
  return std::vector<int32_t>(f.begin(), f.end());
}

class ColocatedTest : public ::testing::Test {
 protected:
  void Start(int blocks, Policy policy = Policy::kFcfs, int lookahead = 4, int max_running = 64) {
    SchedulerConfig config;
    config.policy = policy;
    config.decode_lookahead_tokens = lookahead;
    core_ = std::make_unique<SchedulerCore>(config);
    WorkerSpec spec;
    spec.num_kv_blocks = blocks;
    spec.max_running = max_running;
    spec.name = "colocated-0";
    w_ = *core_->AddWorker(Registration(spec), 0);
  }
  Sent Take() { return Sent(core_->TakeOutbox()); }
  void Send(const v1::WorkerMessage& m) { core_->OnWorkerMessage(w_, m, 0); }
  // Submits, schedules, and returns the AddRequests sent.
  std::vector<v1::AddRequest> SubmitAndSchedule(uint64_t client, std::vector<int32_t> prompt,
                                                int max_tokens, int priority = 0) {
    core_->Submit(kFe, MakeSubmit(client, prompt, max_tokens, priority), 0);
    core_->Schedule(0);
    return Take().adds(w_);
  }
  int Used() { return core_->Stats().workers(0).used_blocks(); }
  int Free() { return core_->Stats().workers(0).free_blocks(); }

  std::unique_ptr<SchedulerCore> core_;
  WorkerId w_ = 0;
};

TEST_F(ColocatedTest, Flow) {
  Start(64);
  const auto adds = SubmitAndSchedule(1, Iota(6), 10);
  ASSERT_EQ(adds.size(), 1u);
  const v1::AddRequest& add = adds[0];
  EXPECT_EQ(add.blocks_size(), 2);  // ceil((6 + 1) / 4)
  EXPECT_EQ(add.num_computed_tokens(), 0);
  EXPECT_EQ(add.num_prompt_tokens(), 6);
  EXPECT_EQ(add.max_new_tokens(), 10);
  EXPECT_FALSE(add.has_kv_target());
  const uint64_t id = add.request_id();
  Send(TokenMsg(id, 0, 1));  // len 7: len + 4 = 11 -> 3 blocks
  Sent grown = Take();
  ASSERT_EQ(grown.appends(w_).size(), 1u);
  EXPECT_EQ(grown.appends(w_)[0].blocks_size(), 1);
  EXPECT_EQ(grown.events(kFe).at(0).tokens(0).token_id(), 1);
  EXPECT_EQ(Used(), 3);
  Send(TokenMsg(id, 0, 2, true));
  EXPECT_TRUE(Take().events(kFe).at(0).finished());
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(ColocatedTest, TokensOfOneStepAreBatchedPerRequest) {
  Start(64);
  const uint64_t a = SubmitAndSchedule(1, Iota(4), 10).at(0).request_id();
  const uint64_t b = SubmitAndSchedule(2, Iota(4, 900), 10).at(0).request_id();
  v1::WorkerMessage step = StepMsg({{a, 0, 11}, {b, 0, 21}, {a, 0, 12}, {b, 0, 22, true}});
  step.mutable_step()->mutable_tokens(0)->add_top_token_ids(11);
  step.mutable_step()->mutable_tokens(0)->add_top_logprobs(-0.1f);
  Send(step);
  Sent sent = Take();
  const auto events = sent.events(kFe);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].client_id(), 1u);
  ASSERT_EQ(events[0].tokens_size(), 2);
  EXPECT_EQ(events[0].tokens(0).token_id(), 11);
  EXPECT_EQ(events[0].tokens(1).token_id(), 12);
  EXPECT_EQ(Ids(events[0].tokens(0).top_token_ids()), std::vector<int32_t>{11});
  EXPECT_FLOAT_EQ(events[0].tokens(0).top_logprobs(0), -0.1f);
  EXPECT_EQ(events[1].client_id(), 2u);
  EXPECT_EQ(events[1].tokens_size(), 2);
  EXPECT_TRUE(events[1].finished());
  EXPECT_FALSE(events[0].finished());
  // One AppendBlocks for a's two tokens.
  EXPECT_EQ(sent.appends(w_).size(), 1u);
}

TEST_F(ColocatedTest, PrefixHitSharesBlocksAndFreesOnce) {
  Start(64);
  const v1::AddRequest a = SubmitAndSchedule(1, Iota(20), 8).at(0);
  Send(TokenMsg(a.request_id(), 0, 1));  // the prompt's KV is computed: its blocks are cached
  (void)Take();
  std::vector<int32_t> prompt = Iota(16);
  prompt.insert(prompt.end(), {7, 7, 7});
  const v1::AddRequest b = SubmitAndSchedule(2, prompt, 8).at(0);
  EXPECT_EQ(b.num_computed_tokens(), 16);
  EXPECT_EQ(std::vector<int32_t>(b.blocks().begin(), b.blocks().begin() + 4),
            std::vector<int32_t>(a.blocks().begin(), a.blocks().begin() + 4));
  EXPECT_EQ(core_->Stats().prefix_cache_hit_tokens(), 16u);
  const int used = Used();
  Send(TokenMsg(a.request_id(), 0, 2, true));
  EXPECT_LT(Used(), used);
  EXPECT_GT(Used(), 0);
  Send(TokenMsg(b.request_id(), 0, 2, true));
  (void)Take();
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
  EXPECT_GE(core_->Stats().workers(0).cached_blocks(), 5);
}

TEST_F(ColocatedTest, GeneratedTokensWithComputedKvAreCached) {
  Start(64);
  const uint64_t a = SubmitAndSchedule(1, Iota(8), 8).at(0).request_id();
  for (int i = 0; i < 7; ++i) Send(TokenMsg(a, 0, 500 + i));
  Send(TokenMsg(a, 0, 507, true));  // 16 tokens; KV computed for the first 15
  (void)Take();
  std::vector<int32_t> prompt = Iota(8);
  for (int i = 0; i < 8; ++i) prompt.push_back(500 + i);
  prompt.insert(prompt.end(), {1, 2, 3, 4});
  const v1::AddRequest b = SubmitAndSchedule(2, prompt, 4).at(0);
  // Blocks 0-2 (12 tokens) are full and computed; block 3 lacks the last token's KV.
  EXPECT_EQ(b.num_computed_tokens(), 12);
}

TEST_F(ColocatedTest, PreemptionByRecomputeWhenBlocksRunOut) {
  Start(/*blocks=*/5, Policy::kFcfs, /*lookahead=*/1);
  const uint64_t a = SubmitAndSchedule(1, Iota(7), 10).at(0).request_id();
  const uint64_t b = SubmitAndSchedule(2, Iota(7, 800), 10).at(0).request_id();
  EXPECT_EQ(Free(), 1);
  Send(TokenMsg(a, 0, 31));  // a takes the last free block
  EXPECT_EQ(Take().appends(w_).size(), 1u);
  Send(TokenMsg(b, 0, 41));  // b needs one, none is free: b arrived last, b goes
  Sent sent = Take();
  ASSERT_EQ(sent.events(kFe).size(), 1u);  // its token still streams
  EXPECT_EQ(sent.events(kFe)[0].tokens(0).token_id(), 41);
  ASSERT_EQ(sent.removes(w_).size(), 1u);
  EXPECT_EQ(sent.removes(w_)[0].request_id(), b);
  EXPECT_EQ(sent.removes(w_)[0].attempt(), 0u);
  EXPECT_EQ(sent.removes(w_)[0].reason(), v1::REMOVE_REASON_PREEMPTED);
  EXPECT_TRUE(sent.appends(w_).empty());
  auto stats = core_->Stats();
  EXPECT_EQ(stats.num_preempted(), 1u);
  EXPECT_EQ(stats.num_waiting(), 1);
  // Late results of the old attempt are dropped.
  Send(TokenMsg(b, 0, 42));
  EXPECT_TRUE(Take().empty());
  core_->Schedule(0);
  EXPECT_TRUE(Take().adds(w_).empty());  // 3 blocks needed, 2 free: it waits
  Send(TokenMsg(a, 0, 32, true));
  core_->Schedule(0);
  Sent resumed = Take();
  ASSERT_EQ(resumed.adds(w_).size(), 1u);
  const v1::AddRequest add = resumed.adds(w_)[0];
  EXPECT_EQ(add.request_id(), b);
  EXPECT_EQ(add.attempt(), 1u);
  std::vector<int32_t> tokens = Iota(7, 800);
  tokens.push_back(41);
  EXPECT_EQ(Ids(add.token_ids()), tokens);
  EXPECT_EQ(add.num_prompt_tokens(), 7);
  EXPECT_EQ(add.num_computed_tokens(), 4);  // its first block stayed cached
  EXPECT_EQ(add.max_new_tokens(), 9);
  EXPECT_EQ(add.rng_skip(), 1u);
  // The new attempt streams only new tokens.
  Send(TokenMsg(b, 1, 43));
  Sent next = Take();
  ASSERT_EQ(next.events(kFe).size(), 1u);
  EXPECT_EQ(next.events(kFe)[0].tokens_size(), 1);
  EXPECT_EQ(next.events(kFe)[0].tokens(0).token_id(), 43);
  Send(TokenMsg(b, 1, 44, true));
  (void)Take();
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(ColocatedTest, GrowthPreemptsTheLatestArrivalFirst) {
  Start(/*blocks=*/4, Policy::kFcfs, /*lookahead=*/1);
  const uint64_t a = SubmitAndSchedule(1, Iota(7), 10).at(0).request_id();
  const uint64_t b = SubmitAndSchedule(2, Iota(7, 800), 10).at(0).request_id();
  EXPECT_EQ(Free(), 0);
  Send(TokenMsg(a, 0, 31));
  Sent sent = Take();
  ASSERT_EQ(sent.removes(w_).size(), 1u);
  EXPECT_EQ(sent.removes(w_)[0].request_id(), b);
  ASSERT_EQ(sent.appends(w_).size(), 1u);
  EXPECT_EQ(sent.appends(w_)[0].request_id(), a);
  // The removal goes out before the append that reuses its block.
  EXPECT_TRUE(sent.box.to_workers[0].second.has_remove());
}

TEST_F(ColocatedTest, PriorityPolicyPreemptsLowerPriorityAtPlacement) {
  Start(/*blocks=*/4, Policy::kPriority);
  const uint64_t low = SubmitAndSchedule(1, Iota(15), 10, /*priority=*/5).at(0).request_id();
  EXPECT_EQ(Free(), 0);
  // Equal priority never preempts: it waits.
  EXPECT_TRUE(SubmitAndSchedule(2, Iota(3, 700), 10, 5).empty());
  // Higher priority (lower value) does.
  core_->Submit(kFe, MakeSubmit(3, Iota(3, 900), 10, /*priority=*/0), 0);
  core_->Schedule(0);
  Sent sent = Take();
  ASSERT_EQ(sent.removes(w_).size(), 1u);
  EXPECT_EQ(sent.removes(w_)[0].request_id(), low);
  EXPECT_EQ(sent.removes(w_)[0].reason(), v1::REMOVE_REASON_PREEMPTED);
  // The high-priority request, then (room left) the waiting priority-5 one in arrival order:
  // client 2 has the older arrival but `low` went back to the front of the class.
  const auto adds = sent.adds(w_);
  ASSERT_GE(adds.size(), 1u);
  EXPECT_EQ(adds[0].token_ids(0), 900);
  EXPECT_TRUE(sent.box.to_workers[0].second.has_remove());
  EXPECT_EQ(core_->Stats().num_preempted(), 1u);
}

TEST_F(ColocatedTest, PriorityOrderAmongWaiting) {
  Start(/*blocks=*/4, Policy::kPriority);
  const uint64_t big = SubmitAndSchedule(1, Iota(15), 10, 0).at(0).request_id();
  EXPECT_TRUE(SubmitAndSchedule(2, Iota(3, 200), 10, 7).empty());
  EXPECT_TRUE(SubmitAndSchedule(3, Iota(3, 300), 10, 1).empty());
  EXPECT_TRUE(SubmitAndSchedule(4, Iota(3, 400), 10, 1).empty());
  Send(TokenMsg(big, 0, 1, true));
  core_->Schedule(0);
  const auto adds = Take().adds(w_);
  ASSERT_EQ(adds.size(), 3u);
  EXPECT_EQ(adds[0].token_ids(0), 300);
  EXPECT_EQ(adds[1].token_ids(0), 400);
  EXPECT_EQ(adds[2].token_ids(0), 200);
}

TEST_F(ColocatedTest, FcfsHeadOfLineBlocks) {
  Start(/*blocks=*/8);
  const uint64_t a = SubmitAndSchedule(1, Iota(23), 10).at(0).request_id();       // 6 blocks
  EXPECT_TRUE(SubmitAndSchedule(2, Iota(15, 200), 10, /*priority=*/-5).empty());  // 4: waits
  // 1 block would fit, but FCFS does not skip ahead (and ignores priority).
  EXPECT_TRUE(SubmitAndSchedule(3, Iota(3, 300), 10).empty());
  EXPECT_EQ(core_->Stats().num_waiting(), 2);
  EXPECT_EQ(core_->Stats().num_preempted(), 0u);
  Send(TokenMsg(a, 0, 1, true));
  core_->Schedule(0);
  const auto adds = Take().adds(w_);
  ASSERT_EQ(adds.size(), 2u);
  EXPECT_EQ(adds[0].token_ids(0), 200);
  EXPECT_EQ(adds[1].token_ids(0), 300);
}

TEST_F(ColocatedTest, MaxRunningIsRespected) {
  Start(/*blocks=*/64, Policy::kFcfs, 4, /*max_running=*/1);
  const uint64_t a = SubmitAndSchedule(1, Iota(3), 10).at(0).request_id();
  EXPECT_TRUE(SubmitAndSchedule(2, Iota(3), 10).empty());
  Send(TokenMsg(a, 0, 1, true));
  core_->Schedule(0);
  EXPECT_EQ(Take().adds(w_).size(), 1u);
}

TEST_F(ColocatedTest, WorkerFailureRerunsOrFails) {
  Start(64);
  const uint64_t a = SubmitAndSchedule(1, Iota(3), 10).at(0).request_id();
  Send(testing::FailureMsg(a, 0, "nan in logits"));
  Sent sent = Take();
  EXPECT_TRUE(sent.events(kFe).empty());  // nothing streamed: re-run
  EXPECT_TRUE(sent.removes(w_).empty());
  core_->Schedule(0);
  EXPECT_EQ(Take().adds(w_).at(0).attempt(), 1u);
  Send(TokenMsg(a, 1, 5));
  (void)Take();
  Send(testing::FailureMsg(a, 1, "nan in logits"));
  Sent failed = Take();
  ASSERT_EQ(failed.events(kFe).size(), 1u);
  EXPECT_EQ(failed.events(kFe)[0].error_code(), 13);
  EXPECT_NE(failed.events(kFe)[0].error_message().find("nan in logits"), std::string::npos);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(ColocatedTest, RerunsAreBounded) {
  Start(64);
  const uint64_t a = SubmitAndSchedule(1, Iota(3), 10).at(0).request_id();
  for (uint32_t attempt = 0; attempt < 3; ++attempt) {
    Send(testing::FailureMsg(a, attempt, "crash"));
    core_->Schedule(0);
    EXPECT_EQ(Take().adds(w_).at(0).attempt(), attempt + 1);
  }
  Send(testing::FailureMsg(a, 3, "crash"));
  EXPECT_EQ(Take().events(kFe).at(0).error_code(), 13);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

}  // namespace
}  // namespace cleave::scheduler
