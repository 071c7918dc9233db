// The generation pipeline both APIs run for one choice: build the engine request, submit it,
// detokenize the tokens as they arrive, apply stop strings, and hand text + per-token logprobs to
// a sink. HTTP fans out n of these for n choices; gRPC runs one.
#pragma once

#include <chrono>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/frontend/frontend_context.h"
#include "cleave/frontend/generation_params.h"
#include "cleave/frontend/stop_matcher.h"
#include "cleave/model/tokenizer.h"
#include "cleave/v1/control.pb.h"

namespace cleave::frontend {

// A validated, tokenized request, ready to start GenerationStreams from.
struct PreparedRequest {
  std::vector<int32_t> prompt_ids;
  std::string prompt_text;  // the text the prompt ids decode to / were encoded from (echo)
  int max_tokens = 0;       // resolved (ValidatePromptFits)
  // The client-visible request id (x-request-id), sent as SubmitRequest.trace_id so that the
  // scheduler's and workers' log lines name it too. Set by the API layer after PrepareRequest.
  std::string trace_id;
};

// ValidateGenerationParams, then the chat template (chat) or tokenization (text prompt), then
// ValidatePromptFits. Thread-safe.
[[nodiscard]] absl::StatusOr<PreparedRequest> PrepareRequest(const FrontendContext& ctx,
                                                             const GenerationParams& params);

// The engine request for choice `choice_index` (seed + choice_index when a seed was given). EOS
// ids go into stop_token_ids unless ignore_eos: the workers stop on exactly those ids.
v1::SubmitRequest BuildSubmitRequest(const FrontendContext& ctx, const GenerationParams& params,
                                     const PreparedRequest& prepared, int choice_index);

// Where one choice's time went, as far as the frontend sees it (the request_done log line).
// Time points are default-constructed until reached; scheduler phases are -1 until reported.
struct ChoiceTrace {
  std::chrono::steady_clock::time_point submitted{};             // SubmitRequest on the stream
  std::chrono::steady_clock::time_point first_token_received{};  // its first token read back
  // The scheduler's PhaseTimings (control.proto), microseconds: queue and prefill from the event
  // with the first token, the rest from the final event; a later report overrides an earlier.
  int64_t queue_us = -1;
  int64_t prefill_us = -1;
  int64_t kv_transfer_us = -1;
  int64_t decode_queue_us = -1;
  int64_t first_decode_step_us = -1;
};

enum class FinishReason { kNone, kStop, kLength };
const char* FinishReasonName(FinishReason reason);  // "stop", "length", "" for kNone

struct TopLogprob {
  int32_t id = 0;
  std::string text;  // the token's own text, as it reads after the previous token (SentencePiece
                     // "▁the" -> " the"); specials kept; U+FFFD for a partial character
  float logprob = 0;
};

struct GeneratedToken {
  int32_t id = 0;
  std::string text;   // output text this token completed (detokenizer delta; "" mid-character,
                      // before stop-string handling)
  std::string token;  // the token's own text, for logprobs (set only when logprobs are asked)
  float logprob = 0;
  std::vector<TopLogprob> top;  // highest first; empty unless top_logprobs > 0
};

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
};

// One update of one choice. The last update of a stream has finish != kNone or !status.ok().
struct GenerationUpdate {
  absl::Status status;       // not ok: the request failed (the last update)
  int retry_after_s = 0;     // with RESOURCE_EXHAUSTED: seconds the client should wait
  std::string text;          // new output text (stop-string safe, never splits a character)
  std::vector<GeneratedToken> tokens;  // tokens generated since the previous update
  FinishReason finish = FinishReason::kNone;
  Usage usage;               // set on the last update
};

// One choice of one request, from Start to its last update or Cancel.
//
// Threads: engine events arrive on the engine client's thread; the sink is called there (or, for
// events the engine delivers synchronously inside Submit, on the thread calling Start), in order
// and never concurrently. The sink must not block: post to an Asio strand or a queue. Cancel may
// be called from any thread, but not from inside the sink.
//
// Ownership: Start returns shared ownership; the engine callback also holds a reference until the
// stream ends, so dropping the returned pointer does not cancel (call Cancel for that).
class GenerationStream : public std::enable_shared_from_this<GenerationStream> {
 public:
  using Sink = std::function<void(GenerationUpdate)>;

  // ctx must outlive the stream. Submits at once.
  static std::shared_ptr<GenerationStream> Start(const FrontendContext& ctx,
                                                 const GenerationParams& params,
                                                 const PreparedRequest& prepared,
                                                 int choice_index, Sink sink);

  // The client went away: engine->Cancel(id, /*finished=*/false) unless the stream already
  // ended. After Cancel returns, the sink is not called again. Idempotent.
  void Cancel();

  bool done() const;
  // The choice's timeline so far. Thread-safe; not from inside the sink (it holds the lock).
  ChoiceTrace trace() const;

  // Private to Start (public for make_shared).
  struct Private {};
  GenerationStream(Private, const FrontendContext& ctx, const GenerationParams& params,
                   const PreparedRequest& prepared, Sink sink);

 private:
  void OnEvent(const EngineEvent& event);
  void TraceEvent(const EngineEvent& event);  // under mu_
  // Builds the update for event's tokens; sets *stop_matched when a stop string ended the text.
  GenerationUpdate ConsumeTokens(const EngineEvent& event, bool* stop_matched);
  // The token's own text following `prev` (see TopLogprob::text).
  std::string TokenText(int32_t prev, const std::string& prev_text, int32_t id) const;
  void Finish(GenerationUpdate update);

  const FrontendContext& ctx_;
  const bool want_logprobs_;
  const int top_logprobs_;
  const int prompt_tokens_;
  Sink sink_;

  mutable std::mutex mu_;  // guards everything below; held while the sink runs (ordering)
  model::IncrementalDetokenizer detok_;
  StopMatcher stop_;
  std::vector<int32_t> stop_ids_;  // ids that end generation: their text is not output
  int32_t last_id_ = -1;           // previous token (for TokenText)
  uint64_t engine_id_ = 0;
  bool submitted_ = false;          // engine_id_ is valid
  bool done_ = false;               // the last update went out, or Cancel
  bool pending_stop_cancel_ = false;  // a stop string matched before Submit returned
  int completion_tokens_ = 0;
  // Timing for the frontend metrics (ctx_.metrics): submission, and the latest token.
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_token_;
  bool first_token_seen_ = false;
  ChoiceTrace trace_;
  void RecordTokens(size_t n);                 // under mu_
  void RecordEnd(const GenerationUpdate& u);   // under mu_, once, with the last update
};

}  // namespace cleave::frontend
