#include "cleave/frontend/grpc_api.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/health_check_service_interface.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"
#include "cleave/frontend/api_keys.h"
#include "cleave/frontend/frontend_metrics.h"
#include "cleave/frontend/generation.h"
#include "cleave/frontend/lifecycle.h"
#include "cleave/frontend/openai_api.h"
#include "cleave/frontend/request_log.h"
#include "cleave/v1/generate.grpc.pb.h"

namespace cleave::frontend {
namespace {

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

GenerationParams FromProto(const v1::GenerateRequest& r) {
  GenerationParams p;
  p.api = ApiKind::kGrpc;
  p.model = r.model();
  if (r.has_prompt_token_ids()) {
    p.prompt_token_ids = std::vector<int32_t>(r.prompt_token_ids().ids().begin(), r.prompt_token_ids().ids().end());
  } else {
    p.prompt = r.prompt();
  }
  if (r.max_tokens() != 0) p.max_tokens = r.max_tokens();
  const v1::SamplingOptions& s = r.sampling();
  if (s.has_temperature()) p.temperature = s.temperature();
  if (s.has_top_p()) p.top_p = s.top_p();
  if (s.has_top_k()) p.top_k = s.top_k();
  if (s.has_min_p()) p.min_p = s.min_p();
  if (s.has_repetition_penalty()) p.repetition_penalty = s.repetition_penalty();
  if (s.has_presence_penalty()) p.presence_penalty = s.presence_penalty();
  if (s.has_frequency_penalty()) p.frequency_penalty = s.frequency_penalty();
  if (s.has_seed()) p.seed = s.seed();
  p.logprobs = s.logprobs();
  p.top_logprobs = s.top_logprobs();
  p.stop.assign(r.stop().begin(), r.stop().end());
  p.stop_token_ids.assign(r.stop_token_ids().begin(), r.stop_token_ids().end());
  p.ignore_eos = r.ignore_eos();
  p.priority = r.priority();
  p.skip_special_tokens = r.has_skip_special_tokens() ? r.skip_special_tokens() : true;
  p.stream = true;
  return p;
}

// The client's x-request-id metadata when acceptable, else a new id.
std::string RequestIdFor(const grpc::CallbackServerContext& context) {
  const auto& md = context.client_metadata();
  if (auto it = md.find("x-request-id"); it != md.end()) {
    std::string_view id(it->second.data(), it->second.size());
    if (IsAcceptableRequestId(id)) return std::string(id);
  }
  return NewResponseId("gen-");
}

// OK, or UNAUTHENTICATED when API keys are configured and the call's `authorization` metadata
// names none of them.
grpc::Status CheckApiKey(const FrontendContext& ctx, const grpc::CallbackServerContext& context) {
  if (ctx.api_keys == nullptr || !ctx.api_keys->enabled()) return grpc::Status::OK;
  const auto& md = context.client_metadata();
  std::string_view authorization;
  if (auto it = md.find("authorization"); it != md.end()) {
    authorization = std::string_view(it->second.data(), it->second.size());
  }
  if (ctx.api_keys->Authorizes(authorization)) return grpc::Status::OK;
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      authorization.empty() ? "missing API key: send metadata 'authorization: Bearer <key>'"
                                            : "incorrect API key provided");
}

// A Generate call refused before it started (no key): ends at once with `status`.
class RefusedGenerate : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit RefusedGenerate(const grpc::Status& status) { Finish(status); }
  void OnDone() override { delete this; }
};

