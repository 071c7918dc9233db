// Cancellation in every request state, frontend disconnection, lost workers (lease expiry), and
// waiting without capacity: blocks are always freed and the right workers told.
#include <gtest/gtest.h>

#include <vector>

#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/testing/fake_messages.h"

namespace cleave::scheduler {
namespace {

using testing::BlocksNotAllFree;
using testing::Iota;
using testing::KvReadyMsg;
using testing::KvSentMsg;
using testing::MakeSubmit;
using testing::Registration;
using testing::Sent;
using testing::TokenMsg;
using testing::WorkerSpec;

constexpr FrontendId kFe = 4;

class LifecycleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.lease_ms = 1000;
    config_.no_capacity_timeout_ms = 500;
    core_ = std::make_unique<SchedulerCore>(config_);
    p_ = Add(v1::WORKER_ROLE_PREFILL, "prefill-0");
    d_ = Add(v1::WORKER_ROLE_DECODE, "decode-0");
  }
  WorkerId Add(v1::WorkerRole role, const std::string& name, Clock now = 0) {
    WorkerSpec spec;
    spec.role = role;
    spec.name = name;
    auto id = core_->AddWorker(Registration(spec), now);
    EXPECT_TRUE(id.ok());
    return *id;
  }
  Sent Take() { return Sent(core_->TakeOutbox()); }
  void Send(WorkerId w, const v1::WorkerMessage& m) { core_->OnWorkerMessage(w, m, 0); }
  uint64_t Place(uint64_t client, int prompt_len = 9) {
    (void)Take();
    core_->Submit(kFe, MakeSubmit(client, Iota(prompt_len, 100 * client), 20), 0);
    core_->Schedule(0);
    Sent sent = Take();
    for (const auto& [w, m] : sent.box.to_workers) {
      if (m.has_add()) return m.add().request_id();
    }
    ADD_FAILURE() << "not placed";
    return 0;
  }
  void Cancel(uint64_t client, bool finished = false) {
    v1::CancelRequest c;
    c.set_client_id(client);
    c.set_finished(finished);
    core_->Cancel(kFe, c);
  }
  // Cancels and checks which workers were told, with what, and that all blocks are free.
  void ExpectCancelTells(uint64_t client, bool prefill, bool decode) {
    Cancel(client);
    Sent sent = Take();
    EXPECT_TRUE(sent.events(kFe).empty());
    EXPECT_EQ(sent.removes(p_).size(), prefill ? 1u : 0u);
    EXPECT_EQ(sent.removes(d_).size(), decode ? 1u : 0u);
    for (const auto& [w, m] : sent.box.to_workers) {
      EXPECT_EQ(m.remove().reason(), v1::REMOVE_REASON_CANCELLED);
    }
    EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
  }

  SchedulerConfig config_;
  std::unique_ptr<SchedulerCore> core_;
  WorkerId p_ = 0;
  WorkerId d_ = 0;
};

TEST_F(LifecycleTest, CancelWhileWaiting) {
  // Never scheduled: it stays waiting.
  core_->Submit(kFe, MakeSubmit(1, Iota(5), 5), 0);
  (void)Take();
  Cancel(1);
  EXPECT_TRUE(Take().empty());
  EXPECT_EQ(core_->Stats().num_waiting(), 0);
  core_->Schedule(0);
  EXPECT_TRUE(Take().empty());
  // The client id is free again.
  core_->Submit(kFe, MakeSubmit(1, Iota(5), 5), 0);
  EXPECT_TRUE(Take().events(kFe).at(0).accepted());
}

TEST_F(LifecycleTest, CancelWhilePrefilling) {
  Place(1);
  ExpectCancelTells(1, /*prefill=*/true, /*decode=*/true);
}

TEST_F(LifecycleTest, CancelWhilePrefillingWithKvReady) {
  const uint64_t id = Place(1);
  Send(d_, KvReadyMsg(id, 0));
  ExpectCancelTells(1, true, true);
}

