#include "cleave/worker/engine.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "cleave/common/logging.h"
#include "cleave/common/status.h"
#include "cleave/kernels/device_sampling.h"
#include "cleave/kernels/sampling.h"
#include "cleave/worker/afd.h"
#include "cleave/worker/worker_metrics.h"

namespace cleave::worker {
namespace {

kernels::SamplingParams ToParams(const v1::SamplingState& s) {
  kernels::SamplingParams p;
  p.temperature = s.temperature();
  p.top_p = s.top_p() > 0 ? s.top_p() : 1.0f;
  p.top_k = s.top_k();
  p.min_p = s.min_p();
  p.repetition_penalty = s.repetition_penalty() > 0 ? s.repetition_penalty() : 1.0f;
  p.presence_penalty = s.presence_penalty();
  p.frequency_penalty = s.frequency_penalty();
  p.has_seed = true;
  p.seed = s.seed();
  p.logprobs = s.logprobs();
  p.top_logprobs = s.top_logprobs();
  return p;
}

}  // namespace

// One request on this worker. tokens = everything known (prompt + generated); the KV of
// tokens[0, num_computed) is in the blocks. A decoding request has exactly one token pending.
struct Engine::Seq {
  uint64_t id = 0;
  uint32_t attempt = 0;
  // The client-visible request id, for log lines (the scheduler's ids mean nothing to an operator
  // holding a client's x-request-id). Older schedulers send none: then "#<request_id>".
  std::string trace_id;
  std::string tag() const { return trace_id.empty() ? absl::StrCat("#", id) : trace_id; }
  std::vector<int32_t> tokens;
  int num_prompt = 0;
  int num_computed = 0;
  int prompt_end = 0;  // tokens present at Add: prefill runs to here before sampling
  std::vector<int32_t> blocks;
  std::unique_ptr<kernels::SamplerState> sampler;
  int max_new = 0;
  int generated = 0;  // on this worker, this attempt
  std::vector<int32_t> stop_ids;
  // PREFILL role: where the KV goes, and the first block not yet shipped in full.
  std::string target;
  std::vector<int32_t> target_blocks;
  int first_block = 0;
  int next_unsent_block = 0;
  bool finishing = false;  // prefill done; transfer being flushed
  // Mamba models: the request's state slot here, and (PREFILL) the decode worker's.
  int state_slot = -1;
  int target_slot = -1;
};

KvCacheStore::KvCacheStore(model::KvCache& cache, const model::ModelConfig& config) : cache_(cache) {
  geometry_.num_layers = cache.num_layers();
  geometry_.block_size = cache.block_size();
  geometry_.num_kv_heads = config.num_key_value_heads;
  geometry_.head_dim = config.head_dim;
  geometry_.num_blocks = cache.num_blocks();
  if (config.has_ssm_state()) {
    for (int l = 0; l < cache.num_layers(); ++l) geometry_.state_layers.push_back(cache.is_mamba(l) ? 1 : 0);
    geometry_.conv_state_bytes = model::ConvStateBytes(config);
    geometry_.ssm_state_bytes = model::SsmStateBytes(config);
    geometry_.num_state_slots = cache.num_state_slots();
  }
}

std::byte* KvCacheStore::BlockData(int layer, bool is_value, int block) {
  const kernels::Tensor t = is_value ? cache_.v(layer) : cache_.k(layer);
  return static_cast<std::byte*>(t.data()) + static_cast<size_t>(block) * geometry_.block_bytes();
}

std::byte* KvCacheStore::StateData(int layer, bool is_ssm, int slot) {
  if (!cache_.is_mamba(layer)) return nullptr;
  const kernels::Tensor t = is_ssm ? cache_.ssm_state(layer) : cache_.conv_state(layer);
  const size_t bytes = is_ssm ? geometry_.ssm_state_bytes : geometry_.conv_state_bytes;
  return static_cast<std::byte*>(t.data()) + static_cast<size_t>(slot) * bytes;
}

Engine::Engine(const model::DecoderModel& model, model::KvCache& cache, EngineOptions options,
               transport::KvSender* sender, Emit emit)
    : model_(model), cache_(cache), options_(options), sender_(sender), emit_(std::move(emit)) {
  last_iteration_ns_ = std::chrono::steady_clock::now().time_since_epoch().count();
  PublishCounts();
}

Engine::~Engine() { Stop(); }

void Engine::Post(v1::SchedulerMessage message) {
  {
    std::lock_guard lock(mu_);
    inbox_.push_back(std::move(message));
    ++posted_;
  }
  cv_.notify_one();
}

void Engine::WaitForDeltas() {
  std::unique_lock lock(mu_);
  const uint64_t target = posted_;
  applied_cv_.wait(lock, [&] { return applied_ >= target || stop_; });
}

void Engine::Stop() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  applied_cv_.notify_all();
}