// One Generate call: the pipeline's updates become messages, written one at a time (the
// callback API allows a single outstanding write), and the client cancelling the call cancels
// the engine request.
//
// Lock order: the pipeline calls OnUpdate holding the stream's lock, so nothing here calls into
// the stream while holding mu_ (Cancel and trace() are called with mu_ released).
class GenerateReactor : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  GenerateReactor(FrontendContext& ctx, grpc::CallbackServerContext& context, const v1::GenerateRequest& request,
                  const std::atomic<bool>& server_stopping)
      : metrics_(ctx.metrics),
        server_stopping_(server_stopping),
        received_(std::chrono::steady_clock::now()),
        request_id_(RequestIdFor(context)) {
    context.AddInitialMetadata("x-request-id", request_id_);
    if (ctx.lifecycle != nullptr) {
      admission_ = ctx.lifecycle->TryAdmit();
      if (!admission_.has_value()) {
        std::lock_guard lock(mu_);
        FinishLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE,
                                  "the server is shutting down and takes no new requests; retry on another replica"));
        return;
      }
    }
    GenerationParams params = FromProto(request);
    absl::StatusOr<PreparedRequest> prepared = PrepareRequest(ctx, params);
    if (!prepared.ok()) {
      std::lock_guard lock(mu_);
      FinishLocked(ToGrpc(prepared.status()));
      return;
    }
    prepared->trace_id = request_id_;
    prompt_tokens_ = static_cast<int>(prepared->prompt_ids.size());
    // Not under mu_: the pipeline may deliver a first update before Start returns.
    auto stream = GenerationStream::Start(ctx, params, *prepared, 0,
                                          [this](GenerationUpdate u) { OnUpdate(std::move(u)); });
    bool cancelled;
    {
      std::lock_guard lock(mu_);
      stream_ = stream;
      cancelled = cancelled_;
    }
    if (cancelled) stream->Cancel();
  }

  void OnWriteDone(bool ok) override {
    std::unique_lock lock(mu_);
    writing_ = false;
    if (!ok) {
      // The client is gone: stop the engine work, then end the call.
      auto stream = stream_;
      lock.unlock();
      if (stream) stream->Cancel();
      lock.lock();
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "client went away"));
      return;
    }
    queue_.pop_front();
    PumpLocked();
  }

  void OnCancel() override {
    std::shared_ptr<GenerationStream> stream;
    {
      std::lock_guard lock(mu_);
      stream = stream_;
    }
    if (stream) stream->Cancel();
    std::lock_guard lock(mu_);
    if (metrics_ != nullptr && !finished_ && !server_stopping_.load()) metrics_->client_disconnects().Inc();
    if (!writing_) FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
    cancelled_ = true;
  }

  // Every reaction has run and none will: the one place the call's end is logged without
  // holding mu_ (the stream's trace takes the stream's lock).
  void OnDone() override {
    LogDone();
    delete this;
  }

 private:
  void OnUpdate(GenerationUpdate u) {
    std::lock_guard lock(mu_);
    if (finished_ || cancelled_) return;
    if (!u.status.ok()) {
      end_status_ = ToGrpc(u.status);
      if (u.retry_after_s > 0) {
        // Mirrors HTTP's Retry-After for RESOURCE_EXHAUSTED.
        ctx_retry_after_ = u.retry_after_s;
      }
      ended_ = true;
      PumpLocked();
      return;
    }
    v1::GenerateResponse r;
    if (first_) r.set_request_id(request_id_);
    first_ = false;
    r.set_text(u.text);
    for (const GeneratedToken& t : u.tokens) {
      v1::GeneratedToken* g = r.add_tokens();
      g->set_token_id(t.id);
      g->set_text(t.token.empty() ? t.text : t.token);
      g->set_logprob(t.logprob);
      for (const TopLogprob& alt : t.top) {
        v1::TokenLogprob* a = g->add_top_logprobs();
        a->set_token_id(alt.id);
        a->set_token(alt.text);
        a->set_logprob(alt.logprob);
      }
    }
    if (u.finish != FinishReason::kNone) {
      r.set_finish_reason(u.finish == FinishReason::kStop ? v1::FINISH_REASON_STOP : v1::FINISH_REASON_LENGTH);
      r.set_prompt_tokens(u.usage.prompt_tokens);
      r.set_completion_tokens(u.usage.completion_tokens);
      finish_ = u.finish;
      ended_ = true;
    }
    tokens_seen_ += static_cast<int>(u.tokens.size());
    queue_.push_back(std::move(r));
    PumpLocked();
    // The message is handed to gRPC (or queued behind the one being written).
    if (!u.tokens.empty() && first_token_written_ == std::chrono::steady_clock::time_point{}) {
      first_token_written_ = std::chrono::steady_clock::now();
    }
  }

  void LogDone() {
    std::shared_ptr<GenerationStream> stream;
    RequestRecord r;
    {
      std::lock_guard lock(mu_);
      stream = stream_;
      const grpc::StatusCode code = final_status_.error_code();
      r.outcome = code == grpc::StatusCode::OK          ? (finish_ == FinishReason::kLength ? "length" : "stop")
                  : code == grpc::StatusCode::CANCELLED ? "cancelled"
                                                        : "error";
      if (code == grpc::StatusCode::CANCELLED) {
        r.cancelled_by = server_stopping_.load() ? "server" : "client";
      } else if (code != grpc::StatusCode::OK) {
        r.error = final_status_.error_message();
      }
      r.status = static_cast<int>(code);
      r.completion_tokens = tokens_seen_;
      r.first_token_written = first_token_written_;
    }
    r.request_id = request_id_;
    r.api = "grpc";
    r.prompt_tokens = prompt_tokens_;
    r.received = received_;
    r.done = std::chrono::steady_clock::now();
    if (stream != nullptr) r.trace = stream->trace();
    LogRequestDone(r, metrics_);
  }

  void PumpLocked() {
    if (finished_ || writing_) return;
    if (!queue_.empty()) {
      writing_ = true;
      StartWrite(&queue_.front());
      return;
    }
    if (cancelled_) {
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled by the client"));
    } else if (ended_) {
      if (ctx_retry_after_ > 0 && !end_status_.ok()) {
        end_status_ = grpc::Status(end_status_.error_code(),
                                   absl::StrCat(end_status_.error_message(), " (retry after ",
                                                ctx_retry_after_, " s)"));
      }
      FinishLocked(end_status_);
    }
  }

  void FinishLocked(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    final_status_ = status;
    if (metrics_ != nullptr) metrics_->CountGrpc("Generate", status.error_code());
    Finish(status);
  }

  FrontendMetrics* const metrics_;
  const std::atomic<bool>& server_stopping_;  // the server cancels calls (a drain ran out of time)
  const std::chrono::steady_clock::time_point received_;
  const std::string request_id_;
  // Counts the call as in flight for a drain until the reactor is deleted (OnDone).
  std::optional<FrontendLifecycle::Admission> admission_;
  int prompt_tokens_ = 0;
  std::mutex mu_;
  std::shared_ptr<GenerationStream> stream_;
  std::deque<v1::GenerateResponse> queue_;
  bool first_ = true;
  bool writing_ = false;
  bool ended_ = false;
  bool cancelled_ = false;
  bool finished_ = false;
  int ctx_retry_after_ = 0;
  grpc::Status end_status_;
  grpc::Status final_status_;  // what Finish was called with
  FinishReason finish_ = FinishReason::kNone;
  int tokens_seen_ = 0;
  std::chrono::steady_clock::time_point first_token_written_{};
};

