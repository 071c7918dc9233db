// SchedulerCore with Mamba-model workers: every request placed on a worker holds one of its state
// slots (prefill and decode alike), the slot travels in AddRequest / KvTarget / ExpectKv, slots
// come back on finish, cancel, failure and preemption, a worker out of slots takes no more
// requests, and no prefix is reused (a cached KV prefix has no SSM state to resume from).
#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/testing/fake_messages.h"

namespace cleave::scheduler {
namespace {

using testing::FailureMsg;
using testing::Iota;
using testing::KvReadyMsg;
using testing::KvSentMsg;
using testing::MakeSubmit;
using testing::Registration;
using testing::Sent;
using testing::StatsOf;
using testing::TokenMsg;
using testing::WorkerSpec;

constexpr FrontendId kFe = 5;

class StateSlotsTest : public ::testing::Test {
 protected:
  WorkerId AddWorker(v1::WorkerRole role, const std::string& name, int slots, int blocks = 256) {
    WorkerSpec spec;
    spec.role = role;
    spec.name = name;
    spec.num_kv_blocks = blocks;
    spec.num_state_slots = slots;
    spec.max_running = 64;
    auto id = core_->AddWorker(Registration(spec), 0);
    EXPECT_TRUE(id.ok()) << id.status();
    return *id;
  }
  Sent Take() { return Sent(core_->TakeOutbox()); }
  int FreeSlots(WorkerId w) { return StatsOf(core_->Stats(), w).free_state_slots(); }

  SchedulerConfig config_;
  std::unique_ptr<SchedulerCore> core_ = std::make_unique<SchedulerCore>(config_);
};

TEST_F(StateSlotsTest, PdSlotsTravelAndReturn) {
  const WorkerId p = AddWorker(v1::WORKER_ROLE_PREFILL, "p", 2);
  const WorkerId d = AddWorker(v1::WORKER_ROLE_DECODE, "d", 3);
  EXPECT_EQ(StatsOf(core_->Stats(), d).num_state_slots(), 3);
  core_->Submit(kFe, MakeSubmit(1, Iota(9), 4), 0);
  core_->Submit(kFe, MakeSubmit(2, Iota(9), 4), 0);
  core_->Schedule(0);
  Sent placed = Take();
  const std::vector<v1::AddRequest> adds = placed.adds(p);
  const std::vector<v1::ExpectKv> expects = placed.expects(d);
  ASSERT_EQ(adds.size(), 2u);
  ASSERT_EQ(expects.size(), 2u);
  std::set<int> p_slots, d_slots;
  for (size_t i = 0; i < 2; ++i) {
    p_slots.insert(adds[i].state_slot());
    d_slots.insert(adds[i].kv_target().state_slot());
    EXPECT_EQ(expects[i].state_slot(), adds[i].kv_target().state_slot());
  }
  EXPECT_EQ(p_slots, (std::set<int>{0, 1}));
  EXPECT_EQ(d_slots, (std::set<int>{0, 1}));
  EXPECT_EQ(FreeSlots(p), 0);
  EXPECT_EQ(FreeSlots(d), 1);

  // The prefill worker is out of slots: a third request waits even with blocks free.
  core_->Submit(kFe, MakeSubmit(3, Iota(9), 4), 0);
  core_->Schedule(0);
  EXPECT_TRUE(Take().adds(p).empty());

  // Request 1 through prefill and hand-off: its prefill slot comes back, its decode slot is in
  // the decode AddRequest.
  const v1::AddRequest first = adds[0];
  const uint64_t id = first.request_id();
  core_->OnWorkerMessage(p, TokenMsg(id, 0, 7), 0);
  core_->OnWorkerMessage(p, KvSentMsg(id, 0), 0);
  core_->OnWorkerMessage(d, KvReadyMsg(id, 0), 0);
  Sent joined = Take();
  ASSERT_EQ(joined.adds(d).size(), 1u);
  EXPECT_EQ(joined.adds(d)[0].state_slot(), first.kv_target().state_slot());
  EXPECT_EQ(FreeSlots(p), 1);

  // The freed prefill slot goes to the waiting request.
  core_->Schedule(0);
  Sent third = Take();
  ASSERT_EQ(third.adds(p).size(), 1u);
  EXPECT_EQ(third.adds(p)[0].state_slot(), first.state_slot());
  EXPECT_EQ(FreeSlots(d), 0);

  // Finish request 1 on decode, fail request 2 on prefill, fail request 3: every slot returns.
  core_->OnWorkerMessage(d, TokenMsg(id, 0, 8, /*finished=*/true), 0);
  core_->OnWorkerMessage(p, FailureMsg(adds[1].request_id(), 0, "boom"), 0);
  core_->OnWorkerMessage(p, FailureMsg(third.adds(p)[0].request_id(), 0, "boom"), 0);
  // Failures may re-run the request (nothing was streamed); drain until nothing is placed.
  for (int round = 0; round < 8; ++round) {
    core_->Schedule(0);
    Sent s = Take();
    for (const auto& add : s.adds(p)) {
      core_->OnWorkerMessage(p, FailureMsg(add.request_id(), add.attempt(), "boom"), 0);
    }
  }
  EXPECT_EQ(FreeSlots(p), 2);
  EXPECT_EQ(FreeSlots(d), 3);
  EXPECT_EQ(StatsOf(core_->Stats(), p).used_blocks(), 0);
  EXPECT_EQ(StatsOf(core_->Stats(), d).used_blocks(), 0);
}

TEST_F(StateSlotsTest, NoPrefixReuseForStateModels) {
  const WorkerId c = AddWorker(v1::WORKER_ROLE_COLOCATED, "c", 4);
  for (uint64_t client = 1; client <= 2; ++client) {
    core_->Submit(kFe, MakeSubmit(client, Iota(20), 1), 0);
    core_->Schedule(0);
    Sent s = Take();
    ASSERT_EQ(s.adds(c).size(), 1u);
    // The same 20-token prompt again: still computed from token 0, in a fresh slot state.
    EXPECT_EQ(s.adds(c)[0].num_computed_tokens(), 0);
    core_->OnWorkerMessage(c, TokenMsg(s.adds(c)[0].request_id(), 0, 3, /*finished=*/true), 0);
  }
  const auto stats = core_->Stats();
  EXPECT_EQ(StatsOf(stats, c).cached_blocks(), 0);
  EXPECT_EQ(stats.prefix_cache_hit_tokens(), 0u);
  EXPECT_EQ(FreeSlots(c), 4);
}

TEST_F(StateSlotsTest, CancelAndLostWorkerReturnSlots) {
  const WorkerId p = AddWorker(v1::WORKER_ROLE_PREFILL, "p", 4);
  const WorkerId d = AddWorker(v1::WORKER_ROLE_DECODE, "d", 4);
  const WorkerId d2 = AddWorker(v1::WORKER_ROLE_DECODE, "d2", 4);
  for (uint64_t client = 1; client <= 4; ++client) core_->Submit(kFe, MakeSubmit(client, Iota(6), 8), 0);
  core_->Schedule(0);
  Take();
  EXPECT_EQ(FreeSlots(p), 0);
  v1::CancelRequest cancel;
  cancel.set_client_id(1);
  core_->Cancel(kFe, cancel);
  EXPECT_EQ(FreeSlots(p), 1);
  core_->RemoveWorker(d, "test: lost");
  core_->RemoveWorker(d2, "test: lost");
  // With no decode worker left, the prefill placements are dropped too.
  EXPECT_EQ(FreeSlots(p), 4);
}

}  // namespace
}  // namespace cleave::scheduler
