#include "cleave/frontend/generation.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/frontend/frontend_metrics.h"

namespace cleave::frontend {
namespace {

std::vector<int32_t> StopIds(const FrontendContext& ctx, const GenerationParams& params) {
  std::vector<int32_t> ids = params.stop_token_ids;
  if (!params.ignore_eos) {
    for (int32_t id : ctx.eos_token_ids) {
      if (std::find(ids.begin(), ids.end(), id) == ids.end()) ids.push_back(id);
    }
  }
  return ids;
}

}  // namespace

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kNone: break;
  }
  return "";
}

v1::SubmitRequest BuildSubmitRequest(const FrontendContext& ctx, const GenerationParams& params,
                                     const PreparedRequest& prepared, int choice_index) {
  v1::SubmitRequest req;
  req.mutable_token_ids()->Add(prepared.prompt_ids.begin(), prepared.prompt_ids.end());
  req.set_max_tokens(prepared.max_tokens);
  v1::SamplingState* s = req.mutable_sampling();
  s->set_temperature(static_cast<float>(params.temperature));
  s->set_top_p(static_cast<float>(params.top_p));
  s->set_top_k(static_cast<int32_t>(params.top_k));
  s->set_min_p(static_cast<float>(params.min_p));
  s->set_repetition_penalty(static_cast<float>(params.repetition_penalty));
  s->set_presence_penalty(static_cast<float>(params.presence_penalty));
  s->set_frequency_penalty(static_cast<float>(params.frequency_penalty));
  if (params.seed.has_value()) {
    // Choices of one request must differ, yet each be reproducible: choice i uses seed + i.
    s->set_seed(*params.seed + static_cast<uint64_t>(choice_index));
    req.set_has_seed(true);
  }
  s->set_logprobs(params.logprobs);
  s->set_top_logprobs(static_cast<int32_t>(params.top_logprobs));
  for (int32_t id : StopIds(ctx, params)) req.add_stop_token_ids(id);
  req.set_ignore_eos(params.ignore_eos);
  req.set_priority(static_cast<int32_t>(params.priority));
  req.set_trace_id(prepared.trace_id);
  return req;
}

GenerationStream::GenerationStream(Private, const FrontendContext& ctx,
                                   const GenerationParams& params,
                                   const PreparedRequest& prepared, Sink sink)
    : ctx_(ctx),
      want_logprobs_(params.logprobs),
      top_logprobs_(static_cast<int>(params.top_logprobs)),
      prompt_tokens_(static_cast<int>(prepared.prompt_ids.size())),
      sink_(std::move(sink)),
      detok_(*ctx.tokenizer, prepared.prompt_ids, params.skip_special_tokens),
      stop_(params.stop),
      stop_ids_(StopIds(ctx, params)),
      last_id_(prepared.prompt_ids.empty() ? -1 : prepared.prompt_ids.back()),
      start_(std::chrono::steady_clock::now()) {
  if (ctx_.metrics != nullptr) {
    ctx_.metrics->in_flight().Inc();
    ctx_.metrics->max_tokens_param().Observe(prepared.max_tokens);
  }
}

void GenerationStream::RecordTokens(size_t n) {
  if (ctx_.metrics == nullptr || n == 0) return;
  const auto now = std::chrono::steady_clock::now();
  if (!first_token_seen_) {
    first_token_seen_ = true;
    ctx_.metrics->time_to_first_token().Observe(std::chrono::duration<double>(now - start_).count());
  } else {
    // Tokens that arrive in one event share the gap since the previous one.
    const double gap = std::chrono::duration<double>(now - last_token_).count() / static_cast<double>(n);
    for (size_t i = 0; i < n; ++i) ctx_.metrics->inter_token_latency().Observe(gap);
  }
  last_token_ = now;
}

