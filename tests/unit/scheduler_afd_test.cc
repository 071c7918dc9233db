// Attention-FFN disaggregation (AFD) in the scheduler: AfdGroupComplete on its own, registration
// of attention and FFN workers, placement on the attention workers of complete groups only,
// AfdPeers to the attention workers as the group changes, requests failing when an FFN worker is
// lost (and not when one drains), readiness and metrics with the new roles.
#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <string>
#include <vector>

#include "cleave/scheduler/afd_group.h"
#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/service.h"
#include "cleave/scheduler/testing/fake_messages.h"
#include "cleave/v1/control.grpc.pb.h"
#include "http_test_client.h"
#include "nlohmann/json.hpp"

namespace cleave::scheduler {
namespace {

using testing::AttentionRegistration;
using testing::BlocksNotAllFree;
using testing::DrainMsg;
using testing::FfnRegistration;
using testing::FfnSpec;
using testing::Iota;
using testing::KvReadyMsg;
using testing::KvSentMsg;
using testing::MakeSubmit;
using testing::Registration;
using testing::Sent;
using testing::Shard;
using testing::StatsOf;
using testing::TokenMsg;
using testing::WorkerSpec;

constexpr FrontendId kFe = 5;
constexpr int32_t kUnavailable = 14;

// Half of an 8-expert model with a shared expert: experts first..first+3, dense layers too.
FfnSpec Half(const std::string& name, int first, bool shared = false) {
  FfnSpec spec;
  spec.name = name;
  spec.experts = Iota(4, first);
  spec.num_experts = 8;
  spec.shared_expert = shared;
  spec.model_has_shared_expert = true;
  return spec;
}

WorkerSpec Spec(v1::WorkerRole role, const std::string& name, int blocks = 64) {
  WorkerSpec spec;
  spec.role = role;
  spec.name = name;
  spec.num_kv_blocks = blocks;
  return spec;
}

std::string Why(std::vector<FfnSpec> specs) {
  std::vector<v1::FfnShard> shards;
  for (const FfnSpec& s : specs) shards.push_back(Shard(s));
  std::vector<const v1::FfnShard*> ptrs;
  for (const v1::FfnShard& s : shards) ptrs.push_back(&s);
  std::string why = "untouched";
  return AfdGroupComplete(ptrs, &why) ? "complete" : why;
}

TEST(AfdGroupCompleteTest, ExpertsDenseAndSharedExpertEachOwnedExactlyOnce) {
  EXPECT_EQ(Why({}), "no FFN worker");
  EXPECT_EQ(Why({Half("a", 0, true), Half("b", 4)}), "complete");
  FfnSpec dense_model;  // num_experts 0: one dense worker is the whole FFN
  EXPECT_EQ(Why({dense_model}), "complete");
  dense_model.dense = false;
  EXPECT_EQ(Why({dense_model}), "no FFN worker serves the dense layers");

  FfnSpec gap = Half("b", 4);
  gap.experts = {4, 5, 7};
  EXPECT_EQ(Why({Half("a", 0, true), gap}), "expert 6 has no FFN worker");
  EXPECT_EQ(Why({Half("a", 0, true)}), "expert 4 has no FFN worker");
  FfnSpec overlap = Half("b", 4);
  overlap.experts.push_back(2);
  EXPECT_EQ(Why({Half("a", 0, true), overlap}), "expert 2 is owned by 2 FFN workers");
  EXPECT_EQ(Why({Half("a", 0), Half("b", 4)}), "the shared expert has no FFN worker");
  EXPECT_EQ(Why({Half("a", 0, true), Half("b", 4, true)}), "the shared expert is owned by 2 FFN workers");
  FfnSpec other = Half("b", 4);
  other.num_experts = 16;
  EXPECT_EQ(Why({Half("a", 0, true), other}), "FFN workers disagree on num_experts (8 and 16)");
  // Dense layers are replicated: one dense member is enough.
  FfnSpec experts_only = Half("b", 4);
  experts_only.dense = false;
  EXPECT_EQ(Why({Half("a", 0, true), experts_only}), "complete");
  // A shard listing an expert twice (rejected at registration) still owns it once.
  FfnSpec twice = Half("b", 4);
  twice.experts.push_back(5);
  EXPECT_EQ(Why({Half("a", 0, true), twice}), "complete");
  std::vector<const v1::FfnShard*> none;
  EXPECT_FALSE(AfdGroupComplete(none, nullptr));  // `why` is optional
}

TEST(AfdGroupCompleteTest, ValidateFfnShard) {
  EXPECT_TRUE(ValidateFfnShard(Shard(Half("a", 0, true))).ok());
  FfnSpec bad = Half("a", 0);
  bad.experts = {0, 8};
  EXPECT_EQ(ValidateFfnShard(Shard(bad)).message(), "ffn expert 8 is outside [0, 8)");
  bad.experts = {3, 1, 3};
  EXPECT_EQ(ValidateFfnShard(Shard(bad)).message(), "ffn expert 3 is listed twice");
  bad.experts = {-1};
  EXPECT_FALSE(ValidateFfnShard(Shard(bad)).ok());
  bad = Half("a", 0, true);
  bad.model_has_shared_expert = false;
  EXPECT_FALSE(ValidateFfnShard(Shard(bad)).ok());
  bad = FfnSpec();
  bad.num_experts = -1;
  EXPECT_FALSE(ValidateFfnShard(Shard(bad)).ok());
}

TEST(AfdRegistrationTest, AttentionAndFfnRequirements) {
  SchedulerCore core{SchedulerConfig()};
  auto expect_invalid = [&](const v1::RegisterWorkerRequest& reg, const std::string& message) {
    auto id = core.AddWorker(reg, 0);
    ASSERT_FALSE(id.ok()) << reg.ShortDebugString();
    EXPECT_EQ(id.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(id.status().message(), message);
  };
  // An FFN worker first: it has no block size, so it is not the reference for one.
  v1::RegisterWorkerRequest ffn = FfnRegistration(Half("ffn-0", 0, true));
  ffn.set_num_kv_blocks(16);  // ignored: an FFN worker holds no KV
  auto f = core.AddWorker(ffn, 0);
  ASSERT_TRUE(f.ok()) << f.status();
  WorkerSpec eight = Spec(v1::WORKER_ROLE_PREFILL, "prefill-0");
  eight.block_size = 8;
  ASSERT_TRUE(core.AddWorker(Registration(eight), 0).ok());
  // From now on block sizes are compared with the prefill worker's.
  expect_invalid(AttentionRegistration(Spec(v1::WORKER_ROLE_DECODE, "a"), "g0"),
                 "block_size 4 differs from the workers' 8");
  WorkerSpec att = Spec(v1::WORKER_ROLE_DECODE, "attention-0");
  att.block_size = 8;
  auto a = core.AddWorker(AttentionRegistration(att, "g0"), 0);
  ASSERT_TRUE(a.ok()) << a.status();
  // A later FFN worker with block_size 0 (or anything) passes.
  v1::RegisterWorkerRequest ffn1 = FfnRegistration(Half("ffn-1", 4));
  ffn1.set_block_size(3);
  ASSERT_TRUE(core.AddWorker(ffn1, 0).ok());
  const v1::StatsResponse stats = core.Stats();
  EXPECT_EQ(StatsOf(stats, *f).num_kv_blocks(), 0);
  EXPECT_EQ(StatsOf(stats, *f).role(), v1::WORKER_ROLE_FFN);
  EXPECT_EQ(StatsOf(stats, *f).afd_group(), "g0");
  EXPECT_EQ(StatsOf(stats, *a).afd_group(), "g0");
  EXPECT_TRUE(StatsOf(stats, *a).afd_complete());

  v1::RegisterWorkerRequest reg = AttentionRegistration(att, "");
  expect_invalid(reg, "an attention worker needs an afd_group");
  reg = AttentionRegistration(att, "g0");
  reg.clear_kv_address();
  expect_invalid(reg, "an attention worker needs a kv_address");
  reg = AttentionRegistration(att, "g0");
  reg.set_num_kv_blocks(0);
  expect_invalid(reg, "num_kv_blocks must be > 0, got 0");

  FfnSpec spec = Half("ffn-2", 0);
  spec.group = "";
  expect_invalid(FfnRegistration(spec), "an FFN worker needs an afd_group");
  reg = FfnRegistration(Half("ffn-2", 0));
  reg.mutable_ffn()->clear_address();
  expect_invalid(reg, "an FFN worker needs ffn.address");
  spec = Half("ffn-2", 0);
  spec.experts = {6, 8};
  expect_invalid(FfnRegistration(spec), "ffn expert 8 is outside [0, 8)");
  spec.experts = {6, 6};
  expect_invalid(FfnRegistration(spec), "ffn expert 6 is listed twice");
  reg = FfnRegistration(Half("ffn-2", 0));
  reg.set_num_layers(0);
  expect_invalid(reg, "num_layers must be > 0, got 0");
  reg = FfnRegistration(Half("ffn-2", 0));
  reg.set_max_running(-1);
  expect_invalid(reg, "max_running must be >= 0, got -1");
  reg = FfnRegistration(Half("ffn-2", 0));
  reg.set_model_id("other-model");
  expect_invalid(reg, "model_id 'other-model' differs from the workers' 'test-model'");
  reg = FfnRegistration(Half("ffn-2", 0));
  reg.set_vocab_size(100);
  expect_invalid(reg, "vocab_size 100 differs from the workers' 32000");
}

class AfdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_.decode_lookahead_tokens = 4;
    core_ = std::make_unique<SchedulerCore>(config_);
    p_ = Add(Registration(Spec(v1::WORKER_ROLE_PREFILL, "prefill-0")));
    a0_ = Add(AttentionRegistration(Spec(v1::WORKER_ROLE_DECODE, "attention-0"), "g0"));
    a1_ = Add(AttentionRegistration(Spec(v1::WORKER_ROLE_DECODE, "attention-1"), "g0"));
  }
  WorkerId Add(const v1::RegisterWorkerRequest& reg) {
    auto id = core_->AddWorker(reg, 0);
    EXPECT_TRUE(id.ok()) << id.status();
    return id.ok() ? *id : 0;
  }
  // Both halves of the model: the group is complete.
  void AddFfns() {
    f0_ = Add(FfnRegistration(Half("ffn-0", 0, /*shared=*/true)));
    f1_ = Add(FfnRegistration(Half("ffn-1", 4)));
  }
  Sent Take() { return Sent(core_->TakeOutbox()); }
  void Send(WorkerId w, const v1::WorkerMessage& m) { core_->OnWorkerMessage(w, m, 0); }
  Sent SubmitAndSchedule(uint64_t client, int prompt = 10, int max_tokens = 8) {
    core_->Submit(kFe, MakeSubmit(client, Iota(prompt), max_tokens), 0);
    core_->Schedule(0);
    return Take();
  }
  // Places a request on the prefill worker and brings it to decoding on its attention worker.
  uint64_t Decoding(uint64_t client, WorkerId attention) {
    Sent placed = SubmitAndSchedule(client);
    EXPECT_EQ(placed.expects(attention).size(), 1u);
    const auto adds = placed.adds(p_);
    EXPECT_EQ(adds.size(), 1u);
    const uint64_t id = adds.empty() ? 0 : adds[0].request_id();
    Send(p_, TokenMsg(id, 0, 7));
    Send(p_, KvSentMsg(id, 0));
    Send(attention, KvReadyMsg(id, 0));
    Send(attention, TokenMsg(id, 0, 8));
    Sent decoding = Take();
    EXPECT_EQ(decoding.adds(attention).size(), 1u);
    return id;
  }
  static std::vector<uint64_t> PeerIds(const v1::AfdPeers& peers) {
    std::vector<uint64_t> ids;
    for (const v1::AfdPeer& p : peers.peers()) ids.push_back(p.worker_id());
    return ids;
  }
  // Nothing at all was sent to the FFN workers.
  void ExpectNothingFor(const Sent& sent, std::vector<WorkerId> ids) {
    for (const auto& [to, m] : sent.box.to_workers) {
      for (WorkerId id : ids) EXPECT_NE(to, id) << m.ShortDebugString();
    }
  }

