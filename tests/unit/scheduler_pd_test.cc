// SchedulerCore in P/D mode, driven by fake prefill / decode worker messages: placement, the
// first token, KV hand-off in both orders, decode growth, finishing, failures, prefix hits.
#include <gtest/gtest.h>

#include <vector>

#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/testing/fake_messages.h"

namespace cleave::scheduler {
namespace {

using testing::BlocksNotAllFree;
using testing::Iota;
using testing::KvFailedMsg;
using testing::KvReadyMsg;
using testing::KvSentMsg;
using testing::MakeSubmit;
using testing::Registration;
using testing::Sent;
using testing::StatsOf;
using testing::TokenMsg;
using testing::WorkerSpec;

constexpr FrontendId kFe = 3;

std::vector<int32_t> Ids(const google::protobuf::RepeatedField<int32_t>& f) {
  return std::vector<int32_t>(f.begin(), f.end());
}

class PdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.decode_lookahead_tokens = 4;
    core_ = std::make_unique<SchedulerCore>(config_);
    p_ = AddWorker(v1::WORKER_ROLE_PREFILL, "prefill-0");
    d_ = AddWorker(v1::WORKER_ROLE_DECODE, "decode-0");
  }
  WorkerId AddWorker(v1::WorkerRole role, const std::string& name, int blocks = 64,
                     int max_batch_tokens = 256) {
    WorkerSpec spec;
    spec.role = role;
    spec.name = name;
    spec.num_kv_blocks = blocks;
    spec.max_batch_tokens = max_batch_tokens;
    auto id = core_->AddWorker(Registration(spec), 0);
    EXPECT_TRUE(id.ok()) << id.status();
    return *id;
  }
  Sent Take() { return Sent(core_->TakeOutbox()); }
  void Send(WorkerId w, const v1::WorkerMessage& m) { core_->OnWorkerMessage(w, m, 0); }

  // Submits and schedules; returns the AddRequest the prefill worker got.
  v1::AddRequest SubmitAndPlace(uint64_t client, std::vector<int32_t> prompt, int max_tokens,
                                WorkerId prefill = 0) {
    core_->Submit(kFe, MakeSubmit(client, prompt, max_tokens), 0);
    core_->Schedule(0);
    Sent sent = Take();
    auto adds = sent.adds(prefill ? prefill : p_);
    EXPECT_EQ(adds.size(), 1u);
    return adds.empty() ? v1::AddRequest() : adds[0];
  }

  SchedulerConfig config_;
  std::unique_ptr<SchedulerCore> core_;
  WorkerId p_ = 0;
  WorkerId d_ = 0;
};