void Engine::Reset() {
  {
    std::lock_guard lock(mu_);
    reset_ = true;
    inbox_.clear();
    applied_ = posted_;
  }
  cv_.notify_all();
  applied_cv_.notify_all();
}

int Engine::num_requests() const { return num_requests_.load(); }

std::chrono::steady_clock::time_point Engine::last_iteration() const {
  return std::chrono::steady_clock::time_point(
      std::chrono::steady_clock::duration(last_iteration_ns_.load(std::memory_order_relaxed)));
}

bool Engine::Idle() const {
  std::lock_guard lock(mu_);
  return inbox_.empty() && applied_ >= posted_ && num_requests_.load() == 0 &&
         unflushed_transfers_.load() == 0;
}

void Engine::Run() {
  while (true) {
    last_iteration_ns_.store(std::chrono::steady_clock::now().time_since_epoch().count(),
                             std::memory_order_relaxed);
    {
      std::lock_guard lock(mu_);
      if (stop_) return;
    }
    if (Step()) continue;
    std::unique_lock lock(mu_);
    // Nothing runnable: wait for a delta. The timeout covers transfers finishing and keeps the
    // heartbeat above fresh for the readiness watchdog.
    cv_.wait_for(lock, kIdleWake, [&] { return stop_ || reset_ || !inbox_.empty(); });
  }
}

void Engine::PublishCounts() {
  const int n = static_cast<int>(seqs_.size());
  num_requests_ = n;
  if (options_.metrics == nullptr) return;
  options_.metrics->SetRunning(n);
  // Every request of a model with Mamba layers holds one state slot while it is here.
  options_.metrics->SetStateSlotsUsed(model_.config().has_ssm_state() ? n : 0);
}

void Engine::Refuse(const Seq& seq, const std::string& why) {
  CLEAVE_LOG(Warning) << "request " << seq.tag() << ": refused: " << why;
  v1::WorkerMessage out;
  auto* f = out.mutable_step()->add_failures();
  f->set_request_id(seq.id);
  f->set_attempt(seq.attempt);
  f->set_message(absl::StrCat("worker refused request: ", why));
  emit_(std::move(out));
}

// The prompt's KV is all queued; the transfer completes behind the next iterations, and the
// scheduler hears KvSent (or the failure) when it does.
void Engine::FinishTransfer(const Seq& s) {
  ++unflushed_transfers_;
  sender_->Finish(s.target, s.id, s.attempt,
                  [this, id = s.id, attempt = s.attempt, tag = s.tag(), target = s.target](
                      absl::Status st) {
                    v1::WorkerMessage msg;
                    if (st.ok()) {
                      msg.mutable_kv_sent()->set_request_id(id);
                      msg.mutable_kv_sent()->set_attempt(attempt);
                    } else {
                      CLEAVE_LOG(Warning) << "request " << tag << ": KV transfer to " << target
                                          << " failed: " << st;
                      auto* f = msg.mutable_step()->add_failures();
                      f->set_request_id(id);
                      f->set_attempt(attempt);
                      f->set_message(absl::StrCat("KV transfer failed: ", st.message()));
                    }
                    emit_(std::move(msg));
                    --unflushed_transfers_;
                  });
}

void Engine::ApplyDeltas() {
  std::vector<v1::SchedulerMessage> inbox;
  bool reset = false;
  uint64_t taken = 0;
  {
    std::lock_guard lock(mu_);
    inbox.swap(inbox_);
    reset = reset_;
    reset_ = false;
    taken = posted_;
  }
  if (reset) {
    // The sender keeps a record of every transfer until its Finish.
    if (options_.role == v1::WORKER_ROLE_PREFILL) {
      for (auto& [id, seq] : seqs_) sender_->Finish(seq->target, seq->id, seq->attempt, [](absl::Status) {});
    }
    seqs_.clear();
    order_.clear();
  }
  for (const auto& m : inbox) Apply(m);
  std::erase_if(order_, [&](uint64_t id) { return !seqs_.contains(id); });
  PublishCounts();
  {
    std::lock_guard lock(mu_);
    applied_ = std::max(applied_, taken);
  }
  applied_cv_.notify_all();
}

