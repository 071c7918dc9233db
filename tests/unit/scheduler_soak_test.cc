// Randomized soak: fake prefill / decode / colocated workers and two frontends drive SchedulerCore
// with thousands of random events (submissions, steps, KV notices in any order, failures,
// cancellations, lost workers, junk and stale messages). Checked after every event:
//   - the scheduler's used blocks on each worker are exactly the blocks of the tables that worker
//     was told about (no leak, no double free), and a block a request writes is in no other
//     request's table on that worker;
//   - junk never causes a message; no message goes to a lost worker;
//   - every request gets exactly one terminal event (or was cancelled), nothing after it, and never
//     more tokens than max_tokens;
// and at the end, with every request gone, every worker's blocks are all free.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/scheduler/scheduler_core.h"
#include "cleave/scheduler/testing/fake_messages.h"

namespace cleave::scheduler {
namespace {

using testing::MakeSubmit;
using testing::Registration;
using testing::WorkerSpec;

constexpr int kBlockSize = 4;

struct FakeRequest {
  uint32_t attempt = 0;
  std::vector<int32_t> table;  // blocks the scheduler holds for it on this worker
  bool added = false;          // AddRequest received
  bool expecting = false;      // decode: ExpectKv received, KvReady not sent
  bool first_sent = false;     // prefill
  bool kv_sent = false;        // prefill
  int remaining = 0;           // max_new_tokens left
};

struct FakeWorker {
  WorkerId id = 0;
  v1::WorkerRole role = v1::WORKER_ROLE_COLOCATED;
  std::map<uint64_t, FakeRequest> requests;
};

struct ClientRecord {
  int max_tokens = 0;
  int tokens = 0;
  int events = 0;
  bool terminal = false;
  bool cancelled = false;
};

enum class Mode { kPd, kColocated };

class Soak {
 public:
  Soak(uint32_t seed, Mode mode, Policy policy) : rng_(seed), mode_(mode) {
    SchedulerConfig config;
    config.policy = policy;
    config.max_waiting = 24;
    config.max_waiting_tokens = 600;
    config.lease_ms = 1000;
    config.no_capacity_timeout_ms = 2000;
    config.decode_lookahead_tokens = 3;
    config.seed = seed;
    core_ = std::make_unique<SchedulerCore>(config);
    lease_ms_ = config.lease_ms;
    if (mode == Mode::kPd) {
      for (int i = 0; i < 2; ++i) AddWorker(v1::WORKER_ROLE_PREFILL);
      for (int i = 0; i < 2; ++i) AddWorker(v1::WORKER_ROLE_DECODE);
    } else {
      for (int i = 0; i < 2; ++i) AddWorker(v1::WORKER_ROLE_COLOCATED);
    }
    for (int i = 0; i < 8; ++i) {  // shared prefixes, so the prefix cache is exercised
      prefixes_.push_back(RandomTokens(Uniform(0, 24)));
    }
  }

  void Run(int num_events) {
    for (int i = 0; i < num_events && !::testing::Test::HasFatalFailure(); ++i) {
      now_ += Uniform(0, 20);
      const int dice = Uniform(0, 99);
      recently_ended_.clear();
      if (dice < 20) {
        Submit();
      } else if (dice < 35) {
        core_->Schedule(now_);
      } else if (dice < 75) {
        StepRandomWorker();
      } else if (dice < 82) {
        CancelRandom();
      } else if (dice < 92) {
        Junk();
      } else if (dice < 94) {
        LoseRandomWorker();
      } else if (dice < 96) {
        ReplaceMissingWorkers();
      } else if (dice < 97) {
        core_->RemoveFrontend(RemoveRandomFrontend());
      } else {
        Heartbeats();
      }
      Deliver();
      CheckBlocks();
    }
  }

