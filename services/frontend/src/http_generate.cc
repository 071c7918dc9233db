// One /v1/completions or /v1/chat/completions request: parse, prepare, fan out one
// GenerationStream per choice, and turn their updates into SSE chunks or one JSON body.
//
// The response status is decided by the first update of any choice: an engine rejection
// (429/503) before any token still gets a proper HTTP error; after the stream headers have gone
// out, an error becomes an SSE error event followed by [DONE].
#include <chrono>
#include <optional>

#include "absl/strings/str_cat.h"
#include "cleave/frontend/frontend_metrics.h"
#include "cleave/frontend/generation.h"
#include "cleave/frontend/http_protocol.h"
#include "cleave/frontend/lifecycle.h"
#include "cleave/frontend/openai_api.h"
#include "cleave/frontend/request_log.h"
#include "http_internal.h"

namespace cleave::frontend::http_internal {

namespace {
constexpr int kMaxChoices = 256;  // prompts x n in one request
// What a refused request's client is told to wait: the drain ends in seconds, and by then a load
// balancer has taken this frontend out (its /ready is 503).
constexpr int kDrainRetryAfterS = 1;

// The header lines of an SSE response, without the blank line that ends them.
constexpr std::string_view kSseHeaders11 =
    "HTTP/1.1 200 OK\r\nServer: cleave\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: keep-alive\r\n"
    "Transfer-Encoding: chunked\r\n";
// HTTP/1.0 has no chunked coding: the body ends when the connection closes.
constexpr std::string_view kSseHeaders10 =
    "HTTP/1.0 200 OK\r\nServer: cleave\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    "Cache-Control: no-cache\r\nConnection: close\r\n";
}  // namespace

class GenerateCall : public std::enable_shared_from_this<GenerateCall> {
 public:
  GenerateCall(std::shared_ptr<Session> session, const FrontendContext& ctx, bool chat,
               std::chrono::steady_clock::time_point received)
      : session_(std::move(session)), executor_(session_->executor()), ctx_(ctx), chat_(chat), received_(received) {}

  // Returns false after having answered with an error.
  bool Start(const std::string& body, std::string_view client_request_id);
  void OnUpdate(int index, GenerationUpdate u);
  void Cancel(bool by_server);

 private:
  struct Choice {
    int prompt = 0;                 // index into params_/prepared_
    ChoiceState state;
    std::shared_ptr<GenerationStream> stream;
    bool done = false;
    std::chrono::steady_clock::time_point first_token_written{};
  };

  absl::Status Parse(const std::string& body);
  void SendStreamHeaders();
  void SendEvent(const nlohmann::json& j);
  void StreamUpdate(Choice& c, int index, const GenerationUpdate& u);
  void Fail(const absl::Status& status, int retry_after_s);
  void Complete();
  void Finish();
  // Every response of the call goes out through Respond (x-request-id on all of them), and every
  // SSE stream ends through EndStream. Both end the call (then LogDone, Finish).
  void Respond(SimpleResponse response);
  void EndStream();
  // The request_done line; once, when the call ends however it ends.
  void LogDone(const char* outcome, int status, std::string error = "", const char* cancelled_by = nullptr);
  nlohmann::json WithUsageNull(nlohmann::json chunk) const;