void Engine::Apply(const v1::SchedulerMessage& m) {
  const int vocab = model_.config().vocab_size;
  switch (m.kind_case()) {
    case v1::SchedulerMessage::kAdd: {
      const v1::AddRequest& a = m.add();
      auto seq = std::make_unique<Seq>();
      seq->id = a.request_id();
      seq->attempt = a.attempt();
      seq->trace_id = a.trace_id();
      seq->tokens.assign(a.token_ids().begin(), a.token_ids().end());
      seq->num_prompt = std::clamp<int>(a.num_prompt_tokens(), 0, static_cast<int>(seq->tokens.size()));
      seq->num_computed = a.num_computed_tokens();
      seq->prompt_end = static_cast<int>(seq->tokens.size());
      seq->blocks.assign(a.blocks().begin(), a.blocks().end());
      seq->max_new = a.max_new_tokens();
      seq->stop_ids.assign(a.stop_token_ids().begin(), a.stop_token_ids().end());
      // The scheduler is trusted, but a bad plan must fail the request, not the process.
      std::string bad;
      if (seq->tokens.empty() || seq->num_computed < 0 || seq->num_computed >= seq->prompt_end) {
        bad = "inconsistent token counts";
      }
      for (int32_t t : seq->tokens) if (t < 0 || t >= vocab) bad = "token id outside the vocabulary";
      for (int32_t b : seq->blocks) if (b < 0 || b >= cache_.num_blocks()) bad = "block id outside the KV pool";
      const bool has_state = model_.config().has_ssm_state();
      seq->state_slot = a.state_slot();
      if (has_state && (seq->state_slot < 0 || seq->state_slot >= cache_.num_state_slots())) {
        bad = "state slot outside the state pool";
      }
      if (options_.role == v1::WORKER_ROLE_PREFILL) {
        if (!sender_ || a.kv_target().address().empty()) bad = "prefill request without a KV target";
        seq->target = a.kv_target().address();
        seq->target_blocks.assign(a.kv_target().blocks().begin(), a.kv_target().blocks().end());
        seq->first_block = a.kv_target().first_block();
        seq->next_unsent_block = seq->first_block;
        seq->target_slot = a.kv_target().state_slot();
        if (has_state && seq->target_slot < 0) bad = "KV target has no state slot";
        const int needed = (seq->prompt_end + cache_.block_size() - 1) / cache_.block_size();
        if (static_cast<int>(seq->target_blocks.size()) < needed) bad = "KV target has too few blocks";
      }
      const kernels::SamplingParams params = ToParams(a.sampling());
      if (absl::Status s = kernels::ValidateSamplingParams(params); !s.ok()) bad = std::string(s.message());
      if (!bad.empty()) return Refuse(*seq, bad);
      seq->sampler = std::make_unique<kernels::SamplerState>(params, vocab, params.seed);
      seq->sampler->ObservePrompt(std::span(seq->tokens).first(seq->num_prompt));
      for (size_t i = seq->num_prompt; i < seq->tokens.size(); ++i) seq->sampler->ObserveOutput(seq->tokens[i]);
      // Tokens sampled elsewhere (the prefill worker, an earlier attempt) used the same seeded
      // stream; skip their draws so a seeded request samples the same tokens in every mode.
      if (params.temperature > 0) {
        for (uint32_t i = 0; i < a.rng_skip(); ++i) seq->sampler->NextUniform();
      }
      if (!seqs_.contains(seq->id)) order_.push_back(seq->id);
      seqs_[seq->id] = std::move(seq);
      break;
    }
    case v1::SchedulerMessage::kAppend: {
      auto it = seqs_.find(m.append().request_id());
      if (it == seqs_.end() || it->second->attempt != m.append().attempt()) return;
      for (int32_t b : m.append().blocks()) {
        if (b >= 0 && b < cache_.num_blocks()) it->second->blocks.push_back(b);
      }
      break;
    }
    case v1::SchedulerMessage::kRemove: {
      auto it = seqs_.find(m.remove().request_id());
      if (it == seqs_.end() || it->second->attempt != m.remove().attempt()) return;
      // The sender keeps a record of every transfer until its Finish.
      if (options_.role == v1::WORKER_ROLE_PREFILL) {
        sender_->Finish(it->second->target, it->second->id, it->second->attempt, [](absl::Status) {});
      }
      seqs_.erase(it);
      break;
    }
    default:
      break;  // ExpectKv goes to the transport receiver, not the engine
  }
}