  // Lets every request finish or be cancelled, then checks the end state.
  void Drain() {
    ReplaceMissingWorkers();
    Deliver();
    for (int i = 0; i < 3000; ++i) {
      now_ += 5;
      Heartbeats();
      core_->Schedule(now_);
      Deliver();
      for (auto& [id, w] : workers_) {
        recently_ended_.clear();
        StepWorker(w, /*allow_failures=*/false);
        Deliver();
      }
      CheckBlocks();
    }
    for (FrontendId fe : {FrontendId{1}, FrontendId{2}}) {
      core_->RemoveFrontend(fe);
      MarkFrontendCancelled(fe);
    }
    Deliver();
    const v1::StatsResponse stats = core_->Stats();
    EXPECT_EQ(testing::BlocksNotAllFree(stats), "");
    EXPECT_EQ(stats.num_waiting(), 0);
    EXPECT_EQ(stats.num_running(), 0);
    for (const auto& [id, w] : workers_) EXPECT_TRUE(w.requests.empty()) << "worker " << id;
    int finished = 0;
    for (const auto& [key, rec] : clients_) {
      EXPECT_EQ(rec.terminal + rec.cancelled, 1)
          << "frontend " << key.first << " client " << key.second;
      finished += rec.terminal;
    }
    EXPECT_GT(finished, 100);
    EXPECT_EQ(unmatched_removes_, 0);
    std::printf(
        "soak: %zu requests, %d with a terminal event, %llu preempted, %llu prefix hit tokens\n",
        clients_.size(), finished, static_cast<unsigned long long>(stats.num_preempted()),
        static_cast<unsigned long long>(stats.prefix_cache_hit_tokens()));
  }

 private:
  int Uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }
  bool Chance(double p) { return std::bernoulli_distribution(p)(rng_); }
  std::vector<int32_t> RandomTokens(int n) {
    std::vector<int32_t> v(n);
    for (auto& t : v) t = Uniform(0, 40);
    return v;
  }

  void AddWorker(v1::WorkerRole role) {
    WorkerSpec spec;
    spec.role = role;
    spec.block_size = kBlockSize;
    spec.num_kv_blocks = Uniform(16, 40);
    spec.max_running = Uniform(3, 12);
    spec.max_batch_tokens = 32;
    spec.max_model_len = 128;
    spec.name = absl::StrCat("w", next_name_++);
    auto id = core_->AddWorker(Registration(spec), now_);
    ASSERT_TRUE(id.ok()) << id.status();
    workers_[*id] = FakeWorker{*id, role, {}};
    heartbeat_[*id] = now_;
  }

  void Submit() {
    const FrontendId fe = Uniform(1, 2);
    const uint64_t client = next_client_++;
    std::vector<int32_t> prompt;
    if (Chance(0.7)) prompt = prefixes_[Uniform(0, prefixes_.size() - 1)];
    const auto tail = RandomTokens(Uniform(0, 30));
    prompt.insert(prompt.end(), tail.begin(), tail.end());
    int max_tokens = Uniform(-1, 40);
    if (Chance(0.02)) prompt = RandomTokens(130);  // too long
    v1::SubmitRequest s = MakeSubmit(client, prompt, max_tokens, Uniform(0, 3));
    if (Chance(0.3)) s.add_stop_token_ids(Uniform(0, 40));
    if (Chance(0.05)) {  // a client id still live on this frontend: rejected, nothing else
      for (const auto& [key, rec] : clients_) {
        if (key.first == fe && !rec.terminal && !rec.cancelled) {
          s.set_client_id(key.second);
          ++duplicates_pending_[key];
          break;
        }
      }
    }
    if (s.client_id() == client) clients_[{fe, client}] = ClientRecord{max_tokens};
    core_->Submit(fe, s, now_);
  }

  void CancelRandom() {
    if (clients_.empty()) return;
    auto it = clients_.lower_bound({Uniform(1, 2), Uniform(0, next_client_)});
    if (it == clients_.end()) return;
    v1::CancelRequest c;
    c.set_client_id(it->first.second);
    c.set_finished(Chance(0.3));
    core_->Cancel(it->first.first, c);
    if (!it->second.terminal) it->second.cancelled = true;
  }

