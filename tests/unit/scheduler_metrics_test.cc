// SchedulerCore's metrics and request phase timings, driven by fake worker messages: counters equal
// what happened (admitted, rejected by reason, ended by outcome, preemptions, prefix lookups), the
// phase histograms count each request once, events carry the timings, the trace id reaches the
// workers, and a draining worker gets nothing new.
#include <gtest/gtest.h>

#include <vector>

#include "cleave/common/metrics.h"
#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/scheduler_metrics.h"
#include "cleave/scheduler/testing/fake_messages.h"

namespace cleave::scheduler {
namespace {

using testing::Iota;
using testing::KvReadyMsg;
using testing::KvSentMsg;
using testing::MakeSubmit;
using testing::Registration;
using testing::Sent;
using testing::StatsOf;
using testing::TokenMsg;
using testing::WorkerSpec;

constexpr FrontendId kFe = 7;
using M = SchedulerMetrics;

class SchedulerMetricsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.max_waiting = 3;
    core_ = std::make_unique<SchedulerCore>(config_);
    auto m = SchedulerMetrics::Create(registry_);
    ASSERT_TRUE(m.ok()) << m.status();
    metrics_ = std::move(*m);
    core_->SetMetrics(metrics_.get());
  }
  WorkerId AddWorker(v1::WorkerRole role, const std::string& name, int blocks = 64) {
    WorkerSpec spec;
    spec.role = role;
    spec.name = name;
    spec.num_kv_blocks = blocks;
    spec.max_model_len = 64;
    auto id = core_->AddWorker(Registration(spec), 0);
    EXPECT_TRUE(id.ok()) << id.status();
    return *id;
  }
  void Send(WorkerId w, const v1::WorkerMessage& m) { core_->OnWorkerMessage(w, m, 0); }
  Sent Take() { return Sent(core_->TakeOutbox()); }
  v1::SubmitRequest Submit(uint64_t client, std::vector<int32_t> prompt, int max_tokens,
                           const std::string& trace = "") {
    v1::SubmitRequest s = MakeSubmit(client, std::move(prompt), max_tokens);
    s.set_trace_id(trace);
    core_->Submit(kFe, s, 0);
    return s;
  }
  uint64_t Phases(M::Phase p) const { return metrics_->phase_seconds[p]->Count(); }

  SchedulerConfig config_;
  metrics::Registry registry_;
  std::unique_ptr<SchedulerMetrics> metrics_;
  std::unique_ptr<SchedulerCore> core_;
};

TEST_F(SchedulerMetricsTest, PdRequestCountsEveryPhaseOnceAndCarriesItsTraceId) {
  const WorkerId p = AddWorker(v1::WORKER_ROLE_PREFILL, "prefill-0");
  const WorkerId d = AddWorker(v1::WORKER_ROLE_DECODE, "decode-0");
  Submit(1, Iota(10), 3, "req-abc");
  core_->Schedule(0);
  Sent placed = Take();
  ASSERT_EQ(placed.adds(p).size(), 1u);
  ASSERT_EQ(placed.expects(d).size(), 1u);
  const uint64_t id = placed.adds(p)[0].request_id();
  EXPECT_EQ(placed.adds(p)[0].trace_id(), "req-abc");
  EXPECT_EQ(placed.expects(d)[0].trace_id(), "req-abc");
  EXPECT_EQ(metrics_->admitted->Value(), 1);
  EXPECT_EQ(Phases(M::kQueue), 0u);

  Send(p, TokenMsg(id, 0, 5));
  Sent first = Take();
  ASSERT_EQ(first.events(kFe).size(), 1u);
  const v1::PhaseTimings t1 = first.events(kFe)[0].timings();
  EXPECT_GE(t1.queue_us(), 0);
  EXPECT_GE(t1.prefill_us(), 0);
  EXPECT_EQ(t1.kv_transfer_us(), -1);
  EXPECT_EQ(t1.first_decode_step_us(), -1);
  EXPECT_EQ(Phases(M::kQueue), 1u);
  EXPECT_EQ(Phases(M::kPrefill), 1u);
  EXPECT_EQ(Phases(M::kKvTransfer), 0u);

  Send(p, KvSentMsg(id, 0));
  Send(d, KvReadyMsg(id, 0));
  Sent joined = Take();
  ASSERT_EQ(joined.adds(d).size(), 1u);
  EXPECT_EQ(joined.adds(d)[0].trace_id(), "req-abc");
  Send(d, TokenMsg(id, 0, 6));
  Send(d, TokenMsg(id, 0, 7));  // the third token ends it by length
  Sent done = Take();
  const std::vector<v1::RequestEvent> events = done.events(kFe);
  ASSERT_FALSE(events.empty());
  ASSERT_TRUE(events.back().finished());
  const v1::PhaseTimings all = events.back().timings();
  EXPECT_EQ(all.queue_us(), t1.queue_us());
  EXPECT_GE(all.kv_transfer_us(), 0);
  EXPECT_GE(all.decode_queue_us(), 0);
  EXPECT_GE(all.first_decode_step_us(), 0);
  for (int phase = 0; phase < M::kNumPhases; ++phase) {
    EXPECT_EQ(Phases(static_cast<M::Phase>(phase)), 1u) << M::PhaseName(phase);
  }
  EXPECT_EQ(metrics_->ended[M::kFinished]->Value(), 1);
  EXPECT_EQ(metrics_->ended[M::kCancelled]->Value(), 0);
  EXPECT_EQ(metrics_->ended[M::kFailed]->Value(), 0);
  EXPECT_EQ(metrics_->prefix_queried_tokens->Value(), 10);
  EXPECT_EQ(metrics_->prefix_hit_tokens->Value(), 0);
}