absl::Status Engine::ShipState(int layer, const std::vector<Seq*>& seqs,
                               const std::vector<std::pair<int, int>>& spans) {
  const size_t conv_bytes = model::ConvStateBytes(model_.config());
  const size_t ssm_bytes = model::SsmStateBytes(model_.config());
  auto* conv_base = static_cast<const std::byte*>(cache_.conv_state(layer).data());
  auto* ssm_base = static_cast<const std::byte*>(cache_.ssm_state(layer).data());
  for (size_t i = 0; i < seqs.size(); ++i) {
    Seq& s = *seqs[i];
    // The state summarises the whole prompt only after its last chunk; earlier chunks' state
    // stays here and is carried into the next chunk.
    if (spans[i].second != s.prompt_end) continue;
    transport::KvStateSend send{s.id, s.attempt, layer, s.target_slot,
                                conv_base + static_cast<size_t>(s.state_slot) * conv_bytes,
                                ssm_base + static_cast<size_t>(s.state_slot) * ssm_bytes};
    CLEAVE_RETURN_IF_ERROR(sender_->SendState(s.target, send));
  }
  return absl::OkStatus();
}

absl::Status Engine::ShipLayer(int layer, const std::vector<Seq*>& seqs,
                               const std::vector<std::pair<int, int>>& spans) {
  if (!cache_.device().is_cpu()) {
    // The layer's KV was written by kernels still queued on the GPU; the transport reads it on
    // its own stream or from another process, which nothing else orders after them.
    CLEAVE_ASSIGN_OR_RETURN(kernels::Backend* backend, kernels::GetBackend(cache_.device()));
    CLEAVE_RETURN_IF_ERROR(backend->Synchronize());
  }
  if (cache_.is_mamba(layer)) return ShipState(layer, seqs, spans);
  transport::KvGeometry geometry;
  geometry.block_size = cache_.block_size();
  geometry.num_kv_heads = model_.config().num_key_value_heads;
  geometry.head_dim = model_.config().head_dim;
  const size_t block_bytes = geometry.block_bytes();
  auto* k_base = static_cast<const std::byte*>(cache_.k(layer).data());
  auto* v_base = static_cast<const std::byte*>(cache_.v(layer).data());
  std::vector<int32_t> dst;
  std::vector<const std::byte*> k_src, v_src;
  for (size_t i = 0; i < seqs.size(); ++i) {
    Seq& s = *seqs[i];
    const int bs = cache_.block_size();
    // Every block this chunk touched, plus cached-prefix blocks the decode side lacks.
    const int lo = std::max(s.first_block, std::min(s.next_unsent_block, spans[i].first / bs));
    const int hi = (spans[i].second - 1) / bs;
    dst.clear();
    k_src.clear();
    v_src.clear();
    for (int b = lo; b <= hi; ++b) {
      dst.push_back(s.target_blocks[b]);
      k_src.push_back(k_base + static_cast<size_t>(s.blocks[b]) * block_bytes);
      v_src.push_back(v_base + static_cast<size_t>(s.blocks[b]) * block_bytes);
    }
    if (dst.empty()) continue;
    transport::KvLayerSend send{s.id, s.attempt, layer, dst, k_src, v_src};
    CLEAVE_RETURN_IF_ERROR(sender_->SendLayer(s.target, send));
  }
  return absl::OkStatus();
}

absl::Status Engine::RunLayers(const model::ForwardBatch& batch, const std::vector<Seq*>& members,
                               const std::vector<std::pair<int, int>>& spans, model::HiddenState& h) {
  using Clock = std::chrono::steady_clock;
  const bool ship = options_.role == v1::WORKER_ROLE_PREFILL;
  // Layer timing is sampled (one step in kLayerSampleEvery), and the unsampled steps read no
  // clock at all: two clock reads per layer half would cost a few percent of a small decode step.
  WorkerMetrics* metrics = options_.metrics;
  const bool timed = metrics != nullptr && steps_ % WorkerMetrics::kLayerSampleEvery == 0;
  auto observe = [&](int layer, WorkerMetrics::LayerPart part, Clock::time_point since) {
    if (auto* hist = metrics->LayerSeconds(layer, part)) {
      hist->Observe(std::chrono::duration<double>(Clock::now() - since).count());
    }
  };
  for (int l = 0; l < model_.config().num_hidden_layers; ++l) {
    Clock::time_point t0 = timed ? Clock::now() : Clock::time_point{};
    CLEAVE_RETURN_IF_ERROR(model_.RunMixer(l, batch, cache_, ws_, h));
    if (timed) observe(l, WorkerMetrics::LayerPart::kMixer, t0);
    // This layer's KV (or Mamba state) is final for the chunk: ship it while the rest of the
    // pass runs.
    if (ship) CLEAVE_RETURN_IF_ERROR(ShipLayer(l, members, spans));
    if (timed) t0 = Clock::now();
    CLEAVE_RETURN_IF_ERROR(model_.RunFfn(l, ws_, h));
    if (timed) observe(l, WorkerMetrics::LayerPart::kFfn, t0);
  }
  return absl::OkStatus();
}