class GenerationService final : public v1::Generation::CallbackService {
 public:
  explicit GenerationService(FrontendContext& ctx) : ctx_(ctx) {}

  void FinishUnary(grpc::ServerUnaryReactor* reactor, const char* method, const grpc::Status& status) {
    if (ctx_.metrics != nullptr) ctx_.metrics->CountGrpc(method, status.error_code());
    reactor->Finish(status);
  }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(grpc::CallbackServerContext* context,
                                                            const v1::GenerateRequest* request) override {
    if (grpc::Status auth = CheckApiKey(ctx_, *context); !auth.ok()) {
      if (ctx_.metrics != nullptr) ctx_.metrics->CountGrpc("Generate", auth.error_code());
      return new RefusedGenerate(auth);
    }
    return new GenerateReactor(ctx_, *context, *request, stopping_);
  }

  // Set before the server shuts down: cancellations from then on are the server's, not clients'.
  void MarkStopping() { stopping_.store(true); }

  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context, const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* reply) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    if (grpc::Status auth = CheckApiKey(ctx_, *context); !auth.ok()) {
      FinishUnary(reactor, "Tokenize", auth);
      return reactor;
    }
    if (absl::Status s = CheckModel(request->model()); !s.ok()) {
      FinishUnary(reactor, "Tokenize", ToGrpc(s));
      return reactor;
    }
    absl::StatusOr<std::vector<int32_t>> ids = ctx_.tokenizer->Encode(request->text(), request->add_special_tokens());
    if (!ids.ok()) {
      FinishUnary(reactor, "Tokenize", ToGrpc(absl::InvalidArgumentError(ids.status().message())));
      return reactor;
    }
    for (int32_t id : *ids) reply->add_tokens(id);
    reply->set_count(static_cast<int32_t>(ids->size()));
    reply->set_max_model_len(ctx_.model.max_model_len);
    FinishUnary(reactor, "Tokenize", grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context, const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* reply) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    if (grpc::Status auth = CheckApiKey(ctx_, *context); !auth.ok()) {
      FinishUnary(reactor, "Detokenize", auth);
      return reactor;
    }
    if (absl::Status s = CheckModel(request->model()); !s.ok()) {
      FinishUnary(reactor, "Detokenize", ToGrpc(s));
      return reactor;
    }
    std::vector<int32_t> ids(request->tokens().begin(), request->tokens().end());
    absl::StatusOr<std::string> text = ctx_.tokenizer->Decode(ids, /*skip_special_tokens=*/false);
    if (!text.ok()) {
      FinishUnary(reactor, "Detokenize", ToGrpc(absl::InvalidArgumentError(text.status().message())));
      return reactor;
    }
    reply->set_text(*text);
    FinishUnary(reactor, "Detokenize", grpc::Status::OK);
    return reactor;
  }

  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context, const v1::ListModelsRequest*,
                                       v1::ListModelsResponse* reply) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    if (grpc::Status auth = CheckApiKey(ctx_, *context); !auth.ok()) {
      FinishUnary(reactor, "ListModels", auth);
      return reactor;
    }
    v1::ModelInfo* m = reply->add_models();
    m->set_id(ctx_.model.id);
    m->set_max_model_len(ctx_.model.max_model_len);
    m->set_vocab_size(ctx_.model.vocab_size);
    FinishUnary(reactor, "ListModels", grpc::Status::OK);
    return reactor;
  }

 private:
  absl::Status CheckModel(const std::string& model) const {
    if (model.empty() || model == ctx_.model.id) return absl::OkStatus();
    return absl::NotFoundError(absl::StrCat("The model `", model, "` does not exist."));
  }

  FrontendContext& ctx_;
  std::atomic<bool> stopping_{false};
};

}  // namespace