TEST_F(SchedulerMetricsTest, RejectionsByReasonAndCancellations) {
  Submit(1, Iota(4), 2);  // no worker yet
  EXPECT_EQ(metrics_->rejected[M::kNoCapacity]->Value(), 1);
  const WorkerId w = AddWorker(v1::WORKER_ROLE_COLOCATED, "colocated-0", /*blocks=*/4);
  Submit(2, Iota(64), 2);  // max_model_len 64: no room to generate
  EXPECT_EQ(metrics_->rejected[M::kTooLong]->Value(), 1);
  Submit(3, {}, 2);
  EXPECT_EQ(metrics_->rejected[M::kInvalid]->Value(), 1);
  // Four blocks of 4 tokens hold one 10-token request; the rest wait (3 at most), then overflow.
  for (uint64_t c = 10; c < 13; ++c) Submit(c, Iota(10), 4);
  core_->Schedule(0);
  for (uint64_t c = 13; c < 15; ++c) Submit(c, Iota(10), 4);
  EXPECT_EQ(metrics_->rejected[M::kQueueFull]->Value(), 1);
  EXPECT_EQ(metrics_->admitted->Value(), 4);
  Take();
  v1::CancelRequest cancel;
  cancel.set_client_id(11);
  core_->Cancel(kFe, cancel);
  EXPECT_EQ(metrics_->ended[M::kCancelled]->Value(), 1);
  core_->RemoveFrontend(kFe);
  EXPECT_EQ(metrics_->ended[M::kCancelled]->Value(), 4);
  EXPECT_EQ(StatsOf(core_->Stats(), w).used_blocks(), 0);
}

TEST_F(SchedulerMetricsTest, PrefixLookupsCountTokensAndPreemptionsTheirWorker) {
  const WorkerId w = AddWorker(v1::WORKER_ROLE_COLOCATED, "colocated-0", /*blocks=*/8);
  Submit(1, Iota(12), 2);
  core_->Schedule(0);
  const uint64_t id = Take().adds(w).at(0).request_id();
  Send(w, TokenMsg(id, 0, 1));
  Send(w, TokenMsg(id, 0, 2));  // finished: its full prompt blocks stay cached
  Take();
  EXPECT_EQ(Phases(M::kQueue), 1u);
  EXPECT_EQ(Phases(M::kKvTransfer), 0u);  // colocated: no hand-off phases
  Submit(2, Iota(12), 20);
  Submit(3, Iota(12), 20);
  core_->Schedule(0);
  Take();
  EXPECT_EQ(metrics_->prefix_queried_tokens->Value(), 36);
  EXPECT_EQ(metrics_->prefix_hit_tokens->Value(), 16);  // (12 - 1) / 4 = 2 full blocks hit, twice
  // Both grow in a pool of 32 tokens: one is preempted, charged to its worker.
  for (int i = 0; i < 40 && metrics_->preemptions->Value() == 0; ++i) {
    for (uint64_t id : {2u, 3u}) Send(w, TokenMsg(id, 0, 3));
    Take();
  }
  EXPECT_EQ(metrics_->preemptions->Value(), 1);
  EXPECT_EQ(StatsOf(core_->Stats(), w).num_preempted(), 1u);
}

TEST_F(SchedulerMetricsTest, DrainingWorkerGetsNothingNew) {
  const WorkerId a = AddWorker(v1::WORKER_ROLE_COLOCATED, "colocated-0");
  const WorkerId b = AddWorker(v1::WORKER_ROLE_COLOCATED, "colocated-1");
  v1::WorkerMessage drain;
  drain.mutable_drain()->set_reason("SIGTERM");
  Send(a, drain);
  EXPECT_TRUE(StatsOf(core_->Stats(), a).draining());
  for (uint64_t c = 1; c <= 3; ++c) Submit(c, Iota(5), 2);
  core_->Schedule(0);
  Sent placed = Take();
  EXPECT_TRUE(placed.adds(a).empty());
  EXPECT_EQ(placed.adds(b).size(), 3u);
  // With every worker draining there is no capacity: new requests are refused at once.
  Send(b, drain);
  Submit(9, Iota(5), 2);
  EXPECT_EQ(metrics_->rejected[M::kNoCapacity]->Value(), 1);
}

TEST_F(SchedulerMetricsTest, LeaseExpiriesAreCounted) {
  AddWorker(v1::WORKER_ROLE_COLOCATED, "colocated-0");
  EXPECT_EQ(core_->ExpireLeases(config_.lease_ms + 1).size(), 1u);
  EXPECT_EQ(metrics_->lease_expiries->Value(), 1);
}

}  // namespace
}  // namespace cleave::scheduler
