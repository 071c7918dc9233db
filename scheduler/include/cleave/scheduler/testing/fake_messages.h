// Test helpers for driving SchedulerCore without processes: builders for the messages workers and
// frontends send, and a view of an Outbox by kind and destination. Header-only, no test framework;
// used by tests/unit/scheduler_*_test.cc and bench/scheduler_bench.cc.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cleave/scheduler/scheduler_core.h"
#include "cleave/v1/control.pb.h"

namespace cleave::scheduler::testing {

struct WorkerSpec {
  v1::WorkerRole role = v1::WORKER_ROLE_COLOCATED;
  int num_kv_blocks = 64;
  int block_size = 4;
  int max_running = 64;
  int max_batch_tokens = 256;
  int max_model_len = 4096;
  int num_state_slots = 0;  // Mamba models
  std::string name = "worker";
};

// One worker's entry in Stats() (an empty one when absent). The reference points into `s`.
inline const v1::WorkerStats& StatsOf(const v1::StatsResponse& s, WorkerId w) {
  for (const auto& ws : s.workers()) {
    if (ws.worker_id() == w) return ws;
  }
  return v1::WorkerStats::default_instance();
}

inline v1::RegisterWorkerRequest Registration(const WorkerSpec& spec) {
  v1::RegisterWorkerRequest reg;
  reg.set_role(spec.role);
  reg.set_model_id("test-model");
  reg.set_num_kv_blocks(spec.num_kv_blocks);
  reg.set_block_size(spec.block_size);
  reg.set_max_batch_tokens(spec.max_batch_tokens);
  reg.set_max_running(spec.max_running);
  reg.set_kv_address(spec.name + ":7000");
  reg.set_num_layers(2);
  reg.set_vocab_size(32000);
  reg.set_max_model_len(spec.max_model_len);
  reg.set_name(spec.name);
  reg.set_num_state_slots(spec.num_state_slots);
  return reg;
}

// AFD: an attention worker of `group` (a decode worker otherwise: KV pool, kv_address).
inline v1::RegisterWorkerRequest AttentionRegistration(WorkerSpec spec, const std::string& group) {
  spec.role = v1::WORKER_ROLE_ATTENTION;
  v1::RegisterWorkerRequest reg = Registration(spec);
  reg.set_afd_group(group);
  return reg;
}

// AFD: an FFN worker of `group` owning `experts` of a model with `num_experts` routed experts. It
// has no KV pool: the KV fields are 0.
struct FfnSpec {
  std::string name = "ffn";
  std::string group = "g0";
  std::vector<int32_t> experts;
  int num_experts = 0;
  bool dense = true;
  bool shared_expert = false;
  bool model_has_shared_expert = false;
};

inline v1::FfnShard Shard(const FfnSpec& spec) {
  v1::FfnShard shard;
  shard.set_address(spec.name + ":7100");
  shard.set_dense(spec.dense);
  shard.mutable_experts()->Add(spec.experts.begin(), spec.experts.end());
  shard.set_shared_expert(spec.shared_expert);
  shard.set_num_experts(spec.num_experts);
  shard.set_model_has_shared_expert(spec.model_has_shared_expert);
  return shard;
}

inline v1::RegisterWorkerRequest FfnRegistration(const FfnSpec& spec) {
  WorkerSpec base;
  base.name = spec.name;
  v1::RegisterWorkerRequest reg = Registration(base);
  reg.set_role(v1::WORKER_ROLE_FFN);
  reg.set_num_kv_blocks(0);
  reg.set_block_size(0);
  reg.set_max_batch_tokens(0);
  reg.set_max_running(0);
  reg.clear_kv_address();
  reg.set_afd_group(spec.group);
  *reg.mutable_ffn() = Shard(spec);
  return reg;
}

inline v1::WorkerMessage DrainMsg() {
  v1::WorkerMessage m;
  m.mutable_drain();
  return m;
}

inline v1::SubmitRequest MakeSubmit(uint64_t client_id, std::vector<int32_t> tokens, int max_tokens,
                                    int priority = 0) {
  v1::SubmitRequest s;
  s.set_client_id(client_id);
  s.mutable_token_ids()->Add(tokens.begin(), tokens.end());
  s.set_max_tokens(max_tokens);
  s.set_priority(priority);
  s.mutable_sampling()->set_temperature(1.0f);
  return s;
}

// Tokens first..first+n-1.
inline std::vector<int32_t> Iota(int n, int32_t first = 100) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = first + i;
  return v;
}

struct Token {
  uint64_t request_id = 0;
  uint32_t attempt = 0;
  int32_t token_id = 1;
  bool finished = false;
  bool finished_by_length = false;
};

