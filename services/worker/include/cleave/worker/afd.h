// The attention side of attention-FFN disaggregation (AFD).
//
// An ATTENTION worker runs the decode engine (KV blocks, Mamba state, sequence mixers), but each
// layer's FFN runs on the FFN workers of its AFD group: per layer and micro-batch the attention
// side normalises the hidden states (FfnInput), ships them, and folds the answer back into the
// residual stream, which never leaves this worker.
//
//   dense layer  rows split in contiguous chunks across the group's FFN workers (each holds the
//                dense FFNs); answers land in h.delta in place.
//   MoE layer    the attention side routes (router + top-k); each token goes only to the owners
//                of its top-k experts (dispatch), with one row per token per owner and one
//                assignment per (token, expert); the owners answer each assignment's unweighted
//                expert output and the weighted sum is taken here in slot order (combine), with
//                the shared expert's sigmoid gate. The result is bit-identical to the colocated
//                MoE layer (MoeCombine shares MoeExperts' arithmetic).
//
// Ping-pong: a step's batch is cut into m micro-batches (contiguous runs of requests, balanced
// by tokens). Layer l of micro-batch i is shipped as soon as its mixer is done, and its answer is
// only awaited right before micro-batch i's mixer of layer l+1, after the other micro-batches'
// mixers of layer l. With m = 2 the FFN computes micro-batch 0 while the attention side runs
// micro-batch 1's mixer, and the other way round.
//
// Failures: a call that fails (FFN worker gone, error answer, timeout) fails the step, every
// outstanding call is awaited first so that no late answer writes into reused buffers, and the
// broken connection is re-dialled at most once a second on later steps.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cleave/model/decoder.h"
#include "cleave/model/forward_batch.h"
#include "cleave/model/kv_cache.h"
#include "cleave/transport/activation.h"
#include "cleave/v1/control.pb.h"

namespace cleave::worker {

// Exchange statistics, summed over every call since the last TakeStats (engine thread).
struct AfdStats {
  uint64_t calls = 0;
  uint64_t steps = 0;
  int64_t round_trip_us = 0;  // Send -> answer in, summed over calls
  int64_t compute_us = 0;     // the FFN side's handler time, summed
  uint64_t exchanges = 0;     // (micro-batch, layer) FFN exchanges: one or more calls each
  int64_t exchange_us = 0;    // first call sent -> last answer in, summed over exchanges
  int64_t wait_us = 0;        // the attention side blocked on answers, summed over exchanges;
                              // 1 - wait / exchange = the share hidden behind other micro-batches
  int64_t bytes_sent = 0;     // activation payload bytes, attention -> FFN
  int64_t bytes_received = 0; // FFN -> attention
  // Per-layer round trip and wait, [num_layers] (for the benchmark's per-layer latency).
  std::vector<int64_t> layer_round_trip_us, layer_wait_us, layer_calls;
};

// The connections to the FFN workers of this attention worker's group.
class FfnGroup {
 public:
  explicit FfnGroup(transport::ActivationOptions options);
  ~FfnGroup();

  // The scheduler's AfdPeers (any thread); taken by the next Prepare.
  void SetPeers(const v1::AfdPeers& peers);
  // Forget every peer (the scheduler connection was lost: the next one sends the group again).
  void Clear();
  // What the scheduler last said about the group's completeness (any thread).
  bool complete() const;
  std::string describe() const;  // "ffn-0@host:port (experts 0,2,4,6), ..." for logs

  // Engine thread, before a step: applies the latest peers, dials new peers and re-dials broken
  // ones (at most once a second each), and builds the routing tables. An error says what the
  // step cannot run without (no dense-capable peer; an expert whose owner is unreachable).
  absl::Status Prepare(const model::ModelConfig& config);

  // After a successful Prepare (engine thread).
  struct Peer {
    uint64_t worker_id = 0;
    std::string name;
    v1::FfnShard shard;
    std::unique_ptr<transport::FfnConnection> conn;
    absl::Status last_error;
    std::chrono::steady_clock::time_point last_dial{};
  };
  const std::vector<Peer*>& dense_peers() const { return dense_; }
  // The owner of routed expert e, or of the shared expert at e == num_experts.
  Peer* owner(int expert) const { return owners_[expert]; }

 private:
  transport::ActivationOptions options_;
  mutable std::mutex mu_;
  bool pending_valid_ = false;
  v1::AfdPeers pending_;  // guarded by mu_
  bool complete_ = false; // guarded by mu_
  std::string describe_;  // guarded by mu_
  // Engine thread.
  std::vector<std::unique_ptr<Peer>> peers_;
  std::vector<Peer*> dense_;
  std::vector<Peer*> owners_;
};

struct AfdOptions {
  int micro_batches = 2;     // m: 1 (no overlap), 2 (ping-pong), 3
  int call_timeout_ms = 5000;  // an FFN answer later than this fails the step
};

class AfdForward {
 public:
  AfdForward(const model::DecoderModel& model, model::KvCache& cache, FfnGroup& group, AfdOptions options);
  ~AfdForward();

  int micro_batches() const { return options_.micro_batches; }

  // One forward pass over micro-batches that the caller cut (in request order, each finalized):
  // logits rows of every micro-batch, concatenated in order, go to `logits`. Router statistics
  // accumulate in expert_tokens() as Workspace::expert_tokens does.
  [[nodiscard]] absl::Status Run(std::span<const model::ForwardBatch> micro_batches,
                                 std::vector<float>& logits);

  std::vector<std::vector<int64_t>>& expert_tokens() { return expert_tokens_; }
  // Returns the statistics gathered since the last call and resets them.
  AfdStats TakeStats();

 private:
  struct MicroBatch;
  absl::Status Dispatch(MicroBatch& mb, int layer);
  absl::Status Finish(MicroBatch& mb);
  void AbandonAll();  // awaits every outstanding call, ignoring results

  const model::DecoderModel& model_;
  model::KvCache& cache_;
  FfnGroup& group_;
  AfdOptions options_;
  std::vector<std::unique_ptr<MicroBatch>> mbs_;
  std::vector<std::vector<int64_t>> expert_tokens_;
  AfdStats stats_;
};

// Cuts `num_requests` requests of `tokens[i]` tokens each into at most m contiguous runs with
// balanced token counts (no run empty); returns the first request of each run and a final end.
std::vector<int> SplitMicroBatches(std::span<const int> tokens, int m);

}  // namespace cleave::worker