TEST_F(PdTest, FlowWithKvReadyAfterFirstToken) {
  core_->Submit(kFe, MakeSubmit(1, Iota(10), 20), 0);
  EXPECT_TRUE(Take().events(kFe).at(0).accepted());
  core_->Schedule(0);
  Sent placed = Take();
  ASSERT_EQ(placed.expects(d_).size(), 1u);
  ASSERT_EQ(placed.adds(p_).size(), 1u);
  EXPECT_TRUE(placed.events(kFe).empty());
  EXPECT_EQ(placed.box.to_workers[0].first, d_);  // the decode worker hears first
  const v1::AddRequest add = placed.adds(p_)[0];
  const uint64_t id = add.request_id();
  EXPECT_EQ(add.attempt(), 0u);
  EXPECT_EQ(Ids(add.token_ids()), Iota(10));
  EXPECT_EQ(add.num_prompt_tokens(), 10);
  EXPECT_EQ(add.num_computed_tokens(), 0);
  EXPECT_EQ(add.blocks_size(), 3);  // ceil(10 / 4)
  EXPECT_EQ(add.max_new_tokens(), 20);
  EXPECT_EQ(add.rng_skip(), 0u);
  EXPECT_EQ(add.kv_target().worker_id(), d_);
  EXPECT_EQ(add.kv_target().address(), "decode-0:7000");
  EXPECT_EQ(add.kv_target().blocks_size(), 3);  // ceil(11 / 4)
  EXPECT_EQ(add.kv_target().first_block(), 0);
  const v1::ExpectKv expect = placed.expects(d_)[0];
  EXPECT_EQ(expect.request_id(), id);
  EXPECT_EQ(expect.source_worker_id(), p_);
  EXPECT_EQ(Ids(expect.blocks()), Ids(add.kv_target().blocks()));
  auto stats = core_->Stats();
  EXPECT_EQ(StatsOf(stats, p_).used_blocks(), 3);
  EXPECT_EQ(StatsOf(stats, d_).used_blocks(), 3);
  EXPECT_EQ(StatsOf(stats, d_).num_running(), 1);
  EXPECT_EQ(stats.num_running(), 1);

  // First token: streamed at once (TTFT).
  Send(p_, TokenMsg(id, 0, 555));
  Sent first = Take();
  ASSERT_EQ(first.events(kFe).size(), 1u);
  EXPECT_EQ(first.events(kFe)[0].tokens(0).token_id(), 555);
  EXPECT_FLOAT_EQ(first.events(kFe)[0].tokens(0).logprob(), -0.5f);
  EXPECT_FALSE(first.events(kFe)[0].finished());
  EXPECT_EQ(first.num_worker_messages(), 0u);

  Send(p_, KvSentMsg(id, 0));
  EXPECT_EQ(Take().num_worker_messages(), 0u);
  stats = core_->Stats();
  EXPECT_EQ(StatsOf(stats, p_).used_blocks(), 0);
  EXPECT_EQ(StatsOf(stats, p_).cached_blocks(), 2);  // the prompt's full blocks stay cached
  EXPECT_EQ(StatsOf(stats, p_).num_running(), 0);

  Send(d_, KvReadyMsg(id, 0));
  Sent joined = Take();
  ASSERT_EQ(joined.adds(d_).size(), 1u);
  const v1::AddRequest dadd = joined.adds(d_)[0];
  std::vector<int32_t> tokens = Iota(10);
  tokens.push_back(555);
  EXPECT_EQ(Ids(dadd.token_ids()), tokens);
  EXPECT_EQ(dadd.num_prompt_tokens(), 10);
  EXPECT_EQ(dadd.num_computed_tokens(), 10);
  EXPECT_EQ(dadd.max_new_tokens(), 19);
  EXPECT_EQ(dadd.rng_skip(), 1u);
  EXPECT_FALSE(dadd.has_kv_target());
  // The table grew to cover len + lookahead = 15 tokens before the worker got it.
  ASSERT_EQ(dadd.blocks_size(), 4);
  EXPECT_EQ(std::vector<int32_t>(dadd.blocks().begin(), dadd.blocks().begin() + 3),
            Ids(expect.blocks()));

  // Decode: one AppendBlocks each time len + lookahead crosses a block.
  Send(d_, TokenMsg(id, 0, 6));  // len 12: covers 16
  EXPECT_TRUE(Take().appends(d_).empty());
  Send(d_, TokenMsg(id, 0, 7));  // len 13: needs 17 -> one more block
  Sent grown = Take();
  ASSERT_EQ(grown.appends(d_).size(), 1u);
  EXPECT_EQ(grown.appends(d_)[0].blocks_size(), 1);
  EXPECT_EQ(grown.appends(d_)[0].attempt(), 0u);
  EXPECT_EQ(grown.events(kFe).at(0).tokens(0).token_id(), 7);
  EXPECT_EQ(StatsOf(core_->Stats(), d_).used_blocks(), 5);

  Send(d_, TokenMsg(id, 0, 8, /*finished=*/true));
  Sent done = Take();
  ASSERT_EQ(done.events(kFe).size(), 1u);
  EXPECT_TRUE(done.events(kFe)[0].finished());
  EXPECT_FALSE(done.events(kFe)[0].finished_by_length());
  EXPECT_TRUE(done.removes(d_).empty());  // the worker ended it itself
  stats = core_->Stats();
  EXPECT_EQ(BlocksNotAllFree(stats), "");
  EXPECT_EQ(stats.num_finished(), 1u);
  EXPECT_EQ(stats.num_running(), 0);
  // Stale results after the end are ignored.
  Send(d_, TokenMsg(id, 0, 9));
  EXPECT_TRUE(Take().empty());
}