TEST_F(LifecycleTest, CancelWhileTransferring) {
  const uint64_t id = Place(1);
  Send(p_, TokenMsg(id, 0, 5));
  (void)Take();
  ExpectCancelTells(1, true, true);
}

TEST_F(LifecycleTest, CancelWhileTransferringAfterKvSent) {
  const uint64_t id = Place(1);
  Send(p_, KvSentMsg(id, 0));
  Send(p_, TokenMsg(id, 0, 5));
  (void)Take();
  ExpectCancelTells(1, /*prefill=*/false, /*decode=*/true);
}

TEST_F(LifecycleTest, CancelWhileDecoding) {
  const uint64_t id = Place(1);
  Send(p_, TokenMsg(id, 0, 5));
  Send(p_, KvSentMsg(id, 0));
  Send(d_, KvReadyMsg(id, 0));
  Send(d_, TokenMsg(id, 0, 6));
  (void)Take();
  ExpectCancelTells(1, false, true);
  Send(d_, TokenMsg(id, 0, 7));  // in flight when the cancel went out
  EXPECT_TRUE(Take().empty());
}

TEST_F(LifecycleTest, CancelWhileDecodingBeforeKvSent) {
  const uint64_t id = Place(1);
  Send(p_, TokenMsg(id, 0, 5));
  Send(d_, KvReadyMsg(id, 0));
  (void)Take();
  ExpectCancelTells(1, true, true);
  Send(p_, KvSentMsg(id, 0));
  EXPECT_TRUE(Take().empty());
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(LifecycleTest, CancelFinishedByFrontend) {
  const uint64_t id = Place(1);
  Send(p_, TokenMsg(id, 0, 5));
  Send(p_, KvSentMsg(id, 0));
  Send(d_, KvReadyMsg(id, 0));
  (void)Take();
  Cancel(1, /*finished=*/true);
  Sent sent = Take();
  EXPECT_TRUE(sent.events(kFe).empty());
  ASSERT_EQ(sent.removes(d_).size(), 1u);
  EXPECT_EQ(sent.removes(d_)[0].reason(), v1::REMOVE_REASON_FINISHED);
  EXPECT_EQ(core_->Stats().num_finished(), 1u);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(LifecycleTest, CancelWhileRunningColocated) {
  core_ = std::make_unique<SchedulerCore>(config_);
  const WorkerId c = Add(v1::WORKER_ROLE_COLOCATED, "c");
  const uint64_t id = Place(1);
  Send(c, TokenMsg(id, 0, 5));
  (void)Take();
  Cancel(1);
  Sent sent = Take();
  EXPECT_EQ(sent.removes(c).size(), 1u);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
  Cancel(1);   // twice: nothing
  Cancel(77);  // unknown: nothing
  EXPECT_TRUE(Take().empty());
}

TEST_F(LifecycleTest, RemoveFrontendCancelsAllItsRequests) {
  const uint64_t a = Place(1);
  Place(2);
  core_->Submit(kFe, MakeSubmit(3, Iota(4), 4), 0);      // waiting
  core_->Submit(kFe + 1, MakeSubmit(1, Iota(4), 4), 0);  // another frontend, same client id
  Send(p_, TokenMsg(a, 0, 5));
  (void)Take();
  core_->RemoveFrontend(kFe);
  Sent sent = Take();
  EXPECT_TRUE(sent.events(kFe).empty());
  EXPECT_EQ(sent.removes(p_).size(), 2u);
  EXPECT_EQ(sent.removes(d_).size(), 2u);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
  EXPECT_EQ(core_->Stats().num_waiting(), 1);  // the other frontend's
  core_->Schedule(0);
  EXPECT_EQ(Take().adds(p_).size(), 1u);
}

TEST_F(LifecycleTest, LostDecodeWorkerRerunsUnstreamedAndFailsStreamed) {
  const uint64_t streamed = Place(1);
  Send(p_, TokenMsg(streamed, 0, 5));
  Send(p_, KvSentMsg(streamed, 0));
  Send(d_, KvReadyMsg(streamed, 0));
  const uint64_t fresh = Place(2);
  (void)Take();
  // The prefill worker keeps its lease; the decode worker's lapses.
  EXPECT_TRUE(core_->Heartbeat(p_, 900));
  EXPECT_TRUE(core_->ExpireLeases(1000).empty());
  EXPECT_EQ(core_->ExpireLeases(1001), std::vector<WorkerId>{d_});
  Sent sent = Take();
  const auto events = sent.events(kFe);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].client_id(), 1u);
  EXPECT_EQ(events[0].error_code(), 14);
  EXPECT_NE(events[0].error_message().find("decode-0"), std::string::npos);
  // The prefill worker is told to drop the re-run request's transfer; nothing goes to the dead.
  ASSERT_EQ(sent.removes(p_).size(), 1u);
  EXPECT_EQ(sent.removes(p_)[0].request_id(), fresh);
  EXPECT_TRUE(sent.removes(d_).empty());
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
  EXPECT_EQ(core_->Stats().num_waiting(), 1);
  EXPECT_FALSE(core_->HasServingCapacity());
  // A new decode worker: the re-run goes there with the next attempt.
  const WorkerId d2 = Add(v1::WORKER_ROLE_DECODE, "decode-1", 1001);
  core_->Schedule(1001);
  Sent again = Take();
  ASSERT_EQ(again.expects(d2).size(), 1u);
  EXPECT_EQ(again.expects(d2)[0].request_id(), fresh);
  EXPECT_EQ(again.expects(d2)[0].attempt(), 1u);
  EXPECT_EQ(again.adds(p_).at(0).kv_target().worker_id(), d2);
  // Messages from the dead worker are ignored.
  Send(d_, TokenMsg(streamed, 0, 9));
  EXPECT_TRUE(Take().empty());
}