  FrontendId RemoveRandomFrontend() {
    const FrontendId fe = Uniform(1, 2);
    MarkFrontendCancelled(fe);
    return fe;
  }
  void MarkFrontendCancelled(FrontendId fe) {
    for (auto& [key, rec] : clients_) {
      if (key.first == fe && !rec.terminal) rec.cancelled = true;
    }
  }

  void Heartbeats() {
    for (auto& [id, t] : heartbeat_) {
      t = now_;
      EXPECT_TRUE(core_->Heartbeat(id, now_));
    }
  }

  void LoseRandomWorker() {
    if (workers_.empty()) return;
    auto it = workers_.begin();
    std::advance(it, Uniform(0, workers_.size() - 1));
    const WorkerId victim = it->first;
    if (Chance(0.5)) {
      core_->RemoveWorker(victim, "stream closed");
    } else {
      now_ += lease_ms_ + 1;
      heartbeat_.erase(victim);
      Heartbeats();
      EXPECT_EQ(core_->ExpireLeases(now_), std::vector<WorkerId>{victim});
    }
    workers_.erase(victim);
    heartbeat_.erase(victim);
    dead_.insert(victim);
  }

  void ReplaceMissingWorkers() {
    std::map<v1::WorkerRole, int> count;
    for (const auto& [id, w] : workers_) ++count[w.role];
    if (mode_ == Mode::kPd) {
      while (count[v1::WORKER_ROLE_PREFILL]++ < 2) AddWorker(v1::WORKER_ROLE_PREFILL);
      while (count[v1::WORKER_ROLE_DECODE]++ < 2) AddWorker(v1::WORKER_ROLE_DECODE);
    } else {
      while (count[v1::WORKER_ROLE_COLOCATED]++ < 2) AddWorker(v1::WORKER_ROLE_COLOCATED);
    }
  }

  void StepRandomWorker() {
    if (workers_.empty()) return;
    auto it = workers_.begin();
    std::advance(it, Uniform(0, workers_.size() - 1));
    StepWorker(it->second, /*allow_failures=*/true);
  }

  // One iteration of a fake worker: tokens, KV notices and failures for some of its requests.
  void StepWorker(FakeWorker& w, bool allow_failures) {
    v1::WorkerMessage step;
    std::vector<v1::WorkerMessage> notices;
    std::vector<uint64_t> erase;
    const double fail = allow_failures ? 0.01 : 0.0;
    for (auto& [id, r] : w.requests) {
      if (!Chance(0.6)) continue;
      if (Chance(fail)) {
        v1::RequestFailure* f = step.mutable_step()->add_failures();
        f->set_request_id(id);
        f->set_attempt(r.attempt);
        f->set_message("injected");
        erase.push_back(id);
        continue;
      }
      if (r.expecting) {
        v1::WorkerMessage m = Chance(allow_failures ? 0.05 : 0.0)
                                  ? testing::KvFailedMsg(id, r.attempt, "injected")
                                  : testing::KvReadyMsg(id, r.attempt);
        if (m.has_kv_failed()) erase.push_back(id);
        r.expecting = false;
        notices.push_back(m);
        continue;
      }
      if (!r.added) continue;
      const bool prefill = w.role == v1::WORKER_ROLE_PREFILL;
      if (prefill && !r.kv_sent && Chance(0.5)) {
        notices.push_back(testing::KvSentMsg(id, r.attempt));
        r.kv_sent = true;
        r.table.clear();
        if (r.first_sent) erase.push_back(id);
        continue;
      }
      if (prefill && r.first_sent) continue;
      v1::TokenResult* t = step.mutable_step()->add_tokens();
      t->set_request_id(id);
      t->set_attempt(r.attempt);
      t->set_token_id(Uniform(0, 40));
      --r.remaining;
      bool ended = false;
      if (r.remaining <= 0) {
        ended = Chance(0.8);  // sometimes the worker "forgets": the scheduler ends it by length
        t->set_finished_by_length(ended);
      } else if (Chance(0.04)) {
        ended = true;
        t->set_finished(true);
      }
      if (prefill) {
        r.first_sent = true;
        if (ended) {
          erase.push_back(id);
        } else if (r.kv_sent) {
          erase.push_back(id);
        }
      } else if (ended) {
        erase.push_back(id);
      }
    }
    for (uint64_t id : erase) {
      recently_ended_.insert({w.id, id, w.requests[id].attempt});
      w.requests.erase(id);
    }
    // KV notices and step results reach the scheduler in either order.
    const bool step_first = Chance(0.5);
    if (step_first) core_->OnWorkerMessage(w.id, step, now_);
    for (const auto& m : notices) core_->OnWorkerMessage(w.id, m, now_);
    if (!step_first) core_->OnWorkerMessage(w.id, step, now_);
  }