absl::Status Engine::RunAfd(const std::vector<Seq*>& members, const std::vector<std::pair<int, int>>& spans) {
  std::vector<int> tokens;
  for (const auto& [begin, end] : spans) tokens.push_back(end - begin);
  const std::vector<int> starts = SplitMicroBatches(tokens, options_.afd->micro_batches());
  const int m = static_cast<int>(starts.size()) - 1;
  micro_batches_.resize(m);
  const int bs = cache_.block_size();
  for (int i = 0; i < m; ++i) {
    model::ForwardBatch& mb = micro_batches_[i];
    mb = model::ForwardBatch();
    for (int j = starts[i]; j < starts[i + 1]; ++j) {
      const Seq& s = *members[j];
      const int n = spans[j].second - spans[j].first;
      mb.AddSequence(std::span(s.tokens).subspan(spans[j].first, n), spans[j].first, s.blocks, bs,
                     spans[j].second == static_cast<int>(s.tokens.size()), s.state_slot);
    }
    CLEAVE_RETURN_IF_ERROR(mb.Finalize());
  }
  return options_.afd->Run(std::span<const model::ForwardBatch>(micro_batches_.data(), m), logits_);
}

bool Engine::Step() {
  ApplyDeltas();
  if (seqs_.empty()) return false;
  const auto start = std::chrono::steady_clock::now();
  const int bs = cache_.block_size();
  WorkerMetrics* metrics = options_.metrics;

  // Compose: every request with one pending token (decode) first, then prefill chunks in
  // arrival order under the token budget. A request whose blocks can't hold the next token waits.
  model::ForwardBatch batch;
  std::vector<Seq*> members;
  std::vector<std::pair<int, int>> spans;  // [first position, end position) computed this step
  int budget = options_.max_batch_tokens;
  int stalled = 0;
  for (int pass = 0; pass < 2; ++pass) {
    for (uint64_t id : order_) {
      Seq& s = *seqs_.at(id);
      const int pending = static_cast<int>(s.tokens.size()) - s.num_computed;
      if (s.finishing || pending <= 0 || (pass == 0) != (pending == 1)) continue;
      const int capacity = static_cast<int>(s.blocks.size()) * bs - s.num_computed;
      const int n = std::min({pending, budget, capacity});
      if (n <= 0) {
        ++stalled;
        continue;
      }
      // A prefill chunk: several pending tokens, or the prompt's last one (a prefix hit that
      // left one token to compute).
      if (metrics != nullptr && (pending > 1 || s.num_computed < s.num_prompt)) {
        metrics->RecordPrefillChunk(n);
      }
      const bool want_logits = n == pending;
      batch.AddSequence(std::span(s.tokens).subspan(s.num_computed, n), s.num_computed, s.blocks, bs,
                        want_logits, s.state_slot);
      members.push_back(&s);
      spans.emplace_back(s.num_computed, s.num_computed + n);
      budget -= n;
    }
  }
  if (members.empty()) return false;

  v1::WorkerMessage out;
  v1::StepResults* step = out.mutable_step();
  auto fail = [&](Seq& s, std::string_view what, const absl::Status& status) {
    CLEAVE_LOG(Error) << "request " << s.tag() << ": " << what << " failed: " << status;
    if (options_.role == v1::WORKER_ROLE_PREFILL && !s.finishing) {
      sender_->Finish(s.target, s.id, s.attempt, [](absl::Status) {});
    }
    auto* f = step->add_failures();
    f->set_request_id(s.id);
    f->set_attempt(s.attempt);
    f->set_message(std::string(status.message()));
    seqs_.erase(s.id);
  };

  // The step histogram times forward + sample only; composing is bookkeeping.
  const auto forward_start = metrics != nullptr ? std::chrono::steady_clock::now() : start;
  const bool ship = options_.role == v1::WORKER_ROLE_PREFILL;
  // The rows that sample this step (a sequence whose prompt is now fully computed), in the order
  // of their logits rows.
  std::vector<kernels::SamplerState*> samplers;
  for (size_t i = 0; i < members.size(); ++i) {
    if (spans[i].second == static_cast<int>(members[i]->tokens.size())) samplers.push_back(members[i]->sampler.get());
  }
  std::vector<absl::StatusOr<kernels::SampleResult>> samples;
  absl::Status status;
  if (options_.afd != nullptr) {
    status = RunAfd(members, spans);
    if (metrics != nullptr) {
      metrics->AddExpertTokens(options_.afd->expert_tokens());
      metrics->RecordAfd(options_.afd->TakeStats());
    }
  } else {
    status = batch.Finalize();
    absl::StatusOr<model::HiddenState> h = status.ok() ? model_.Embed(batch, ws_) : absl::StatusOr<model::HiddenState>(status);
    status = h.status();
    if (status.ok()) status = RunLayers(batch, members, spans, *h);
    if (status.ok() && !model_.device().is_cpu() && !samplers.empty()) {
      // A model on a GPU samples there: only the chosen tokens (and logprobs) come back, not
      // batch x vocab logits.
      absl::StatusOr<kernels::Tensor> logits = model_.ComputeDeviceLogits(batch, ws_, *h);
      status = logits.status();
      samples.resize(samplers.size(), absl::UnknownError("not sampled"));
      if (status.ok()) status = kernels::SampleRows(*logits, samplers, samples, nullptr);
    } else if (status.ok()) {
      status = model_.ComputeLogits(batch, ws_, *h, logits_);
    }
    if (metrics != nullptr) metrics->AddExpertTokens(ws_.expert_tokens);
  }
  if (status.ok() && samples.empty()) {
    // The host samples each row from the logits copied back (the CPU backend, AFD).
    const int vocab = model_.config().vocab_size;
    for (size_t row = 0; row < samplers.size(); ++row) {
      samples.push_back(kernels::Sample(std::span<float>(logits_.data() + row * vocab, vocab), *samplers[row]));
    }
  }
  if (!status.ok()) {
    for (Seq* s : members) fail(*s, "step", status);
  } else {
    size_t row = 0;
    for (size_t i = 0; i < members.size(); ++i) {
      Seq& s = *members[i];
      s.num_computed = spans[i].second;
      if (s.num_computed == static_cast<int>(s.tokens.size())) {
        absl::StatusOr<kernels::SampleResult>& sample = samples[row++];
        if (!sample.ok()) {
          fail(s, "sampling", sample.status());
          continue;
        }
        s.sampler->ObserveOutput(sample->token);
        s.tokens.push_back(sample->token);
        ++s.generated;
        auto* t = step->add_tokens();
        t->set_request_id(s.id);
        t->set_attempt(s.attempt);
        t->set_token_id(sample->token);
        t->set_logprob(sample->logprob);
        for (const kernels::TokenLogprob& alt : sample->top) {
          t->add_top_token_ids(alt.token);
          t->add_top_logprobs(alt.logprob);
        }
        const bool stop = std::find(s.stop_ids.begin(), s.stop_ids.end(), sample->token) != s.stop_ids.end();
        const bool length = !stop && s.generated >= s.max_new;
        t->set_finished(stop || length);
        t->set_finished_by_length(length);
        if (ship) {
          s.finishing = true;
          FinishTransfer(s);
          seqs_.erase(s.id);
        } else if (stop || length) {
          seqs_.erase(s.id);
        }
      } else if (ship) {
        s.next_unsent_block = s.num_computed / bs;
      }
    }
  }
  const auto end = std::chrono::steady_clock::now();
  ++steps_;
  if (metrics != nullptr) {
    metrics->RecordStep(std::chrono::duration<double>(end - forward_start).count(),
                        static_cast<int>(members.size()), options_.max_batch_tokens - budget);
  }
  std::erase_if(order_, [&](uint64_t id) { return !seqs_.contains(id); });
  PublishCounts();
  step->set_num_running(static_cast<int>(seqs_.size()));
  step->set_num_waiting(stalled);
  step->set_step_micros(std::chrono::duration_cast<std::chrono::microseconds>(end - start).count());
  emit_(std::move(out));
  return true;
}

}  // namespace cleave::worker