TEST_F(LifecycleTest, LostPrefillWorker) {
  const uint64_t prefilling = Place(1);
  const uint64_t transferring = Place(2);
  Send(p_, TokenMsg(transferring, 0, 5));
  const uint64_t decoding = Place(3);
  Send(p_, TokenMsg(decoding, 0, 5));
  Send(d_, KvReadyMsg(decoding, 0));  // no KvSent yet: p_ still holds it
  (void)Take();
  core_->RemoveWorker(p_, "stream closed");
  Sent sent = Take();
  // prefilling: nothing streamed, re-run; transferring: its first token streamed, fails.
  const auto events = sent.events(kFe);
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].client_id(), 2u);
  EXPECT_EQ(events[0].error_code(), 14);
  const auto removes = sent.removes(d_);
  ASSERT_EQ(removes.size(), 2u);
  EXPECT_EQ(removes[0].request_id(), prefilling);
  EXPECT_EQ(removes[1].request_id(), transferring);
  EXPECT_EQ(core_->Stats().num_waiting(), 1);
  // decoding goes on: its KV had arrived.
  Send(d_, TokenMsg(decoding, 0, 6, true));
  EXPECT_TRUE(Take().events(kFe).at(0).finished());
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
  (void)prefilling;
}

TEST_F(LifecycleTest, WaitingRequestsFailAfterNoCapacityTimeout) {
  const uint64_t id = Place(1);
  (void)id;
  core_->RemoveWorker(d_, "gone");
  core_->RemoveWorker(d_, "gone twice");  // unknown now: nothing
  (void)Take();
  EXPECT_EQ(core_->Stats().num_waiting(), 1);
  core_->Schedule(100);
  core_->Schedule(599);
  EXPECT_TRUE(Take().empty());
  core_->Schedule(600);
  Sent sent = Take();
  ASSERT_EQ(sent.events(kFe).size(), 1u);
  EXPECT_EQ(sent.events(kFe)[0].error_code(), 14);
  EXPECT_EQ(core_->Stats().num_waiting(), 0);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

}  // namespace
}  // namespace cleave::scheduler