inline v1::WorkerMessage StepMsg(const std::vector<Token>& tokens) {
  v1::WorkerMessage m;
  v1::StepResults* step = m.mutable_step();
  for (const Token& t : tokens) {
    v1::TokenResult* r = step->add_tokens();
    r->set_request_id(t.request_id);
    r->set_attempt(t.attempt);
    r->set_token_id(t.token_id);
    r->set_logprob(-0.5f);
    r->set_finished(t.finished);
    r->set_finished_by_length(t.finished_by_length);
  }
  return m;
}

inline v1::WorkerMessage TokenMsg(uint64_t id, uint32_t attempt, int32_t token,
                                  bool finished = false, bool by_length = false) {
  return StepMsg({Token{id, attempt, token, finished, by_length}});
}

inline v1::WorkerMessage FailureMsg(uint64_t id, uint32_t attempt, const std::string& why) {
  v1::WorkerMessage m;
  v1::RequestFailure* f = m.mutable_step()->add_failures();
  f->set_request_id(id);
  f->set_attempt(attempt);
  f->set_message(why);
  return m;
}

inline v1::WorkerMessage KvReadyMsg(uint64_t id, uint32_t attempt) {
  v1::WorkerMessage m;
  m.mutable_kv_ready()->set_request_id(id);
  m.mutable_kv_ready()->set_attempt(attempt);
  return m;
}

inline v1::WorkerMessage KvSentMsg(uint64_t id, uint32_t attempt) {
  v1::WorkerMessage m;
  m.mutable_kv_sent()->set_request_id(id);
  m.mutable_kv_sent()->set_attempt(attempt);
  return m;
}

inline v1::WorkerMessage KvFailedMsg(uint64_t id, uint32_t attempt, const std::string& why) {
  v1::WorkerMessage m;
  m.mutable_kv_failed()->set_request_id(id);
  m.mutable_kv_failed()->set_attempt(attempt);
  m.mutable_kv_failed()->set_message(why);
  return m;
}

// An Outbox sorted by kind and destination.
struct Sent {
  explicit Sent(Outbox outbox) : box(std::move(outbox)) {}

  std::vector<v1::AddRequest> adds(WorkerId w) const {
    return Collect<v1::AddRequest>(w, &v1::SchedulerMessage::has_add, &v1::SchedulerMessage::add);
  }
  std::vector<v1::ExpectKv> expects(WorkerId w) const {
    return Collect<v1::ExpectKv>(w, &v1::SchedulerMessage::has_expect_kv,
                                 &v1::SchedulerMessage::expect_kv);
  }
  std::vector<v1::AppendBlocks> appends(WorkerId w) const {
    return Collect<v1::AppendBlocks>(w, &v1::SchedulerMessage::has_append,
                                     &v1::SchedulerMessage::append);
  }
  std::vector<v1::RemoveRequest> removes(WorkerId w) const {
    return Collect<v1::RemoveRequest>(w, &v1::SchedulerMessage::has_remove,
                                      &v1::SchedulerMessage::remove);
  }
  std::vector<v1::AfdPeers> afd_peers(WorkerId w) const {
    return Collect<v1::AfdPeers>(w, &v1::SchedulerMessage::has_afd_peers,
                                 &v1::SchedulerMessage::afd_peers);
  }
  std::vector<v1::RequestEvent> events(FrontendId f) const {
    std::vector<v1::RequestEvent> out;
    for (const auto& [to, e] : box.to_frontends) {
      if (to == f) out.push_back(e);
    }
    return out;
  }
  size_t num_worker_messages() const { return box.to_workers.size(); }
  bool empty() const { return box.empty(); }

  Outbox box;

 private:
  template <typename T>
  std::vector<T> Collect(WorkerId w, bool (v1::SchedulerMessage::*has)() const,
                         const T& (v1::SchedulerMessage::*get)() const) const {
    std::vector<T> out;
    for (const auto& [to, m] : box.to_workers) {
      if (to == w && (m.*has)()) out.push_back((m.*get)());
    }
    return out;
  }
};

// "" when every worker's blocks are all free (nothing used), else what is not.
inline std::string BlocksNotAllFree(const v1::StatsResponse& stats) {
  std::string out;
  for (const v1::WorkerStats& w : stats.workers()) {
    if (w.used_blocks() != 0 || w.free_blocks() != w.num_kv_blocks() || w.num_running() != 0) {
      out += w.name() + ": used " + std::to_string(w.used_blocks()) + ", free " +
             std::to_string(w.free_blocks()) + "/" + std::to_string(w.num_kv_blocks()) +
             ", running " + std::to_string(w.num_running()) + "; ";
    }
  }
  return out;
}

}  // namespace cleave::scheduler::testing