TEST_F(PdTest, KvReadyBeforeFirstToken) {
  const v1::AddRequest add = SubmitAndPlace(1, Iota(7), 5);
  const uint64_t id = add.request_id();
  Send(d_, KvReadyMsg(id, 0));
  EXPECT_TRUE(Take().empty());  // no first token yet: nothing to start
  Send(p_, TokenMsg(id, 0, 42));
  Sent sent = Take();
  ASSERT_EQ(sent.adds(d_).size(), 1u);
  EXPECT_EQ(sent.adds(d_)[0].token_ids_size(), 8);
  EXPECT_EQ(sent.adds(d_)[0].num_computed_tokens(), 7);
  EXPECT_EQ(sent.adds(d_)[0].max_new_tokens(), 4);
  EXPECT_EQ(sent.events(kFe).at(0).tokens(0).token_id(), 42);
  Send(p_, KvSentMsg(id, 0));
  EXPECT_EQ(StatsOf(core_->Stats(), p_).num_running(), 0);
  Send(d_, TokenMsg(id, 0, 1, true, true));
  Sent done = Take();
  EXPECT_TRUE(done.events(kFe).at(0).finished_by_length());
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(PdTest, FirstTokenFinishesTheRequest) {
  const uint64_t id = SubmitAndPlace(1, Iota(9), 4).request_id();
  Send(p_, TokenMsg(id, 0, 2, /*finished=*/true));  // EOS at once
  Sent sent = Take();
  ASSERT_EQ(sent.events(kFe).size(), 1u);
  EXPECT_TRUE(sent.events(kFe)[0].finished());
  ASSERT_EQ(sent.removes(d_).size(), 1u);  // the decode worker only ever expected the KV
  EXPECT_EQ(sent.removes(d_)[0].reason(), v1::REMOVE_REASON_FINISHED);
  EXPECT_TRUE(sent.removes(p_).empty());
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
  // The late KvSent and KvReady are stale.
  Send(p_, KvSentMsg(id, 0));
  Send(d_, KvReadyMsg(id, 0));
  EXPECT_TRUE(Take().empty());
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(PdTest, SchedulerEndsByLengthWhenTheWorkerDoesNot) {
  const uint64_t id = SubmitAndPlace(1, Iota(5), 3).request_id();
  Send(p_, TokenMsg(id, 0, 10));
  Send(p_, KvSentMsg(id, 0));
  Send(d_, KvReadyMsg(id, 0));
  (void)Take();
  Send(d_, TokenMsg(id, 0, 11));
  Send(d_, TokenMsg(id, 0, 12));  // the third token: max_tokens reached
  Sent sent = Take();
  ASSERT_EQ(sent.events(kFe).size(), 2u);
  EXPECT_TRUE(sent.events(kFe)[1].finished());
  EXPECT_TRUE(sent.events(kFe)[1].finished_by_length());
  ASSERT_EQ(sent.removes(d_).size(), 1u);
  EXPECT_EQ(sent.removes(d_)[0].reason(), v1::REMOVE_REASON_FINISHED);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(PdTest, StopTokenEndsTheRequest) {
  core_->Submit(
      kFe,
      [] {
        auto s = MakeSubmit(1, Iota(5), 50);
        s.add_stop_token_ids(99);
        return s;
      }(),
      0);
  core_->Schedule(0);
  const v1::AddRequest add = Take().adds(p_).at(0);
  EXPECT_EQ(Ids(add.stop_token_ids()), std::vector<int32_t>{99});
  Send(p_, TokenMsg(add.request_id(), 0, 99));  // the worker forgot to say finished
  Sent sent = Take();
  EXPECT_TRUE(sent.events(kFe).at(0).finished());
  EXPECT_FALSE(sent.events(kFe).at(0).finished_by_length());
  EXPECT_EQ(sent.removes(p_).size(), 1u);
  EXPECT_EQ(sent.removes(d_).size(), 1u);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(PdTest, KvFailedBeforeAnythingStreamedReruns) {
  const uint64_t id = SubmitAndPlace(1, Iota(6), 4).request_id();
  Send(d_, KvFailedMsg(id, 0, "connection reset"));
  Sent sent = Take();
  EXPECT_TRUE(sent.events(kFe).empty());
  ASSERT_EQ(sent.removes(p_).size(), 1u);
  EXPECT_TRUE(sent.removes(d_).empty());  // it dropped the transfer itself
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
  EXPECT_EQ(core_->Stats().num_waiting(), 1);
  core_->Schedule(0);
  Sent again = Take();
  ASSERT_EQ(again.adds(p_).size(), 1u);
  EXPECT_EQ(again.adds(p_)[0].attempt(), 1u);
  EXPECT_EQ(again.expects(d_).at(0).attempt(), 1u);
  // The old attempt's token is stale.
  Send(p_, TokenMsg(id, 0, 5));
  EXPECT_TRUE(Take().empty());
  Send(p_, TokenMsg(id, 1, 5, true));
  EXPECT_TRUE(Take().events(kFe).at(0).finished());
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(PdTest, KvFailedAfterFirstTokenFails) {
  const uint64_t id = SubmitAndPlace(1, Iota(6), 4).request_id();
  Send(p_, TokenMsg(id, 0, 5));
  (void)Take();
  Send(d_, KvFailedMsg(id, 0, "short frame"));
  Sent sent = Take();
  ASSERT_EQ(sent.events(kFe).size(), 1u);
  EXPECT_EQ(sent.events(kFe)[0].error_code(), 13);
  EXPECT_NE(sent.events(kFe)[0].error_message().find("short frame"), std::string::npos);
  ASSERT_EQ(sent.removes(p_).size(), 1u);  // still sending: told to stop
  EXPECT_EQ(sent.removes(p_)[0].reason(), v1::REMOVE_REASON_FAILED);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(PdTest, PrefillFailureReruns) {
  const uint64_t id = SubmitAndPlace(1, Iota(6), 4).request_id();
  Send(p_, testing::FailureMsg(id, 0, "out of memory"));
  Sent sent = Take();
  EXPECT_TRUE(sent.events(kFe).empty());
  EXPECT_EQ(sent.removes(d_).size(), 1u);
  EXPECT_TRUE(sent.removes(p_).empty());
  core_->Schedule(0);
  EXPECT_EQ(Take().adds(p_).at(0).attempt(), 1u);
}

TEST_F(PdTest, PrefixHitOnBothWorkers) {
  const std::vector<int32_t> prompt = Iota(17);
  const v1::AddRequest first = SubmitAndPlace(1, prompt, 2);
  const uint64_t a = first.request_id();
  Send(p_, TokenMsg(a, 0, 1));
  Send(p_, KvSentMsg(a, 0));
  Send(d_, KvReadyMsg(a, 0));
  (void)Take();

  // Same 16 leading tokens, another tail; the first request is still decoding.
  std::vector<int32_t> prompt2 = Iota(16);
  prompt2.push_back(7);
  prompt2.push_back(8);
  const v1::AddRequest second = SubmitAndPlace(2, prompt2, 2);
  EXPECT_EQ(second.num_computed_tokens(), 16);  // hit capped at (18 - 1) rounded down to 16
  EXPECT_EQ(second.kv_target().first_block(), 4);
  // The decode worker shares the first request's four prompt blocks.
  EXPECT_EQ(std::vector<int32_t>(second.kv_target().blocks().begin(),
                                 second.kv_target().blocks().begin() + 4),
            std::vector<int32_t>(first.kv_target().blocks().begin(),
                                 first.kv_target().blocks().begin() + 4));
  EXPECT_EQ(std::vector<int32_t>(second.blocks().begin(), second.blocks().begin() + 4),
            std::vector<int32_t>(first.blocks().begin(), first.blocks().begin() + 4));
  EXPECT_EQ(core_->Stats().prefix_cache_hit_tokens(), 16u);

  // The same prompt again: at least one token is always computed, so 3 blocks hit, not 4.
  const v1::AddRequest third = SubmitAndPlace(3, Iota(16), 2);
  EXPECT_EQ(third.num_computed_tokens(), 12);
  EXPECT_EQ(third.kv_target().first_block(), 3);

  // Everything ends; shared blocks are freed once, by their last user.
  const uint64_t b = second.request_id();
  const uint64_t c = third.request_id();
  Send(d_, TokenMsg(a, 0, 2, true));
  Send(p_, TokenMsg(b, 0, 3, true));
  Send(p_, KvSentMsg(c, 0));
  Send(p_, TokenMsg(c, 0, 3));
  Send(d_, KvReadyMsg(c, 0));
  Send(d_, TokenMsg(c, 0, 4, true));
  (void)Take();
  const auto stats = core_->Stats();
  EXPECT_EQ(BlocksNotAllFree(stats), "");
  EXPECT_GT(StatsOf(stats, p_).cached_blocks(), 0);
  EXPECT_GT(StatsOf(stats, d_).cached_blocks(), 0);
  EXPECT_EQ(stats.num_finished(), 3u);
}

TEST_F(PdTest, StaleAndMisdirectedMessagesAreIgnored) {
  const uint64_t id = SubmitAndPlace(1, Iota(6), 4).request_id();
  Send(d_, TokenMsg(id, 0, 5));        // decode worker, but the request is prefilling
  Send(p_, TokenMsg(id, 1, 5));        // future attempt
  Send(p_, TokenMsg(id + 100, 0, 5));  // unknown request
  Send(p_, KvReadyMsg(id, 0));         // KvReady from the prefill worker
  Send(d_, KvSentMsg(id, 0));          // KvSent from the decode worker
  Send(p_, KvFailedMsg(id, 0, "x"));   // KvFailed from the prefill worker
  Send(999, TokenMsg(id, 0, 5));       // unknown worker
  Send(d_, testing::FailureMsg(id, 7, "old"));
  v1::WorkerMessage hello;
  hello.set_hello_worker_id(p_);
  Send(p_, hello);
  Send(p_, v1::WorkerMessage());
  EXPECT_TRUE(Take().empty());
  Send(p_, TokenMsg(id, 0, 5));
  Send(p_, TokenMsg(id, 0, 6));  // a second token from the prefill worker: not its phase
  Sent sent = Take();
  ASSERT_EQ(sent.events(kFe).size(), 1u);
  EXPECT_EQ(sent.events(kFe)[0].tokens_size(), 1);
}

TEST_F(PdTest, RouterPicksDecodeWithMostFreeAndPrefillWithLongestHit) {
  const WorkerId d2 = AddWorker(v1::WORKER_ROLE_DECODE, "decode-1", /*blocks=*/128);
  const WorkerId p2 = AddWorker(v1::WORKER_ROLE_PREFILL, "prefill-1");
  const v1::AddRequest a = SubmitAndPlace(1, Iota(20), 2);  // ties on prefill: lowest id
  EXPECT_EQ(a.kv_target().worker_id(), d2);                 // 128 blocks beat 64
  Send(p_, KvSentMsg(a.request_id(), 0));                   // p_ now caches 5 blocks

  // p_ has a 20-token request queued, p2 none, but p_ holds the prefix.
  const v1::AddRequest b = SubmitAndPlace(2, Iota(24), 2, p_);
  EXPECT_EQ(b.num_computed_tokens(), 20);
  // Without a hit, the least queued prefill worker.
  core_->Submit(kFe, MakeSubmit(3, Iota(8, 5000), 2), 0);
  core_->Schedule(0);
  EXPECT_EQ(Take().adds(p2).size(), 1u);
}

TEST_F(PdTest, PrefillQueueCapSpreadsAndHoldsBack) {
  core_ = std::make_unique<SchedulerCore>(config_);
  const WorkerId p1 = AddWorker(v1::WORKER_ROLE_PREFILL, "p1", 64, /*max_batch_tokens=*/16);
  const WorkerId p2 = AddWorker(v1::WORKER_ROLE_PREFILL, "p2", 64, 16);
  const WorkerId d = AddWorker(v1::WORKER_ROLE_DECODE, "d", 256);
  (void)d;
  // Cap 4 * 16 = 64 queued prompt tokens per prefill worker (one prompt always fits an idle one).
  const uint64_t a = SubmitAndPlace(1, Iota(40, 1000), 2, p1).request_id();
  SubmitAndPlace(2, Iota(40, 2000), 2, p2);
  core_->Submit(kFe, MakeSubmit(3, Iota(40, 3000), 2), 0);
  core_->Schedule(0);
  Sent held = Take();
  EXPECT_TRUE(held.adds(p1).empty());
  EXPECT_TRUE(held.adds(p2).empty());
  EXPECT_EQ(core_->Stats().num_waiting(), 1);
  Send(p1, TokenMsg(a, 0, 1));  // p1's prompt is done: its queue drains
  core_->Schedule(0);
  EXPECT_EQ(Take().adds(p1).size(), 1u);
}

}  // namespace
}  // namespace cleave::scheduler
