// SchedulerCore admission (Submit) and worker registration: every rejection is decided before any
// KV is allocated.
#include <gtest/gtest.h>

#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/testing/fake_messages.h"

namespace cleave::scheduler {
namespace {

using testing::Iota;
using testing::MakeSubmit;
using testing::Registration;
using testing::Sent;
using testing::WorkerSpec;

constexpr FrontendId kFe = 7;

class AdmissionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.max_waiting = 3;
    config_.max_waiting_tokens = 40;
    config_.retry_after_s = 5;
    core_ = std::make_unique<SchedulerCore>(config_);
  }
  WorkerId AddColocated(int blocks = 64, int max_model_len = 4096) {
    WorkerSpec spec;
    spec.num_kv_blocks = blocks;
    spec.max_model_len = max_model_len;
    auto id = core_->AddWorker(Registration(spec), 0);
    EXPECT_TRUE(id.ok()) << id.status();
    return *id;
  }
  // Submits and returns the single event it produced.
  v1::RequestEvent SubmitOne(const v1::SubmitRequest& req) {
    core_->Submit(kFe, req, 0);
    Sent sent(core_->TakeOutbox());
    EXPECT_EQ(sent.num_worker_messages(), 0u);
    auto events = sent.events(kFe);
    EXPECT_EQ(events.size(), 1u);
    return events.empty() ? v1::RequestEvent() : events[0];
  }

  SchedulerConfig config_;
  std::unique_ptr<SchedulerCore> core_;
};

TEST_F(AdmissionTest, NoCapacityIsUnavailable) {
  EXPECT_FALSE(core_->HasServingCapacity());
  EXPECT_EQ(SubmitOne(MakeSubmit(1, Iota(4), 4)).error_code(), 14);
  WorkerSpec decode;
  decode.role = v1::WORKER_ROLE_DECODE;
  ASSERT_TRUE(core_->AddWorker(Registration(decode), 0).ok());
  EXPECT_FALSE(core_->HasServingCapacity());  // decode alone cannot prefill
  EXPECT_EQ(SubmitOne(MakeSubmit(2, Iota(4), 4)).error_code(), 14);
  WorkerSpec prefill;
  prefill.role = v1::WORKER_ROLE_PREFILL;
  ASSERT_TRUE(core_->AddWorker(Registration(prefill), 0).ok());
  EXPECT_TRUE(core_->HasServingCapacity());
  EXPECT_TRUE(SubmitOne(MakeSubmit(3, Iota(4), 4)).accepted());
  EXPECT_EQ(core_->Stats().num_rejected(), 2u);
}

TEST_F(AdmissionTest, InvalidRequests) {
  AddColocated(/*blocks=*/64, /*max_model_len=*/30);
  EXPECT_EQ(SubmitOne(MakeSubmit(1, {}, 4)).error_code(), 3);
  EXPECT_EQ(SubmitOne(MakeSubmit(2, Iota(4), 0)).error_code(), 3);
  EXPECT_EQ(SubmitOne(MakeSubmit(3, Iota(4), -1)).error_code(), 3);
  EXPECT_EQ(SubmitOne(MakeSubmit(4, Iota(30), 1)).error_code(), 3);  // no room for one token
  EXPECT_TRUE(SubmitOne(MakeSubmit(5, Iota(29), 1)).accepted());
  EXPECT_EQ(SubmitOne(MakeSubmit(6, {1, 32000}, 1)).error_code(), 3);  // outside the vocabulary
  EXPECT_EQ(SubmitOne(MakeSubmit(5, Iota(3), 1)).error_code(), 3);     // client_id in use
  const auto stats = core_->Stats();
  EXPECT_EQ(stats.num_rejected(), 6u);
  EXPECT_EQ(stats.num_waiting(), 1);
}

TEST_F(AdmissionTest, PoolSizeBoundsModelLength) {
  AddColocated(/*blocks=*/8);  // 8 blocks of 4: 32 tokens at most
  EXPECT_EQ(SubmitOne(MakeSubmit(1, Iota(32), 1)).error_code(), 3);
  EXPECT_TRUE(SubmitOne(MakeSubmit(2, Iota(31), 100)).accepted());
  core_->Schedule(0);
  Sent sent(core_->TakeOutbox());
  ASSERT_EQ(sent.adds(1).size(), 1u);
  EXPECT_EQ(sent.adds(1)[0].max_new_tokens(), 1);  // clipped to max_model_len - prompt
}

TEST_F(AdmissionTest, TooManyWaitingIsResourceExhaustedBeforeAllocation) {
  AddColocated();
  for (uint64_t c = 1; c <= 3; ++c) EXPECT_TRUE(SubmitOne(MakeSubmit(c, Iota(4), 4)).accepted());
  const v1::RequestEvent e = SubmitOne(MakeSubmit(4, Iota(4), 4));
  EXPECT_EQ(e.error_code(), 8);
  EXPECT_EQ(e.retry_after_s(), 5);
  EXPECT_FALSE(e.accepted());
  const auto stats = core_->Stats();
  EXPECT_EQ(stats.workers(0).used_blocks(), 0);  // nothing placed yet: nothing allocated
  EXPECT_EQ(stats.num_waiting(), 3);
  // Placing frees the waiting room.
  core_->Schedule(0);
  (void)core_->TakeOutbox();
  EXPECT_TRUE(SubmitOne(MakeSubmit(4, Iota(4), 4)).accepted());
}