struct GrpcApiServer::Impl {
  std::unique_ptr<GenerationService> service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;
};

GrpcApiServer::GrpcApiServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GrpcApiServer::~GrpcApiServer() { Stop(); }
int GrpcApiServer::port() const { return impl_->port; }

absl::StatusOr<std::unique_ptr<GrpcApiServer>> GrpcApiServer::Start(const std::string& address,
                                                                    FrontendContext& ctx,
                                                                    const std::optional<tls::TlsPem>& tls) {
  std::shared_ptr<grpc::ServerCredentials> creds = grpc::InsecureServerCredentials();
  if (tls.has_value()) {
    grpc::SslServerCredentialsOptions ssl(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
    ssl.pem_key_cert_pairs.push_back({tls->key, tls->cert});
    creds = grpc::SslServerCredentials(ssl);
  }
  auto impl = std::make_unique<Impl>();
  impl->service = std::make_unique<GenerationService>(ctx);
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(address, creds, &impl->port);
  builder.RegisterService(impl->service.get());
  impl->server = builder.BuildAndStart();
  if (!impl->server || impl->port == 0) {
    return absl::UnavailableError(absl::StrCat("gRPC API cannot listen on ", address));
  }
  // Naming the service registers it; SetServing(bool) then flips it together with "".
  impl->server->GetHealthCheckService()->SetServingStatus(v1::Generation::service_full_name(), true);
  impl->server->GetHealthCheckService()->SetServingStatus(true);
  return std::unique_ptr<GrpcApiServer>(new GrpcApiServer(std::move(impl)));
}

void GrpcApiServer::SetServing(bool serving) {
  if (impl_ && impl_->server) impl_->server->GetHealthCheckService()->SetServingStatus(serving);
}

void GrpcApiServer::Stop() {
  if (!impl_ || !impl_->server) return;
  impl_->service->MarkStopping();
  impl_->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  impl_->server->Wait();
  impl_->server.reset();
}

}  // namespace cleave::frontend