  // Messages no live (worker, request, attempt) owns: the scheduler must ignore every one.
  void Junk() {
    ASSERT_TRUE(core_->TakeOutbox().empty());  // everything before was delivered
    std::vector<WorkerId> ids;
    for (const auto& [id, w] : workers_) ids.push_back(id);
    ids.insert(ids.end(), dead_.begin(), dead_.end());
    ids.push_back(9999);
    WorkerId from = ids[Uniform(0, ids.size() - 1)];
    uint64_t rid = Uniform(0, next_client_ + 5);
    uint32_t attempt = Uniform(0, 4);
    // Usually about a live request: from a worker not holding it, or with another attempt.
    std::vector<std::pair<uint64_t, uint32_t>> live;
    for (const auto& [id, w] : workers_) {
      for (const auto& [r, fr] : w.requests) live.emplace_back(r, fr.attempt);
    }
    if (!live.empty() && Chance(0.7)) {
      std::tie(rid, attempt) = live[Uniform(0, live.size() - 1)];
      if (Chance(0.3)) attempt += Chance(0.5) ? 1 : -1;
    }
    auto it = workers_.find(from);
    if (it != workers_.end() && it->second.requests.count(rid) &&
        it->second.requests[rid].attempt == attempt) {
      return;  // that one is not junk
    }
    v1::WorkerMessage m;
    switch (Uniform(0, 6)) {
      case 0:
        m = testing::TokenMsg(rid, attempt, Uniform(0, 40), Chance(0.5));
        break;
      case 1:
        m = testing::KvReadyMsg(rid, attempt);
        break;
      case 2:
        m = testing::KvSentMsg(rid, attempt);
        break;
      case 3:
        m = testing::KvFailedMsg(rid, attempt, "junk");
        break;
      case 4:
        m = testing::FailureMsg(rid, attempt, "junk");
        break;
      case 5:
        m.set_hello_worker_id(from);
        break;
      default:
        break;  // empty
    }
    core_->OnWorkerMessage(from, m, now_);
    Outbox out = core_->TakeOutbox();
    EXPECT_TRUE(out.empty()) << "junk caused output: " << m.ShortDebugString();
  }

  bool InOtherTable(const FakeWorker& w, uint64_t self, int32_t block) const {
    for (const auto& [id, r] : w.requests) {
      if (id == self) continue;
      for (int32_t b : r.table) {
        if (b == block) return true;
      }
    }
    return false;
  }
  void ExpectWritable(const FakeWorker& w, uint64_t self, auto first, auto last) {
    for (auto it = first; it != last; ++it) {
      EXPECT_FALSE(InOtherTable(w, self, *it))
          << "worker " << w.id << " request " << self << " writes block " << *it
          << " another request holds";
    }
  }