  SchedulerConfig config_;
  std::unique_ptr<SchedulerCore> core_;
  WorkerId p_ = 0, a0_ = 0, a1_ = 0, f0_ = 0, f1_ = 0;
};

TEST_F(AfdTest, RequestsGoToAttentionWorkersOfACompleteGroup) {
  Sent registered = Take();
  // Each attention worker heard once, at its registration: no FFN worker yet.
  ASSERT_EQ(registered.afd_peers(a0_).size(), 1u);
  ASSERT_EQ(registered.afd_peers(a1_).size(), 1u);
  EXPECT_EQ(registered.afd_peers(a0_)[0].peers_size(), 0);
  EXPECT_FALSE(registered.afd_peers(a0_)[0].complete());
  AddFfns();
  Sent joined = Take();
  for (WorkerId a : {a0_, a1_}) {
    const auto peers = joined.afd_peers(a);
    ASSERT_EQ(peers.size(), 2u);  // one per FFN registration
    EXPECT_FALSE(peers[0].complete());
    EXPECT_TRUE(peers[1].complete());
    EXPECT_EQ(PeerIds(peers[1]), (std::vector<uint64_t>{f0_, f1_}));
    EXPECT_EQ(peers[1].peers(0).name(), "ffn-0");
    EXPECT_EQ(peers[1].peers(1).shard().address(), "ffn-1:7100");
    EXPECT_EQ(std::vector<int32_t>(peers[1].peers(1).shard().experts().begin(),
                                   peers[1].peers(1).shard().experts().end()),
              Iota(4, 4));
  }
  ExpectNothingFor(joined, {p_, f0_, f1_});
  EXPECT_TRUE(core_->HasServingCapacity());
  EXPECT_EQ(core_->NotReadyReason(), "");
  EXPECT_TRUE(StatsOf(core_->Stats(), a0_).afd_complete());

  // Two requests: one on each attention worker (the router's most-free rule), KV sent there.
  core_->Submit(kFe, MakeSubmit(1, Iota(10), 8), 0);
  core_->Submit(kFe, MakeSubmit(2, Iota(10, 500), 8), 0);
  core_->Schedule(0);
  Sent placed = Take();
  ASSERT_EQ(placed.expects(a0_).size(), 1u);
  ASSERT_EQ(placed.expects(a1_).size(), 1u);
  const auto adds = placed.adds(p_);
  ASSERT_EQ(adds.size(), 2u);
  EXPECT_EQ(adds[0].kv_target().worker_id(), a0_);
  EXPECT_EQ(adds[0].kv_target().address(), "attention-0:7000");
  EXPECT_EQ(adds[1].kv_target().worker_id(), a1_);
  ExpectNothingFor(placed, {f0_, f1_});

  const uint64_t id = adds[0].request_id();
  Send(p_, TokenMsg(id, 0, 7));
  Send(p_, KvSentMsg(id, 0));
  Send(a0_, KvReadyMsg(id, 0));
  Sent decoding = Take();
  ASSERT_EQ(decoding.adds(a0_).size(), 1u);
  Send(a0_, TokenMsg(id, 0, 9, /*finished=*/true));
  v1::CancelRequest cancel;
  cancel.set_client_id(2);
  core_->Cancel(kFe, cancel);
  Sent ended = Take();
  ExpectNothingFor(ended, {f0_, f1_});
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(AfdTest, IncompleteGroupFailsFastThenServesOnceComplete) {
  f0_ = Add(FfnRegistration(Half("ffn-0", 0, true)));
  Sent half = Take();
  ASSERT_EQ(half.afd_peers(a1_).size(), 2u);
  EXPECT_EQ(PeerIds(half.afd_peers(a1_)[1]), std::vector<uint64_t>{f0_});
  EXPECT_FALSE(half.afd_peers(a1_)[1].complete());
  EXPECT_FALSE(StatsOf(core_->Stats(), a0_).afd_complete());
  const std::string why = "no decode capacity: AFD group g0 is incomplete: expert 4 has no FFN worker";
  EXPECT_FALSE(core_->HasServingCapacity());
  EXPECT_EQ(core_->NotReadyReason(), why);

  Sent refused = SubmitAndSchedule(1);
  ASSERT_EQ(refused.events(kFe).size(), 1u);
  EXPECT_EQ(refused.events(kFe)[0].error_code(), kUnavailable);
  EXPECT_EQ(refused.events(kFe)[0].error_message(), why);
  EXPECT_EQ(refused.num_worker_messages(), 0u);

  f1_ = Add(FfnRegistration(Half("ffn-1", 4)));
  Sent complete = Take();
  for (WorkerId a : {a0_, a1_}) {
    ASSERT_EQ(complete.afd_peers(a).size(), 1u);
    EXPECT_TRUE(complete.afd_peers(a)[0].complete());
    EXPECT_EQ(PeerIds(complete.afd_peers(a)[0]), (std::vector<uint64_t>{f0_, f1_}));
  }
  EXPECT_EQ(core_->NotReadyReason(), "");
  Sent placed = SubmitAndSchedule(2);
  EXPECT_EQ(placed.expects(a0_).size(), 1u);
  EXPECT_EQ(placed.adds(p_).size(), 1u);
}

TEST_F(AfdTest, ReadinessNamesEveryIncompleteGroup) {
  SchedulerCore empty{SchedulerConfig()};
  EXPECT_EQ(empty.NotReadyReason(), "");  // no workers at all: not the scheduler's business
  EXPECT_EQ(core_->NotReadyReason(), "no decode capacity: AFD group g0 is incomplete: no FFN worker");
  Add(AttentionRegistration(Spec(v1::WORKER_ROLE_DECODE, "attention-2"), "g1"));
  Add(FfnRegistration(Half("ffn-9", 0, true)));
  EXPECT_EQ(core_->NotReadyReason(),
            "no decode capacity: AFD group g0 is incomplete: expert 4 has no FFN worker; "
            "AFD group g1 is incomplete: no FFN worker");
  Send(p_, DrainMsg());
  EXPECT_NE(core_->NotReadyReason().find("(and no prefill worker either)"), std::string::npos);
}

TEST_F(AfdTest, LostFfnWorkerFailsTheGroupsRequestsAndFreesTheirBlocks) {
  AddFfns();
  Take();
  const v1::StatsResponse before = core_->Stats();
  const uint64_t decoding = Decoding(1, a0_);
  Sent second = SubmitAndSchedule(2);  // still prefilling, blocks reserved on attention-1
  ASSERT_EQ(second.expects(a1_).size(), 1u);
  const uint64_t prefilling = second.adds(p_).at(0).request_id();
  EXPECT_NE(BlocksNotAllFree(core_->Stats()), "");

  core_->RemoveWorker(f1_, "worker 5 disconnected");
  Sent lost = Take();
  const auto events = lost.events(kFe);
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].client_id(), 1u);
  EXPECT_EQ(events[0].error_code(), kUnavailable);
  EXPECT_EQ(events[0].error_message(),
            "AFD group g0 lost FFN worker ffn-1 (worker 5 disconnected); the request was running on "
            "attention-0");
  EXPECT_EQ(events[1].client_id(), 2u);
  EXPECT_EQ(events[1].error_code(), kUnavailable);
  EXPECT_NE(events[1].error_message().find("running on attention-1"), std::string::npos);
  // Not re-run: nothing placed again; the workers are told FAILED.
  EXPECT_TRUE(lost.expects(a0_).empty() && lost.expects(a1_).empty());
  ASSERT_EQ(lost.removes(a0_).size(), 1u);
  EXPECT_EQ(lost.removes(a0_)[0].request_id(), decoding);
  EXPECT_EQ(lost.removes(a0_)[0].reason(), v1::REMOVE_REASON_FAILED);
  ASSERT_EQ(lost.removes(a1_).size(), 1u);
  EXPECT_EQ(lost.removes(a1_)[0].request_id(), prefilling);
  ASSERT_EQ(lost.removes(p_).size(), 1u);
  EXPECT_EQ(lost.removes(p_)[0].request_id(), prefilling);
  for (WorkerId a : {a0_, a1_}) {
    ASSERT_EQ(lost.afd_peers(a).size(), 1u);
    EXPECT_FALSE(lost.afd_peers(a)[0].complete());
    EXPECT_EQ(PeerIds(lost.afd_peers(a)[0]), std::vector<uint64_t>{f0_});
  }
  const v1::StatsResponse after = core_->Stats();
  for (WorkerId w : {p_, a0_, a1_}) {
    EXPECT_EQ(StatsOf(after, w).free_blocks(), StatsOf(before, w).free_blocks()) << w;
    EXPECT_EQ(StatsOf(after, w).num_running(), 0) << w;
  }
  EXPECT_EQ(after.num_running(), 0);