  std::shared_ptr<Session> session_;  // null once finished (breaks the session <-> call cycle)
  Executor executor_;
  const FrontendContext& ctx_;
  const bool chat_;
  const std::chrono::steady_clock::time_point received_;
  std::string request_id_;
  // Counts the call as in flight for a drain until the call is destroyed, which is after the
  // session wrote the response's last byte (Session::Next drops the call only then).
  std::optional<FrontendLifecycle::Admission> admission_;
  std::vector<GenerationParams> params_;  // one per prompt
  std::vector<PreparedRequest> prepared_;
  std::vector<Choice> choices_;
  ResponseMeta meta_;
  Usage usage_;
  int remaining_ = 0;
  int tokens_seen_ = 0;  // of every choice, for the log line whatever the outcome
  bool headers_sent_ = false;
  bool finished_ = false;
};

absl::Status GenerateCall::Parse(const std::string& body) {
  if (chat_) {
    absl::StatusOr<GenerationParams> p = ParseChatCompletionRequest(body);
    if (!p.ok()) return p.status();
    params_.push_back(*std::move(p));
  } else {
    absl::StatusOr<std::vector<GenerationParams>> p = ParseCompletionRequest(body);
    if (!p.ok()) return p.status();
    params_ = *std::move(p);
  }
  int64_t total = 0;
  for (const GenerationParams& p : params_) {
    absl::StatusOr<PreparedRequest> prepared = PrepareRequest(ctx_, p);
    if (!prepared.ok()) return prepared.status();
    usage_.prompt_tokens += static_cast<int>(prepared->prompt_ids.size());
    prepared_.push_back(*std::move(prepared));
    total += p.n;
  }
  if (total > kMaxChoices) {
    return InvalidParam("n", absl::StrCat("prompts x n must be at most ", kMaxChoices, ", got ",
                                          total));
  }
  return absl::OkStatus();
}

void GenerateCall::Respond(SimpleResponse response) {
  response.headers.emplace_back("x-request-id", request_id_);
  // Ended before the session may run Next() (and so CancelGenerateCall) from inside this call.
  finished_ = true;
  session_->SendResponse(response);
}

void GenerateCall::EndStream() {
  finished_ = true;  // as in Respond
  session_->EndResponse(session_->http10());
}

bool GenerateCall::Start(const std::string& body, std::string_view client_request_id) {
  meta_.id = NewResponseId(chat_ ? "chatcmpl-" : "cmpl-");
  request_id_ = IsAcceptableRequestId(client_request_id) ? std::string(client_request_id) : meta_.id;
  if (ctx_.lifecycle != nullptr) {
    admission_ = ctx_.lifecycle->TryAdmit();
    if (!admission_.has_value()) {
      SimpleResponse r = ErrorResponse(
          absl::UnavailableError("The server is shutting down and takes no new requests; retry on another replica"));
      r.headers.emplace_back("Retry-After", std::to_string(kDrainRetryAfterS));
      r.close = true;  // let the client's next connection reach a replica that serves
      Respond(std::move(r));
      LogDone("error", 503, "draining: the server is shutting down");
      Finish();
      return false;
    }
  }
  if (absl::Status s = Parse(body); !s.ok()) {
    Respond(ErrorResponse(s));
    LogDone("error", HttpStatusFor(s), std::string(s.message()));
    Finish();
    return false;
  }
  for (PreparedRequest& p : prepared_) p.trace_id = request_id_;
  meta_.created = std::chrono::duration_cast<std::chrono::seconds>(
                      std::chrono::system_clock::now().time_since_epoch()).count();
  meta_.model = ctx_.model.id;
  if (ctx_.metrics != nullptr) ctx_.metrics->n_param().Observe(static_cast<double>(params_[0].n));
  for (size_t p = 0; p < params_.size(); ++p) {
    for (int64_t i = 0; i < params_[p].n; ++i) {
      Choice c;
      c.prompt = static_cast<int>(p);
      choices_.push_back(std::move(c));
    }
  }
  remaining_ = static_cast<int>(choices_.size());
  std::weak_ptr<GenerateCall> weak = weak_from_this();
  for (size_t index = 0; index < choices_.size(); ++index) {
    Choice& c = choices_[index];
    const int choice_in_prompt = static_cast<int>(index) - c.prompt * static_cast<int>(params_[c.prompt].n);
    // Runs on an engine thread: hop onto the session's strand. Holds only a weak reference, so
    // a stream the engine keeps a little longer pins neither the call nor the io_context.
    auto sink = [weak, index](GenerationUpdate u) {
      std::shared_ptr<GenerateCall> call = weak.lock();
      if (call == nullptr) return;
      Executor executor = call->executor_;
      net::post(executor, [call = std::move(call), index, u = std::move(u)]() mutable {
        call->OnUpdate(static_cast<int>(index), std::move(u));
      });
    };
    c.stream = GenerationStream::Start(ctx_, params_[c.prompt], prepared_[c.prompt],
                                       choice_in_prompt, std::move(sink));
  }
  return true;
}

nlohmann::json GenerateCall::WithUsageNull(nlohmann::json chunk) const {
  if (params_[0].include_usage) chunk["usage"] = nullptr;  // as OpenAI, when usage is asked
  return chunk;
}

void GenerateCall::SendEvent(const nlohmann::json& j) {
  std::string event = SseEvent(DumpJson(j));
  session_->Write(session_->http10() ? std::move(event) : HttpChunk(event));
}

void GenerateCall::SendStreamHeaders() {
  headers_sent_ = true;
  session_->CountStatus(200);
  std::string headers(session_->http10() ? kSseHeaders10 : kSseHeaders11);
  headers += "x-request-id: " + request_id_ + "\r\n\r\n";
  session_->Write(std::move(headers));
  // Chat: every choice opens with the assistant role; completions with echo: the prompt.
  for (size_t i = 0; i < choices_.size(); ++i) {
    const GenerationParams& p = params_[choices_[i].prompt];
    if (chat_) {
      SendEvent(WithUsageNull(ChatChunk(meta_, static_cast<int>(i), true, "", nullptr,
                                        FinishReason::kNone)));
    } else if (p.echo) {
      SendEvent(WithUsageNull(CompletionChunk(meta_, static_cast<int>(i),
                                              prepared_[choices_[i].prompt].prompt_text, nullptr,
                                              FinishReason::kNone)));
    }
  }
}

void GenerateCall::StreamUpdate(Choice& c, int index, const GenerationUpdate& u) {
  const GenerationParams& p = params_[c.prompt];
  const bool has_logprobs = p.logprobs && !u.tokens.empty();
  if (u.text.empty() && u.finish == FinishReason::kNone && !has_logprobs) return;
  nlohmann::json logprobs = nullptr;
  if (has_logprobs) {
    logprobs = chat_ ? ChatLogprobs(u.tokens)
                     : CompletionLogprobs(u.tokens, static_cast<int>(p.top_logprobs),
                                          &c.state.text_offset);
  }
  SendEvent(WithUsageNull(chat_ ? ChatChunk(meta_, index, false, u.text, std::move(logprobs), u.finish)
                                : CompletionChunk(meta_, index, u.text, std::move(logprobs), u.finish)));
}

void GenerateCall::OnUpdate(int index, GenerationUpdate u) {
  if (finished_) return;
  Choice& c = choices_[index];
  if (c.done) return;
  if (!u.status.ok()) return Fail(u.status, u.retry_after_s);
  const size_t new_tokens = u.tokens.size();
  if (params_[0].stream) {
    if (!headers_sent_) SendStreamHeaders();
    StreamUpdate(c, index, u);
  } else {
    c.state.text += u.text;
    if (params_[c.prompt].logprobs) {
      for (GeneratedToken& t : u.tokens) c.state.tokens.push_back(std::move(t));
    }
  }
  tokens_seen_ += static_cast<int>(new_tokens);
  // Streaming: the chunk is queued on the socket (written at once when the socket is idle).
  // Otherwise: handed to the response assembly.
  if (new_tokens > 0 && c.first_token_written == std::chrono::steady_clock::time_point{}) {
    c.first_token_written = std::chrono::steady_clock::now();
  }
  if (u.finish == FinishReason::kNone) return;
  c.done = true;
  c.state.finish = u.finish;
  usage_.completion_tokens += u.usage.completion_tokens;
  if (--remaining_ == 0) Complete();
}

void GenerateCall::Complete() {
  // A request is "length" when any of its choices was cut by max_tokens: that is what a reader
  // of the log looks for.
  const char* outcome = "stop";
  for (const Choice& c : choices_) {
    if (c.state.finish == FinishReason::kLength) outcome = "length";
  }
  if (params_[0].stream) {
    if (!headers_sent_) SendStreamHeaders();
    if (params_[0].include_usage) SendEvent(UsageChunk(meta_, chat_, usage_));
    std::string done(kSseDone);
    session_->Write(session_->http10() ? done : HttpChunk(done));
    if (!session_->http10()) session_->Write(HttpChunk(""));
    EndStream();
    LogDone(outcome, 200);
    return Finish();
  }
  std::vector<ChoiceState> states;
  for (Choice& c : choices_) {
    if (params_[c.prompt].echo) c.state.text = prepared_[c.prompt].prompt_text + c.state.text;
    states.push_back(std::move(c.state));
  }
  nlohmann::json body = chat_ ? ChatResponse(meta_, states, params_[0], usage_)
                              : CompletionResponse(meta_, states, params_[0], usage_);
  Respond(JsonResponse(200, DumpJson(body)));
  LogDone(outcome, 200);
  Finish();
}

void GenerateCall::Fail(const absl::Status& status, int retry_after_s) {
  for (Choice& c : choices_) {
    if (!c.done && c.stream != nullptr) c.stream->Cancel();
    c.done = true;
  }
  if (!headers_sent_) {
    Respond(ErrorResponse(status, retry_after_s));
    LogDone("error", HttpStatusFor(status), std::string(status.message()));
    return Finish();
  }
  // Mid-stream: the status line is gone; say it in the stream, as vLLM does.
  std::string event = SseEvent(OpenAiErrorBody(status));
  std::string done(kSseDone);
  if (session_->http10()) {
    session_->Write(event + done);
  } else {
    session_->Write(HttpChunk(event));
    session_->Write(HttpChunk(done));
    session_->Write(HttpChunk(""));
  }
  EndStream();
  LogDone("error", 200, std::string(status.message()));
  Finish();
}

void GenerateCall::LogDone(const char* outcome, int status, std::string error, const char* cancelled_by) {
  RequestRecord r;
  r.request_id = request_id_;
  r.api = chat_ ? "chat" : "completions";
  r.outcome = outcome;
  r.status = status;
  r.error = std::move(error);
  r.cancelled_by = cancelled_by;
  r.prompt_tokens = usage_.prompt_tokens;
  r.completion_tokens = tokens_seen_;
  r.n = static_cast<int>(choices_.size());
  r.received = received_;
  r.done = std::chrono::steady_clock::now();
  if (!choices_.empty()) {
    r.first_token_written = choices_[0].first_token_written;
    if (choices_[0].stream != nullptr) r.trace = choices_[0].stream->trace();
  }
  LogRequestDone(r, ctx_.metrics);
}

void GenerateCall::Finish() {
  finished_ = true;
  session_.reset();
}

void GenerateCall::Cancel(bool by_server) {
  if (finished_) return;
  // Only the session calls this: its client went away mid-request, or the server stops (a drain
  // whose grace ran out).
  if (ctx_.metrics != nullptr && !by_server) ctx_.metrics->client_disconnects().Inc();
  for (Choice& c : choices_) {
    if (!c.done && c.stream != nullptr) c.stream->Cancel();
    c.done = true;
  }
  // Once the stream's headers are out the client saw 200; before, nothing was sent: 499 is
  // nginx's "client closed request", 503 says the server gave up on it.
  LogDone("cancelled", headers_sent_ ? 200 : (by_server ? 503 : 499), "", by_server ? "server" : "client");
  Finish();
}

std::shared_ptr<GenerateCall> StartGenerateCall(const std::shared_ptr<Session>& session,
                                                const FrontendContext& ctx, bool chat,
                                                const std::string& body,
                                                std::string_view client_request_id,
                                                std::chrono::steady_clock::time_point received) {
  auto call = std::make_shared<GenerateCall>(session, ctx, chat, received);
  if (!call->Start(body, client_request_id)) return nullptr;
  return call;
}

void CancelGenerateCall(GenerateCall& call, bool by_server) { call.Cancel(by_server); }

}  // namespace cleave::frontend::http_internal