  // Every placement of a request (after a preemption or a re-run) carries a higher attempt.
  void CheckNewAttempt(uint64_t request_id, uint32_t attempt) {
    auto [it, inserted] = last_attempt_.try_emplace(request_id, attempt);
    if (!inserted) {
      EXPECT_GT(attempt, it->second) << "request " << request_id << " placed again";
      it->second = attempt;
    }
  }

  void DeliverToWorker(WorkerId to, const v1::SchedulerMessage& m) {
    ASSERT_FALSE(dead_.count(to)) << "message to lost worker " << to;
    ASSERT_TRUE(workers_.count(to)) << "message to unknown worker " << to;
    FakeWorker& w = workers_[to];
    if (m.has_add()) {
      const v1::AddRequest& a = m.add();
      FakeRequest& r = w.requests[a.request_id()];
      if (w.role == v1::WORKER_ROLE_DECODE) {
        EXPECT_EQ(r.attempt, a.attempt());
        EXPECT_FALSE(r.added);
        EXPECT_EQ(std::vector<int32_t>(a.blocks().begin(), a.blocks().begin() + r.table.size()),
                  r.table);
      } else {
        EXPECT_FALSE(r.added) << "add for a request already there";
        if (w.role == v1::WORKER_ROLE_COLOCATED) CheckNewAttempt(a.request_id(), a.attempt());
        r = FakeRequest();
      }
      r.attempt = a.attempt();
      r.added = true;
      r.remaining = a.max_new_tokens();
      EXPECT_GT(a.max_new_tokens(), 0);
      EXPECT_LT(a.num_computed_tokens(), a.token_ids_size());
      EXPECT_GE(a.blocks_size() * kBlockSize, a.token_ids_size());
      r.table.assign(a.blocks().begin(), a.blocks().end());
      ExpectWritable(w, a.request_id(), a.blocks().begin() + a.num_computed_tokens() / kBlockSize,
                     a.blocks().end());
      if (a.has_kv_target()) {
        auto d = workers_.find(a.kv_target().worker_id());
        ASSERT_NE(d, workers_.end());
        FakeRequest& dr = d->second.requests[a.request_id()];
        EXPECT_EQ(dr.attempt, a.attempt());
        EXPECT_TRUE(dr.expecting);
        dr.table.assign(a.kv_target().blocks().begin(), a.kv_target().blocks().end());
      }
    } else if (m.has_expect_kv()) {
      const v1::ExpectKv& e = m.expect_kv();
      CheckNewAttempt(e.request_id(), e.attempt());
      FakeRequest& r = w.requests[e.request_id()];
      r = FakeRequest();
      r.attempt = e.attempt();
      r.expecting = true;
      r.table.assign(e.blocks().begin(), e.blocks().end());
      ExpectWritable(w, e.request_id(), e.blocks().begin(), e.blocks().end());
    } else if (m.has_append()) {
      const v1::AppendBlocks& a = m.append();
      auto it = w.requests.find(a.request_id());
      ASSERT_NE(it, w.requests.end()) << "append for unknown request";
      EXPECT_EQ(it->second.attempt, a.attempt());
      ExpectWritable(w, a.request_id(), a.blocks().begin(), a.blocks().end());
      it->second.table.insert(it->second.table.end(), a.blocks().begin(), a.blocks().end());
    } else if (m.has_remove()) {
      auto it = w.requests.find(m.remove().request_id());
      if (it != w.requests.end() && it->second.attempt == m.remove().attempt()) {
        w.requests.erase(it);
      } else if (!recently_ended_.count({to, m.remove().request_id(), m.remove().attempt()})) {
        // Only a worker that ended the request in this very event (the messages crossed) may
        // get a RemoveRequest for something it does not hold.
        ++unmatched_removes_;
        ADD_FAILURE() << "remove for a request worker " << to
                      << " does not hold: " << m.remove().ShortDebugString();
      }
    }
  }

