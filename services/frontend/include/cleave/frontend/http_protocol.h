// Small pieces of HTTP framing and OpenAI error shape shared by the server and its tests.
#pragma once

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace cleave::frontend {

// absl code -> HTTP status: InvalidArgument/OutOfRange/FailedPrecondition 400, Unauthenticated
// 401, NotFound 404,
// ResourceExhausted 429, Unavailable 503, DeadlineExceeded 504, anything else 500.
int HttpStatusFor(const absl::Status& status);

// OpenAI's error body: {"error": {"message", "type", "param", "code"}}. type/code follow the
// status (400 invalid_request_error; 401 invalid_request_error / invalid_api_key; 404 model_not_found / not_found; 429 rate_limit_error;
// 5xx server_error). An empty param is written as null.
std::string OpenAiErrorBody(int http_status, std::string_view message, std::string_view param);
// The same for an absl::Status (param from ErrorParam).
std::string OpenAiErrorBody(const absl::Status& status);

// One server-sent event carrying `data` ("data: <data>\n\n"). data must not contain a newline
// (JSON from DumpJson never does).
std::string SseEvent(std::string_view data);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

// One chunk of HTTP/1.1 chunked transfer coding ("<hex size>\r\n<data>\r\n"); empty data is
// the terminating chunk "0\r\n\r\n".
std::string HttpChunk(std::string_view data);

}  // namespace cleave::frontend