  Sent refused = SubmitAndSchedule(3);
  ASSERT_EQ(refused.events(kFe).size(), 1u);
  EXPECT_EQ(refused.events(kFe)[0].error_code(), kUnavailable);
  EXPECT_EQ(refused.events(kFe)[0].error_message(),
            "no decode capacity: AFD group g0 is incomplete: expert 4 has no FFN worker");

  const WorkerId back = Add(FfnRegistration(Half("ffn-1b", 4)));
  Sent rejoined = Take();
  ASSERT_EQ(rejoined.afd_peers(a0_).size(), 1u);
  EXPECT_TRUE(rejoined.afd_peers(a0_)[0].complete());
  EXPECT_EQ(PeerIds(rejoined.afd_peers(a0_)[0]), (std::vector<uint64_t>{f0_, back}));
  EXPECT_EQ(SubmitAndSchedule(4).adds(p_).size(), 1u);
}

TEST_F(AfdTest, FfnLeaseExpiryFailsRequestsNamingIt) {
  AddFfns();
  Take();
  Decoding(1, a0_);
  const Clock later = config_.lease_ms + 1;
  for (WorkerId w : {p_, a0_, a1_, f1_}) core_->Heartbeat(w, later);
  EXPECT_EQ(core_->ExpireLeases(later), std::vector<WorkerId>{f0_});
  Sent lost = Take();
  ASSERT_EQ(lost.events(kFe).size(), 1u);
  EXPECT_EQ(lost.events(kFe)[0].error_message(),
            "AFD group g0 lost FFN worker ffn-0 (lease expired); the request was running on "
            "attention-0");
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(AfdTest, DrainingFfnWorkerStopsNewRequestsButNotRunningOnes) {
  AddFfns();
  Take();
  const uint64_t id = Decoding(1, a0_);
  Send(f1_, DrainMsg());
  Sent drained = Take();
  EXPECT_TRUE(drained.events(kFe).empty());
  EXPECT_TRUE(drained.removes(a0_).empty());
  for (WorkerId a : {a0_, a1_}) {
    ASSERT_EQ(drained.afd_peers(a).size(), 1u);
    EXPECT_FALSE(drained.afd_peers(a)[0].complete());
    // Still listed: it serves the calls of requests in flight until it leaves.
    EXPECT_EQ(PeerIds(drained.afd_peers(a)[0]), (std::vector<uint64_t>{f0_, f1_}));
  }
  EXPECT_TRUE(StatsOf(core_->Stats(), f1_).draining());
  EXPECT_FALSE(StatsOf(core_->Stats(), a0_).afd_complete());
  Send(f1_, DrainMsg());
  EXPECT_TRUE(Take().afd_peers(a0_).empty());  // no change, no news

  Sent refused = SubmitAndSchedule(2);
  ASSERT_EQ(refused.events(kFe).size(), 1u);
  EXPECT_EQ(refused.events(kFe)[0].error_code(), kUnavailable);
  EXPECT_NE(refused.events(kFe)[0].error_message().find("expert 4 has no FFN worker"),
            std::string::npos);

  // The running request goes on.
  Send(a0_, TokenMsg(id, 0, 10));
  Sent streamed = Take();
  ASSERT_EQ(streamed.events(kFe).size(), 1u);
  EXPECT_EQ(streamed.events(kFe)[0].tokens_size(), 1);
  EXPECT_EQ(streamed.events(kFe)[0].error_code(), 0);

  // A replacement completes the group; the drained worker then leaves without harm.
  const WorkerId f2 = Add(FfnRegistration(Half("ffn-2", 4)));
  Sent replaced = Take();
  ASSERT_EQ(replaced.afd_peers(a0_).size(), 1u);
  EXPECT_TRUE(replaced.afd_peers(a0_)[0].complete());
  EXPECT_EQ(PeerIds(replaced.afd_peers(a0_)[0]), (std::vector<uint64_t>{f0_, f1_, f2}));
  core_->RemoveWorker(f1_, "worker 5 disconnected");
  Sent left = Take();
  EXPECT_TRUE(left.events(kFe).empty());
  EXPECT_TRUE(left.removes(a0_).empty());
  ASSERT_EQ(left.afd_peers(a0_).size(), 1u);
  EXPECT_TRUE(left.afd_peers(a0_)[0].complete());
  EXPECT_EQ(PeerIds(left.afd_peers(a0_)[0]), (std::vector<uint64_t>{f0_, f2}));
  EXPECT_EQ(StatsOf(core_->Stats(), a0_).num_running(), 1);
}

TEST_F(AfdTest, DrainedFfnLeavingAnIncompleteGroupFailsItsRequests) {
  AddFfns();
  Take();
  Decoding(1, a0_);
  Send(f1_, DrainMsg());
  Take();
  core_->RemoveWorker(f1_, "worker 5 disconnected");
  Sent left = Take();
  ASSERT_EQ(left.events(kFe).size(), 1u);
  EXPECT_EQ(left.events(kFe)[0].error_code(), kUnavailable);
  EXPECT_NE(left.events(kFe)[0].error_message().find("lost FFN worker ffn-1"), std::string::npos);
  EXPECT_EQ(BlocksNotAllFree(core_->Stats()), "");
}

TEST_F(AfdTest, DecodeWorkerServesBesideAnIncompleteGroup) {
  const WorkerId d = Add(Registration(Spec(v1::WORKER_ROLE_DECODE, "decode-0")));
  Take();
  EXPECT_TRUE(core_->HasServingCapacity());
  EXPECT_EQ(core_->NotReadyReason(), "");
  Sent placed = SubmitAndSchedule(1, 40);
  EXPECT_EQ(placed.expects(d).size(), 1u);
  EXPECT_TRUE(placed.expects(a0_).empty() && placed.expects(a1_).empty());

  // Admitted while decode-0 was there; only a small decode worker is left when it is placed: it
  // would fit the attention workers, whose group is what is missing (not "does not fit").
  core_->Submit(kFe, MakeSubmit(2, Iota(40), 8), 0);
  Add(Registration(Spec(v1::WORKER_ROLE_DECODE, "decode-small", 4)));
  core_->RemoveWorker(d, "gone");
  core_->Schedule(0);
  Sent failed = Take();
  std::vector<v1::RequestEvent> errors;
  for (const auto& e : failed.events(kFe)) {
    if (e.client_id() == 2 && !e.accepted()) errors.push_back(e);
  }
  ASSERT_EQ(errors.size(), 1u);
  EXPECT_EQ(errors[0].error_code(), kUnavailable);
  EXPECT_EQ(errors[0].error_message(), "no decode capacity: AFD group g0 is incomplete: no FFN worker");
}

TEST_F(AfdTest, FfnWorkersDoNotLimitOrHoldRequests) {
  FfnSpec dense;  // a dense model: one FFN worker is the group
  dense.name = "ffn-dense";
  v1::RegisterWorkerRequest reg = FfnRegistration(dense);
  reg.set_max_model_len(8);  // the attention workers' limit is what counts
  f0_ = Add(reg);
  Take();
  Sent placed = SubmitAndSchedule(1, 20);
  ASSERT_EQ(placed.adds(p_).size(), 1u);
  EXPECT_EQ(placed.events(kFe).size(), 1u);
  EXPECT_TRUE(placed.events(kFe)[0].accepted());
  ExpectNothingFor(placed, {f0_});
  EXPECT_EQ(StatsOf(core_->Stats(), f0_).num_running(), 0);
}

// The service: AfdPeers queued before the attention worker's stream opens reach it; /ready, the
// Stats RPC, /metrics and service discovery know the new roles.
TEST(AfdServiceTest, PeersReadinessAndMetrics) {
  SchedulerServerOptions options;
  options.listen = "127.0.0.1:0";
  options.http = "127.0.0.1:0";
  auto server = SchedulerServer::Start(options);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = v1::Scheduler::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string((*server)->port()), grpc::InsecureChannelCredentials()));
  auto reg = [&](v1::RegisterWorkerRequest r, const std::string& http) {
    r.set_http_address(http);
    v1::RegisterWorkerResponse reply;
    grpc::ClientContext ctx;
    EXPECT_TRUE(stub->RegisterWorker(&ctx, r, &reply).ok()) << r.name();
    return reply.worker_id();
  };
  const int http = (*server)->http_port();
  reg(Registration(Spec(v1::WORKER_ROLE_PREFILL, "prefill-0")), "");
  const uint64_t a = reg(AttentionRegistration(Spec(v1::WORKER_ROLE_DECODE, "attention-0"), "g0"),
                         "127.0.0.1:9201");
  const uint64_t f0 = reg(FfnRegistration(Half("ffn-0", 0, true)), "127.0.0.1:9202");

  // The control plane stays ready (FFN workers must still reach it); serving is what is not.
  EXPECT_EQ(cleave::testing::HttpGet(http, "/ready").status, 200);
  const auto ready = cleave::testing::HttpGet(http, "/ready/serving");
  EXPECT_EQ(ready.status, 503);
  EXPECT_NE(ready.body.find("AFD group g0 is incomplete: expert 4 has no FFN worker"), std::string::npos)
      << ready.body;
  const std::string metrics = cleave::testing::HttpGet(http, "/metrics").body;
  for (const char* line : {"cleave_scheduler_workers{role=\"attention\"} 1\n",
                           "cleave_scheduler_workers{role=\"ffn\"} 1\n",
                           "cleave_scheduler_worker_kv_blocks{worker=\"ffn-0\",role=\"ffn\"} 0\n",
                           "cleave_scheduler_worker_kv_blocks{worker=\"attention-0\",role=\"attention\"} 64\n"}) {
    EXPECT_NE(metrics.find(line), std::string::npos) << line << metrics;
  }
  const auto sd = nlohmann::json::parse(cleave::testing::HttpGet(http, "/discovery/prometheus").body);
  ASSERT_EQ(sd.size(), 2u);
  EXPECT_EQ(sd[0]["labels"]["role"], "attention");
  EXPECT_EQ(sd[1]["labels"]["role"], "ffn");
  v1::StatsResponse stats;
  {
    grpc::ClientContext ctx;
    ASSERT_TRUE(stub->Stats(&ctx, v1::StatsRequest(), &stats).ok());
  }
  EXPECT_EQ(StatsOf(stats, a).role(), v1::WORKER_ROLE_ATTENTION);
  EXPECT_EQ(StatsOf(stats, a).afd_group(), "g0");
  EXPECT_FALSE(StatsOf(stats, a).afd_complete());
  EXPECT_EQ(StatsOf(stats, f0).afd_group(), "g0");

  // The stream opens after both AfdPeers were sent: they waited in its queue.
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(20));
  auto stream = stub->WorkerStream(&ctx);
  v1::WorkerMessage hello;
  hello.set_hello_worker_id(a);
  ASSERT_TRUE(stream->Write(hello));
  v1::SchedulerMessage msg;
  ASSERT_TRUE(stream->Read(&msg));
  ASSERT_TRUE(msg.has_afd_peers()) << msg.ShortDebugString();
  EXPECT_EQ(msg.afd_peers().peers_size(), 0);  // at its registration
  ASSERT_TRUE(stream->Read(&msg));
  ASSERT_TRUE(msg.has_afd_peers());
  EXPECT_EQ(msg.afd_peers().peers_size(), 1);
  EXPECT_FALSE(msg.afd_peers().complete());
  const uint64_t f1 = reg(FfnRegistration(Half("ffn-1", 4)), "");
  ASSERT_TRUE(stream->Read(&msg));
  ASSERT_TRUE(msg.has_afd_peers());
  EXPECT_TRUE(msg.afd_peers().complete());
  ASSERT_EQ(msg.afd_peers().peers_size(), 2);
  EXPECT_EQ(msg.afd_peers().peers(1).worker_id(), f1);
  EXPECT_EQ(cleave::testing::HttpGet(http, "/ready/serving").status, 200);
  ctx.TryCancel();
  (void)stream->Finish();
}

}  // namespace
}  // namespace cleave::scheduler