  void DeliverToFrontend(FrontendId fe, const v1::RequestEvent& e) {
    const auto key = std::make_pair(fe, e.client_id());
    if (duplicates_pending_[key] > 0 && e.error_code() == 3) {
      --duplicates_pending_[key];  // the rejected duplicate, not the live request's event
      return;
    }
    auto it = clients_.find(key);
    ASSERT_NE(it, clients_.end()) << "event for a client never submitted";
    ClientRecord& rec = it->second;
    EXPECT_FALSE(rec.terminal) << "event after the terminal one, client " << e.client_id();
    EXPECT_FALSE(rec.cancelled) << "event after cancel, client " << e.client_id();
    if (e.accepted()) {
      EXPECT_EQ(rec.events, 0);
    }
    ++rec.events;
    rec.tokens += e.tokens_size();
    EXPECT_LE(rec.tokens, std::max(rec.max_tokens, 0));
    if (e.finished() || e.error_code() != 0) rec.terminal = true;
  }

  void Deliver() {
    for (int round = 0; round < 2; ++round) {
      Outbox out = core_->TakeOutbox();
      for (const auto& [to, m] : out.to_workers) DeliverToWorker(to, m);
      for (const auto& [fe, e] : out.to_frontends) DeliverToFrontend(fe, e);
    }
  }

  void CheckBlocks() {
    const v1::StatsResponse stats = core_->Stats();
    ASSERT_EQ(static_cast<size_t>(stats.workers_size()), workers_.size());
    for (const v1::WorkerStats& ws : stats.workers()) {
      const FakeWorker& w = workers_.at(ws.worker_id());
      std::set<int32_t> held;
      for (const auto& [id, r] : w.requests) held.insert(r.table.begin(), r.table.end());
      ASSERT_EQ(static_cast<int>(held.size()), ws.used_blocks())
          << "worker " << ws.worker_id() << " (" << ws.name() << ")";
      ASSERT_EQ(ws.used_blocks() + ws.free_blocks(), ws.num_kv_blocks());
      ASSERT_LE(ws.cached_blocks(), ws.num_kv_blocks());
    }
  }

  std::mt19937 rng_;
  Mode mode_;
  std::unique_ptr<SchedulerCore> core_;
  int lease_ms_ = 0;
  Clock now_ = 0;
  int next_name_ = 0;
  uint64_t next_client_ = 1;
  std::map<WorkerId, FakeWorker> workers_;
  std::map<WorkerId, Clock> heartbeat_;
  std::set<WorkerId> dead_;
  std::vector<std::vector<int32_t>> prefixes_;
  std::map<std::pair<FrontendId, uint64_t>, ClientRecord> clients_;
  std::map<std::pair<FrontendId, uint64_t>, int> duplicates_pending_;
  int unmatched_removes_ = 0;
  std::map<uint64_t, uint32_t> last_attempt_;
  std::set<std::tuple<WorkerId, uint64_t, uint32_t>> recently_ended_;  // (worker, request, attempt)
};

struct SoakParam {
  Mode mode;
  Policy policy;
  uint32_t seed;
};

class SoakTest : public ::testing::TestWithParam<SoakParam> {};

TEST_P(SoakTest, BlocksBalanceAndEveryRequestEndsOnce) {
  const SoakParam p = GetParam();
  std::printf("seed %u\n", p.seed);
  Soak soak(p.seed, p.mode, p.policy);
  soak.Run(20000);
  soak.Drain();
}

INSTANTIATE_TEST_SUITE_P(Seeds, SoakTest,
                         ::testing::Values(SoakParam{Mode::kPd, Policy::kFcfs, 1},
                                           SoakParam{Mode::kPd, Policy::kPriority, 2},
                                           SoakParam{Mode::kColocated, Policy::kFcfs, 3},
                                           SoakParam{Mode::kColocated, Policy::kPriority, 4},
                                           SoakParam{Mode::kPd, Policy::kPriority, 5}));

}  // namespace
}  // namespace cleave::scheduler