void GenerationStream::RecordEnd(const GenerationUpdate& u) {
  if (ctx_.metrics == nullptr) return;
  FrontendMetrics& m = *ctx_.metrics;
  m.in_flight().Dec();
  if (!u.status.ok()) {
    m.CountEnd(EndReason::kError);
    return;
  }
  m.e2e_latency().Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  m.prompt_tokens().Inc(static_cast<uint64_t>(prompt_tokens_));
  m.generation_tokens().Inc(static_cast<uint64_t>(completion_tokens_));
  m.CountEnd(u.finish == FinishReason::kLength ? EndReason::kLength : EndReason::kStop);
}

std::shared_ptr<GenerationStream> GenerationStream::Start(const FrontendContext& ctx,
                                                          const GenerationParams& params,
                                                          const PreparedRequest& prepared,
                                                          int choice_index, Sink sink) {
  auto stream = std::make_shared<GenerationStream>(Private{}, ctx, params, prepared,
                                                   std::move(sink));
  // The callback keeps the stream alive until the engine drops it (last event or Cancel).
  uint64_t id = ctx.engine->Submit(BuildSubmitRequest(ctx, params, prepared, choice_index),
                                   [stream](const EngineEvent& e) { stream->OnEvent(e); });
  bool cancel_finished = false;
  {
    std::lock_guard<std::mutex> lock(stream->mu_);
    stream->engine_id_ = id;
    stream->submitted_ = true;
    cancel_finished = std::exchange(stream->pending_stop_cancel_, false);
  }
  // A stop string matched in an event delivered inside Submit: end it now that the id is known.
  if (cancel_finished) ctx.engine->Cancel(id, /*finished=*/true);
  return stream;
}

void GenerationStream::Cancel() {
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (done_) return;
    done_ = true;
    if (ctx_.metrics != nullptr) {
      ctx_.metrics->in_flight().Dec();
      ctx_.metrics->CountEnd(EndReason::kCancelled);
    }
    if (!submitted_) return;  // unreachable: Start returns only after Submit
    id = engine_id_;
  }
  // Outside mu_: the engine may hold its own lock while it calls OnEvent.
  ctx_.engine->Cancel(id, /*finished=*/false);
}

bool GenerationStream::done() const {
  std::lock_guard<std::mutex> lock(mu_);
  return done_;
}

ChoiceTrace GenerationStream::trace() const {
  std::lock_guard<std::mutex> lock(mu_);
  return trace_;
}

void GenerationStream::TraceEvent(const EngineEvent& event) {
  if (event.submitted_at != std::chrono::steady_clock::time_point{}) trace_.submitted = event.submitted_at;
  if (!event.tokens.empty() && trace_.first_token_received == std::chrono::steady_clock::time_point{}) {
    trace_.first_token_received = event.received_at;
  }
  if (!event.timings.has_value()) return;
  // PhaseTimings' contract: queue and prefill are final on the event with the first token; the
  // final event has every phase the last attempt reached (-1 for the others). Other events'
  // values are not relied on.
  const v1::PhaseTimings& t = *event.timings;
  const bool final_event = event.finished || !event.error.ok();
  if (t.queue_us() >= 0 && (final_event || !event.tokens.empty())) trace_.queue_us = t.queue_us();
  if (t.prefill_us() >= 0 && (final_event || !event.tokens.empty())) trace_.prefill_us = t.prefill_us();
  if (final_event) {
    trace_.kv_transfer_us = t.kv_transfer_us();
    trace_.decode_queue_us = t.decode_queue_us();
    trace_.first_decode_step_us = t.first_decode_step_us();
  }
}

std::string GenerationStream::TokenText(int32_t prev, const std::string& prev_text,
                                        int32_t id) const {
  // Decoding the token after its predecessor keeps SentencePiece's leading space, which a
  // decode of the lone token drops.
  if (prev >= 0) {
    const int32_t pair[2] = {prev, id};
    absl::StatusOr<std::string> both = ctx_.tokenizer->Decode(pair, false);
    if (both.ok() && both->size() >= prev_text.size() &&
        both->compare(0, prev_text.size(), prev_text) == 0) {
      return both->substr(prev_text.size());
    }
  }
  const int32_t one[1] = {id};
  absl::StatusOr<std::string> text = ctx_.tokenizer->Decode(one, false);
  return text.ok() ? *std::move(text) : std::string();
}

