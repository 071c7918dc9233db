// One /v1/completions or /v1/chat/completions request: parse, prepare, fan out one
// GenerationStream per choice, and turn their updates into SSE chunks or one JSON body.
//
// The response status is decided by the first update of any choice: an engine rejection
// (429/503) before any token still gets a proper HTTP error; after the stream headers have gone
// out, an error becomes an SSE error event followed by [DONE].
#include <chrono>

#include "absl/strings/str_cat.h"
#include "cleave/frontend/frontend_metrics.h"
#include "cleave/frontend/generation.h"
#include "cleave/frontend/http_protocol.h"
#include "cleave/frontend/openai_api.h"
#include "http_internal.h"

namespace cleave::frontend::http_internal {

namespace {
constexpr int kMaxChoices = 256;  // prompts x n in one request

constexpr std::string_view kSseHeaders11 =
    "HTTP/1.1 200 OK\r\nServer: cleave\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    "Cache-Control: no-cache\r\nX-Accel-Buffering: no\r\nConnection: keep-alive\r\n"
    "Transfer-Encoding: chunked\r\n\r\n";
// HTTP/1.0 has no chunked coding: the body ends when the connection closes.
constexpr std::string_view kSseHeaders10 =
    "HTTP/1.0 200 OK\r\nServer: cleave\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    "Cache-Control: no-cache\r\nConnection: close\r\n\r\n";
}  // namespace

class GenerateCall : public std::enable_shared_from_this<GenerateCall> {
 public:
  GenerateCall(std::shared_ptr<Session> session, const FrontendContext& ctx, bool chat)
      : session_(std::move(session)), executor_(session_->executor()), ctx_(ctx), chat_(chat) {}

  // Returns false after having answered with an error.
  bool Start(const std::string& body);
  void OnUpdate(int index, GenerationUpdate u);
  void Cancel();

 private:
  struct Choice {
    int prompt = 0;                 // index into params_/prepared_
    ChoiceState state;
    std::shared_ptr<GenerationStream> stream;
    bool done = false;
  };

  absl::Status Parse(const std::string& body);
  void SendStreamHeaders();
  void SendEvent(const nlohmann::json& j);
  void StreamUpdate(Choice& c, int index, const GenerationUpdate& u);
  void Fail(const absl::Status& status, int retry_after_s);
  void Complete();
  void Finish();
  nlohmann::json WithUsageNull(nlohmann::json chunk) const;

  std::shared_ptr<Session> session_;  // null once finished (breaks the session <-> call cycle)
  Executor executor_;
  const FrontendContext& ctx_;
  const bool chat_;
  std::vector<GenerationParams> params_;  // one per prompt
  std::vector<PreparedRequest> prepared_;
  std::vector<Choice> choices_;
  ResponseMeta meta_;
  Usage usage_;
  int remaining_ = 0;
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

bool GenerateCall::Start(const std::string& body) {
  if (absl::Status s = Parse(body); !s.ok()) {
    session_->SendResponse(ErrorResponse(s));
    session_.reset();
    finished_ = true;
    return false;
  }
  meta_.id = NewResponseId(chat_ ? "chatcmpl-" : "cmpl-");
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
  session_->Write(std::string(session_->http10() ? kSseHeaders10 : kSseHeaders11));
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
  if (params_[0].stream) {
    if (!headers_sent_) SendStreamHeaders();
    StreamUpdate(c, index, u);
  } else {
    c.state.text += u.text;
    if (params_[c.prompt].logprobs) {
      for (GeneratedToken& t : u.tokens) c.state.tokens.push_back(std::move(t));
    }
  }
  if (u.finish == FinishReason::kNone) return;
  c.done = true;
  c.state.finish = u.finish;
  usage_.completion_tokens += u.usage.completion_tokens;
  if (--remaining_ == 0) Complete();
}

void GenerateCall::Complete() {
  if (params_[0].stream) {
    if (!headers_sent_) SendStreamHeaders();
    if (params_[0].include_usage) SendEvent(UsageChunk(meta_, chat_, usage_));
    std::string done(kSseDone);
    session_->Write(session_->http10() ? done : HttpChunk(done));
    if (!session_->http10()) session_->Write(HttpChunk(""));
    session_->EndResponse(session_->http10());
    return Finish();
  }
  std::vector<ChoiceState> states;
  for (Choice& c : choices_) {
    if (params_[c.prompt].echo) c.state.text = prepared_[c.prompt].prompt_text + c.state.text;
    states.push_back(std::move(c.state));
  }
  nlohmann::json body = chat_ ? ChatResponse(meta_, states, params_[0], usage_)
                              : CompletionResponse(meta_, states, params_[0], usage_);
  session_->SendResponse(JsonResponse(200, DumpJson(body)));
  Finish();
}

void GenerateCall::Fail(const absl::Status& status, int retry_after_s) {
  for (Choice& c : choices_) {
    if (!c.done && c.stream != nullptr) c.stream->Cancel();
    c.done = true;
  }
  if (!headers_sent_) {
    session_->SendResponse(ErrorResponse(status, retry_after_s));
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
  session_->EndResponse(session_->http10());
  Finish();
}

void GenerateCall::Finish() {
  finished_ = true;
  session_.reset();
}

void GenerateCall::Cancel() {
  if (finished_) return;
  // Only the session calls this, when its client went away mid-request.
  if (ctx_.metrics != nullptr) ctx_.metrics->client_disconnects().Inc();
  for (Choice& c : choices_) {
    if (!c.done && c.stream != nullptr) c.stream->Cancel();
    c.done = true;
  }
  Finish();
}

std::shared_ptr<GenerateCall> StartGenerateCall(const std::shared_ptr<Session>& session,
                                                const FrontendContext& ctx, bool chat,
                                                const std::string& body) {
  auto call = std::make_shared<GenerateCall>(session, ctx, chat);
  if (!call->Start(body)) return nullptr;
  return call;
}

void CancelGenerateCall(GenerateCall& call) { call.Cancel(); }

}  // namespace cleave::frontend::http_internal
