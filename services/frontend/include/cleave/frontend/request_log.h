// Request ids and the one log line each generation request leaves when it ends, shared by the
// HTTP and gRPC APIs.
//
// The id is the client's x-request-id when it is acceptable, else one the frontend makes (HTTP:
// the response's own cmpl-/chatcmpl- id). It goes back to the client (x-request-id header /
// metadata), to the scheduler (SubmitRequest.trace_id, and from there into the scheduler's and
// workers' log lines) and into every frontend log line about the request.
//
// The line, at Info, is `request_done ` followed by one JSON object:
//   request_id, api (completions|chat|grpc), outcome (stop|length|cancelled|error), status (HTTP
//   status; gRPC: the status code number), prompt_tokens, completion_tokens, n, and, where
//   reached, in milliseconds:
//   ttft_ms            request received -> first token written to the client
//   e2e_ms             request received -> last byte of the response queued
//   frontend_in_ms     request received -> SubmitRequest on the scheduler stream
//   frontend_out_ms    first token read from the scheduler -> written to the client
//   queue_ms, prefill_ms, kv_transfer_ms, decode_queue_ms, first_decode_step_ms   the scheduler's
//                      PhaseTimings
//   error              the message, for outcome error
//   cancelled_by       client (it went away / cancelled the call) or server (a drain's grace ran
//                      out), for outcome cancelled
// With n > 1 the timings are the first choice's. ttft_ms - (frontend_in + queue + prefill +
// frontend_out) is what is not measured: the two gRPC hops between frontend and scheduler.
#pragma once

#include <chrono>
#include <string>
#include <string_view>

#include "cleave/frontend/generation.h"

namespace cleave::frontend {

class FrontendMetrics;

// 1..128 printable ASCII characters, none of them a space or a quote: safe in a header, a log
// line and a metadata value. Anything else from a client is ignored (replaced by our own id).
bool IsAcceptableRequestId(std::string_view id);

struct RequestRecord {
  using Clock = std::chrono::steady_clock;

  std::string request_id;
  const char* api = "";      // "completions", "chat", "grpc"
  const char* outcome = "";  // "stop", "length", "cancelled", "error"
  int status = 0;
  std::string error;                  // with outcome "error"
  const char* cancelled_by = nullptr;  // with outcome "cancelled": "client" or "server"
  int prompt_tokens = 0;
  int completion_tokens = 0;
  int n = 1;
  Clock::time_point received{};
  Clock::time_point first_token_written{};  // default = never
  Clock::time_point done{};
  ChoiceTrace trace;  // the first choice's
};

// The JSON object of the line (exposed for tests).
std::string RequestDoneJson(const RequestRecord& record);
// Logs the line and records frontend_in / frontend_out in `metrics` (may be null).
void LogRequestDone(const RequestRecord& record, FrontendMetrics* metrics);

}  // namespace cleave::frontend
