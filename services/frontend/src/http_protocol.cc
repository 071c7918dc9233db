#include "cleave/frontend/http_protocol.h"

#include <cstdio>

#include "cleave/frontend/generation_params.h"
#include "nlohmann/json.hpp"

namespace cleave::frontend {

int HttpStatusFor(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk: return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
    case absl::StatusCode::kFailedPrecondition: return 400;
    case absl::StatusCode::kUnauthenticated: return 401;
    case absl::StatusCode::kNotFound: return 404;
    case absl::StatusCode::kResourceExhausted: return 429;
    case absl::StatusCode::kUnavailable: return 503;
    case absl::StatusCode::kDeadlineExceeded: return 504;
    default: return 500;
  }
}

std::string OpenAiErrorBody(int http_status, std::string_view message, std::string_view param) {
  const char* type = "invalid_request_error";
  nlohmann::json code = nullptr;
  if (http_status == 404) code = param == "model" ? "model_not_found" : "not_found";
  if (http_status == 401) code = "invalid_api_key";
  if (http_status == 413) code = "request_too_large";
  if (http_status == 429) {
    type = "rate_limit_error";
    code = "rate_limit_exceeded";
  }
  if (http_status >= 500) {
    type = "server_error";
    if (http_status == 503) code = "service_unavailable";
  }
  nlohmann::json error = {{"message", std::string(message)},
                          {"type", type},
                          {"param", param.empty() ? nlohmann::json(nullptr)
                                                  : nlohmann::json(std::string(param))},
                          {"code", code}};
  return nlohmann::json{{"error", std::move(error)}}.dump(
      -1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string OpenAiErrorBody(const absl::Status& status) {
  return OpenAiErrorBody(HttpStatusFor(status), std::string(status.message()),
                         ErrorParam(status));
}

std::string SseEvent(std::string_view data) {
  std::string out;
  out.reserve(data.size() + 8);
  out += "data: ";
  out += data;
  out += "\n\n";
  return out;
}

std::string HttpChunk(std::string_view data) {
  char size[24];
  int n = std::snprintf(size, sizeof(size), "%zx\r\n", data.size());
  std::string out(size, static_cast<size_t>(n));
  out += data;
  out += "\r\n";
  return out;
}

}  // namespace cleave::frontend