TEST_F(AdmissionTest, TooManyWaitingTokensIsResourceExhausted) {
  AddColocated();
  EXPECT_TRUE(SubmitOne(MakeSubmit(1, Iota(30), 4)).accepted());
  const v1::RequestEvent e = SubmitOne(MakeSubmit(2, Iota(11), 4));  // 41 > 40
  EXPECT_EQ(e.error_code(), 8);
  EXPECT_EQ(e.retry_after_s(), 5);
  EXPECT_TRUE(SubmitOne(MakeSubmit(3, Iota(10), 4)).accepted());  // 40: at the limit is fine
}

TEST_F(AdmissionTest, SeedDrawnWhenAbsentAndKeptWhenGiven) {
  const WorkerId w = AddColocated();
  auto with_seed = MakeSubmit(1, Iota(4), 4);
  with_seed.set_has_seed(true);
  with_seed.mutable_sampling()->set_seed(1234);
  core_->Submit(kFe, with_seed, 0);
  core_->Submit(kFe, MakeSubmit(2, Iota(4), 4), 0);
  core_->Submit(kFe, MakeSubmit(3, Iota(4), 4), 0);
  core_->Schedule(0);
  Sent sent(core_->TakeOutbox());
  const auto adds = sent.adds(w);
  ASSERT_EQ(adds.size(), 3u);
  EXPECT_EQ(adds[0].sampling().seed(), 1234u);
  EXPECT_NE(adds[1].sampling().seed(), adds[2].sampling().seed());
  EXPECT_FLOAT_EQ(adds[1].sampling().temperature(), 1.0f);
}

TEST(RegistrationTest, RejectsUnusableOrMismatchedWorkers) {
  SchedulerCore core{SchedulerConfig()};
  WorkerSpec spec;
  auto reg = Registration(spec);
  reg.set_role(v1::WORKER_ROLE_UNSPECIFIED);
  EXPECT_EQ(core.AddWorker(reg, 0).status().code(), absl::StatusCode::kInvalidArgument);
  reg = Registration(spec);
  reg.set_num_kv_blocks(0);
  EXPECT_EQ(core.AddWorker(reg, 0).status().code(), absl::StatusCode::kInvalidArgument);
  reg = Registration(spec);
  reg.set_block_size(0);
  EXPECT_EQ(core.AddWorker(reg, 0).status().code(), absl::StatusCode::kInvalidArgument);
  spec.role = v1::WORKER_ROLE_DECODE;
  reg = Registration(spec);
  reg.clear_kv_address();
  EXPECT_EQ(core.AddWorker(reg, 0).status().code(), absl::StatusCode::kInvalidArgument);

  ASSERT_TRUE(core.AddWorker(Registration(spec), 0).ok());
  spec.role = v1::WORKER_ROLE_PREFILL;
  reg = Registration(spec);
  reg.set_block_size(8);
  EXPECT_EQ(core.AddWorker(reg, 0).status().code(), absl::StatusCode::kInvalidArgument);
  reg = Registration(spec);
  reg.set_model_id("other");
  EXPECT_EQ(core.AddWorker(reg, 0).status().code(), absl::StatusCode::kInvalidArgument);
  reg = Registration(spec);
  reg.set_num_layers(3);
  EXPECT_EQ(core.AddWorker(reg, 0).status().code(), absl::StatusCode::kInvalidArgument);
  reg = Registration(spec);
  reg.set_vocab_size(7);
  EXPECT_EQ(core.AddWorker(reg, 0).status().code(), absl::StatusCode::kInvalidArgument);
  reg = Registration(spec);
  reg.set_num_kv_blocks(10);  // pool size and name may differ
  auto ok = core.AddWorker(reg, 0);
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(core.Stats().workers_size(), 2);
}

TEST(RegistrationTest, LeasesLapseWithoutHeartbeats) {
  SchedulerConfig config;
  config.lease_ms = 100;
  SchedulerCore core(config);
  const WorkerId a = *core.AddWorker(Registration(WorkerSpec()), 0);
  const WorkerId b = *core.AddWorker(Registration(WorkerSpec()), 0);
  EXPECT_TRUE(core.Heartbeat(a, 80));
  EXPECT_FALSE(core.Heartbeat(999, 80));
  EXPECT_TRUE(core.ExpireLeases(100).empty());
  EXPECT_EQ(core.ExpireLeases(150), std::vector<WorkerId>{b});
  EXPECT_FALSE(core.Heartbeat(b, 150));
  EXPECT_TRUE(core.Heartbeat(a, 150));
  EXPECT_TRUE(core.ExpireLeases(200).empty());
  EXPECT_EQ(core.ExpireLeases(251), std::vector<WorkerId>{a});
  EXPECT_FALSE(core.HasServingCapacity());
}

}  // namespace
}  // namespace cleave::scheduler