GenerationUpdate GenerationStream::ConsumeTokens(const EngineEvent& event, bool* stop_matched) {
  GenerationUpdate u;
  for (size_t i = 0; i < event.tokens.size(); ++i) {
    const EngineToken& t = event.tokens[i];
    ++completion_tokens_;
    GeneratedToken g;
    g.id = t.id;
    g.logprob = t.logprob;
    if (want_logprobs_) {
      std::string prev_text;
      if (last_id_ >= 0) {
        const int32_t prev[1] = {last_id_};
        prev_text = ctx_.tokenizer->Decode(prev, false).value_or("");
      }
      g.token = TokenText(last_id_, prev_text, t.id);
      for (size_t k = 0; k < t.top.size() && static_cast<int>(k) < top_logprobs_; ++k) {
        g.top.push_back({t.top[k].first, TokenText(last_id_, prev_text, t.top[k].first),
                         t.top[k].second});
      }
    }
    last_id_ = t.id;
    // The token that ended generation (EOS, a stop id) adds no text, as in vLLM/OpenAI.
    const bool last = event.finished && !event.finished_by_length && i + 1 == event.tokens.size();
    const bool is_stop_id =
        last && std::find(stop_ids_.begin(), stop_ids_.end(), t.id) != stop_ids_.end();
    if (!is_stop_id) {
      absl::StatusOr<std::string> piece = detok_.Push(t.id);
      if (!piece.ok()) {
        u.status = absl::InternalError(
            absl::StrCat("the engine returned an invalid token: ", piece.status().message()));
        return u;
      }
      g.text = *piece;
      StopMatcher::Result r = stop_.Push(*piece);
      u.text += r.text;
      if (r.stopped) *stop_matched = true;
    }
    u.tokens.push_back(std::move(g));
    if (*stop_matched) break;  // later tokens of this event come after the stop string
  }
  return u;
}

void GenerationStream::OnEvent(const EngineEvent& event) {
  bool cancel_finished = false;
  uint64_t id = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (done_) return;
    TraceEvent(event);
    GenerationUpdate u;
    if (!event.error.ok()) {
      u.status = event.error;
      u.retry_after_s = event.retry_after_s;
    } else {
      bool stop_matched = false;
      u = ConsumeTokens(event, &stop_matched);
      if (!u.status.ok()) {
        cancel_finished = !event.finished;  // the engine still runs it: end it
      } else if (stop_matched) {
        u.finish = FinishReason::kStop;
        cancel_finished = !event.finished;
      } else if (event.finished) {
        StopMatcher::Result r = stop_.Push(detok_.Flush());
        u.text += r.text;
        u.text += stop_.Flush();
        u.finish = (event.finished_by_length && !r.stopped) ? FinishReason::kLength
                                                            : FinishReason::kStop;
      } else if (u.text.empty() && u.tokens.empty()) {
        return;  // "accepted" or an empty batch: nothing for the client
      }
    }
    RecordTokens(u.tokens.size());
    const bool last = !u.status.ok() || u.finish != FinishReason::kNone;
    if (last) {
      done_ = true;
      u.usage = {prompt_tokens_, completion_tokens_};
      RecordEnd(u);
    }
    sink_(std::move(u));
    if (cancel_finished) {
      if (!submitted_) {
        pending_stop_cancel_ = true;
        cancel_finished = false;
      }
      id = engine_id_;
    }
  }
  if (cancel_finished) ctx_.engine->Cancel(id, /*finished=*/true);
}

}  // namespace cleave::frontend
