// The routes that answer at once: health, readiness, models, tokenize/detokenize, the KV debug
// dump, and 404/405 for everything that is not a route.
#include <chrono>

#include "absl/strings/str_cat.h"
#include "cleave/common/metrics.h"
#include "cleave/frontend/api_keys.h"
#include "cleave/frontend/frontend_metrics.h"
#include "cleave/frontend/chat_template.h"
#include "cleave/frontend/http_protocol.h"
#include "cleave/frontend/lifecycle.h"
#include "cleave/frontend/openai_api.h"
#include "http_internal.h"
#include "cleave/v1/worker_role.h"
#include "nlohmann/json.hpp"

namespace cleave::frontend::http_internal {
namespace {

using nlohmann::json;

int64_t NowSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

absl::Status CheckModel(const FrontendContext& ctx, const std::string& model) {
  return CheckModelName(model, ctx.model);
}

json ModelCard(const FrontendContext& ctx) {
  return {{"id", ctx.model.id},
          {"object", "model"},
          {"created", NowSeconds()},
          {"owned_by", "cleave"},
          {"root", ctx.model.id},
          {"parent", nullptr},
          {"max_model_len", ctx.model.max_model_len},
          {"permission", json::array()}};
}

SimpleResponse Tokenize(const FrontendContext& ctx, const std::string& body) {
  absl::StatusOr<TokenizeBody> req = ParseTokenizeRequest(body);
  if (!req.ok()) return ErrorResponse(req.status());
  if (absl::Status s = CheckModel(ctx, req->model); !s.ok()) return ErrorResponse(s);
  std::string text = req->prompt;
  if (req->is_chat) {
    absl::StatusOr<std::string> rendered =
        ctx.chat_template->Render(req->messages, req->add_generation_prompt);
    if (!rendered.ok()) return ErrorResponse(400, std::string(rendered.status().message()), "messages");
    text = *std::move(rendered);
  }
  absl::StatusOr<std::vector<int32_t>> ids = ctx.tokenizer->Encode(text, req->add_special_tokens);
  if (!ids.ok()) return ErrorResponse(400, std::string(ids.status().message()), "prompt");
  return JsonResponse(200, DumpJson({{"tokens", *ids},
                                     {"count", ids->size()},
                                     {"max_model_len", ctx.model.max_model_len}}));
}

SimpleResponse Detokenize(const FrontendContext& ctx, const std::string& body) {
  absl::StatusOr<DetokenizeBody> req = ParseDetokenizeRequest(body);
  if (!req.ok()) return ErrorResponse(req.status());
  if (absl::Status s = CheckModel(ctx, req->model); !s.ok()) return ErrorResponse(s);
  for (size_t i = 0; i < req->tokens.size(); ++i) {
    if (req->tokens[i] < 0 || req->tokens[i] >= ctx.model.vocab_size) {
      return ErrorResponse(400, absl::StrCat("tokens[", i, "] must be a token id in [0, ",
                                             ctx.model.vocab_size, "), got ", req->tokens[i]),
                           "tokens");
    }
  }
  absl::StatusOr<std::string> text = ctx.tokenizer->Decode(req->tokens, false);
  if (!text.ok()) return ErrorResponse(400, std::string(text.status().message()), "tokens");
  return JsonResponse(200, DumpJson({{"prompt", *text}}));
}

SimpleResponse DebugKv(const FrontendContext& ctx) {
  absl::StatusOr<v1::StatsResponse> stats = ctx.engine->Stats();
  if (!stats.ok()) return ErrorResponse(stats.status());
  json workers = json::array();
  for (const v1::WorkerStats& w : stats->workers()) {
    workers.push_back({{"worker_id", w.worker_id()},
                       {"name", w.name()},
                       {"role", v1::WorkerRoleName(w.role())},
                       {"num_kv_blocks", w.num_kv_blocks()},
                       {"free_blocks", w.free_blocks()},
                       {"cached_blocks", w.cached_blocks()},
                       {"used_blocks", w.used_blocks()},
                       {"num_running", w.num_running()},
                       {"num_state_slots", w.num_state_slots()},
                       {"free_state_slots", w.free_state_slots()},
                       {"kv_address", w.kv_address()},
                       {"http_address", w.http_address()},
                       {"afd_group", w.afd_group()},
                       {"afd_complete", w.afd_complete()}});
  }
  return JsonResponse(200, DumpJson({{"workers", std::move(workers)},
                                     {"num_waiting", stats->num_waiting()},
                                     {"num_running", stats->num_running()},
                                     {"num_finished", stats->num_finished()},
                                     {"num_rejected", stats->num_rejected()},
                                     {"num_preempted", stats->num_preempted()},
                                     {"prefix_cache_hit_tokens", stats->prefix_cache_hit_tokens()}}));
}

SimpleResponse MethodNotAllowed(const char* allow) {
  SimpleResponse r = ErrorResponse(405, absl::StrCat("Method Not Allowed; use ", allow));
  r.headers.emplace_back("Allow", allow);
  return r;
}

}  // namespace

SimpleResponse JsonResponse(int status, std::string body) {
  SimpleResponse r;
  r.status = status;
  r.body = std::move(body);
  return r;
}

SimpleResponse ErrorResponse(int http_status, std::string_view message, std::string_view param) {
  return JsonResponse(http_status, OpenAiErrorBody(http_status, message, param));
}

SimpleResponse ErrorResponse(const absl::Status& status, int retry_after_s) {
  SimpleResponse r = JsonResponse(HttpStatusFor(status), OpenAiErrorBody(status));
  if (r.status == 429) r.headers.emplace_back("Retry-After", std::to_string(std::max(1, retry_after_s)));
  return r;
}

std::optional<SimpleResponse> CheckApiKey(const FrontendContext& ctx, std::string_view path,
                                          std::string_view authorization) {
  if (ctx.api_keys == nullptr || !ctx.api_keys->enabled() || path == "/health") return std::nullopt;
  if (ctx.api_keys->Authorizes(authorization)) return std::nullopt;
  SimpleResponse r = ErrorResponse(
      401, authorization.empty()
               ? "Missing API key: send it as 'Authorization: Bearer <key>'"
               : "Incorrect API key provided");
  r.headers.emplace_back("WWW-Authenticate", "Bearer");
  return r;
}

SimpleResponse HandleSimpleRoute(const FrontendContext& ctx, http::verb method,
                                 std::string_view path, const std::string& body) {
  const bool get = method == http::verb::get;
  const bool post = method == http::verb::post;
  if (path == "/health") return get ? JsonResponse(200, "{}") : MethodNotAllowed("GET");
  if (path == "/ready") {
    if (!get) return MethodNotAllowed("GET");
    // Draining first: a load balancer must stop sending here even though the engine still works.
    if (ctx.lifecycle != nullptr && ctx.lifecycle->draining()) {
      return ErrorResponse(503, "The server is draining: it is shutting down and takes no new requests");
    }
    return ctx.engine->Ready() ? JsonResponse(200, R"({"ready":true})")
                               : ErrorResponse(503, "The engine is not ready");
  }
  if (path == "/v1/models") {
    if (!get) return MethodNotAllowed("GET");
    return JsonResponse(200, DumpJson({{"object", "list"}, {"data", json::array({ModelCard(ctx)})}}));
  }
  if (path.substr(0, 11) == "/v1/models/") {
    if (!get) return MethodNotAllowed("GET");
    std::string id(path.substr(11));
    if (id != ctx.model.id) {
      return ErrorResponse(404, absl::StrCat("The model `", id, "` does not exist."), "model");
    }
    return JsonResponse(200, DumpJson(ModelCard(ctx)));
  }
  if (path == "/tokenize") return post ? Tokenize(ctx, body) : MethodNotAllowed("POST");
  if (path == "/detokenize") return post ? Detokenize(ctx, body) : MethodNotAllowed("POST");
  if (path == "/debug/kv") return get ? DebugKv(ctx) : MethodNotAllowed("GET");
  if (path == "/metrics" && ctx.metrics != nullptr) {
    if (!get) return MethodNotAllowed("GET");
    SimpleResponse r = JsonResponse(200, ctx.metrics->Render());
    r.content_type = std::string(metrics::kContentType);
    return r;
  }
  if (path == "/v1/completions" || path == "/v1/chat/completions") return MethodNotAllowed("POST");
  return ErrorResponse(404, absl::StrCat("Not found: ", std::string(path)));
}

}  // namespace cleave::frontend::http_internal

namespace cleave::frontend {

GetAnswer AnswerGet(const FrontendContext& ctx, std::string_view path) {
  http_internal::SimpleResponse r = http_internal::HandleSimpleRoute(ctx, boost::beast::http::verb::get, path, "");
  return {r.status, r.content_type, std::move(r.body)};
}

}  // namespace cleave::frontend
