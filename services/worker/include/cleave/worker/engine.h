// A worker's engine loop: the running batch of one worker, stepped one iteration at a time.
//
// The scheduler decides membership (AddRequest / RemoveRequest / AppendBlocks deltas); the engine
// applies the deltas that arrived at each iteration boundary, composes the iteration under its
// token budget (every decoding request's next token first, then prefill chunks in arrival order),
// runs the forward pass, samples, and reports one StepResults per iteration. It never waits for
// the scheduler between iterations: a request whose block table cannot hold its next token
// simply sits out until its AppendBlocks arrives.
//
// Roles: PREFILL computes prompts and ships each layer's KV to the request's decode worker as
// soon as that layer is done (per chunk; a Mamba layer's state after the prompt's last chunk), samples the first token, then forgets the request once
// the transfer is flushed; DECODE runs requests whose KV was transferred in; COLOCATED runs both
// phases (mixed batches: decode tokens plus prefill chunks).
//
// Observability: with EngineOptions::metrics set, each iteration records the worker_metrics.h
// step, chunk, gauge and expert series (and, one step in 64, per-layer times); every log line
// about a request names it by AddRequest.trace_id, the client-visible request id.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "cleave/model/kv_cache.h"
#include "cleave/model/decoder.h"
#include "cleave/transport/kv_transport.h"
#include "cleave/v1/control.pb.h"

namespace cleave::worker {

class AfdForward;
class WorkerMetrics;

struct EngineOptions {
  v1::WorkerRole role = v1::WORKER_ROLE_COLOCATED;
  int max_batch_tokens = 512;  // tokens per iteration (decode tokens + prefill chunk tokens)
  int max_running = 256;
  // Where the engine records its step, layer and expert series; not owned, must outlive the
  // engine. Null = no metrics (no clock reads or atomics beyond the step's own timing).
  WorkerMetrics* metrics = nullptr;
  // ATTENTION role: every layer's FFN runs on the AFD group's FFN workers through this (afd.h),
  // the batch cut into its micro-batches. Not owned. Null = the FFN runs here.
  AfdForward* afd = nullptr;
};

// Adapter giving the KV transport direct access to the cache memory.
class KvCacheStore : public transport::KvBlockStore {
 public:
  KvCacheStore(model::KvCache& cache, const model::ModelConfig& config);
  const transport::KvGeometry& geometry() const override { return geometry_; }
  std::byte* BlockData(int layer, bool is_value, int block) override;
  std::byte* StateData(int layer, bool is_ssm, int slot) override;
  // The GPU transports write straight into a device cache.
  int cuda_device() const override { return cache_.device().is_cpu() ? -1 : cache_.device().index; }

 private:
  model::KvCache& cache_;
  transport::KvGeometry geometry_;
};

class Engine {
 public:
  using Emit = std::function<void(v1::WorkerMessage)>;

  // `sender` is required for the PREFILL role. `emit` is called from the engine thread (step
  // results, KvSent) and must be thread-safe against the transport callbacks that also report.
  Engine(const model::DecoderModel& model, model::KvCache& cache, EngineOptions options,
         transport::KvSender* sender, Emit emit);
  ~Engine();

  // Thread-safe: queue a delta for the next iteration boundary.
  void Post(v1::SchedulerMessage message);
  // Thread-safe: returns once every delta posted before the call has been applied (so a removed
  // request's blocks and state slot are no longer written by any step), or the engine stopped.
  // The decode worker calls it before accepting a transfer into blocks or a slot the scheduler
  // may have just taken from a removed request.
  void WaitForDeltas();
  // Runs iterations until Stop(); sleeps while there is nothing to do, but wakes at least every
  // kIdleWake so that last_iteration() keeps advancing while the loop is healthy.
  void Run();
  void Stop();
  // Drops every request (the scheduler connection was lost; its state is gone with it).
  void Reset();

  // One iteration (deltas applied first). Returns false when there was nothing to run.
  // Exposed for tests that drive the engine synchronously.
  bool Step();

  int num_requests() const;

  // Thread-safe. When Run() last started an iteration (or the engine was built): a watchdog
  // reads it, and a loop stuck in one step (or dead) shows as a growing age.
  std::chrono::steady_clock::time_point last_iteration() const;
  // Thread-safe. Nothing left to do: no request held, no delta waiting to be applied, and (the
  // PREFILL role) every finished request's KV transfer flushed. A draining worker exits then.
  bool Idle() const;

  static constexpr std::chrono::milliseconds kIdleWake{50};

 private:
  struct Seq;
  using Key = std::pair<uint64_t, uint32_t>;

  void ApplyDeltas();
  void Refuse(const Seq& seq, const std::string& why);
  void FinishTransfer(const Seq& seq);
  void PublishCounts();  // num_requests_ and the engine's gauges
  void Apply(const v1::SchedulerMessage& message);
  // The mixer and FFN of every layer (shipping each layer's KV on the PREFILL role), timing
  // them on sampled steps.
  absl::Status RunLayers(const model::ForwardBatch& batch, const std::vector<Seq*>& members,
                         const std::vector<std::pair<int, int>>& spans, model::HiddenState& h);
  // The ATTENTION role's pass: the members cut into micro-batches, run through options_.afd.
  absl::Status RunAfd(const std::vector<Seq*>& members, const std::vector<std::pair<int, int>>& spans);
  absl::Status ShipLayer(int layer, const std::vector<Seq*>& seqs,
                         const std::vector<std::pair<int, int>>& spans);
  absl::Status ShipState(int layer, const std::vector<Seq*>& seqs,
                         const std::vector<std::pair<int, int>>& spans);

  const model::DecoderModel& model_;
  model::KvCache& cache_;
  EngineOptions options_;
  transport::KvSender* sender_;
  Emit emit_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<v1::SchedulerMessage> inbox_;
  uint64_t posted_ = 0;   // deltas ever posted
  uint64_t applied_ = 0;  // of those, applied (or dropped by Reset)
  std::condition_variable applied_cv_;
  bool stop_ = false;
  bool reset_ = false;

  // Engine-thread state.
  absl::flat_hash_map<uint64_t, std::unique_ptr<Seq>> seqs_;  // by request id
  std::vector<uint64_t> order_;                                 // arrival order
  std::atomic<int> num_requests_{0};
  std::atomic<int> unflushed_transfers_{0};  // PREFILL: Finish called, `done` not yet run
  std::atomic<int64_t> last_iteration_ns_{0};  // steady_clock, since its epoch
  uint64_t steps_ = 0;                         // iterations that ran a batch (layer sampling)
  model::Workspace ws_;
  std::vector<float> logits_;
  std::vector<model::ForwardBatch> micro_batches_;  // ATTENTION role
};

}  // namespace cleave::worker
