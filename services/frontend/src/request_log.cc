#include "cleave/frontend/request_log.h"

#include <cmath>
#include <optional>

#include "cleave/common/logging.h"
#include "cleave/frontend/frontend_metrics.h"
#include "nlohmann/json.hpp"

namespace cleave::frontend {
namespace {

using Clock = std::chrono::steady_clock;

bool Reached(Clock::time_point t) { return t != Clock::time_point{}; }

// Milliseconds from a to b when both were reached (and in order).
std::optional<double> Span(Clock::time_point a, Clock::time_point b) {
  if (!Reached(a) || !Reached(b) || b < a) return std::nullopt;
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// Microsecond resolution is all the clocks behind these numbers have; more digits are noise.
double RoundMs(double ms) { return std::round(ms * 1000.0) / 1000.0; }

void PutMs(nlohmann::json& j, const char* key, std::optional<double> ms) {
  if (ms.has_value()) j[key] = RoundMs(*ms);
}

void PutUs(nlohmann::json& j, const char* key, int64_t us) {
  if (us >= 0) j[key] = RoundMs(static_cast<double>(us) / 1000.0);
}

}  // namespace

bool IsAcceptableRequestId(std::string_view id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    if (c <= ' ' || c > '~' || c == '"' || c == '\'') return false;
  }
  return true;
}

std::string RequestDoneJson(const RequestRecord& r) {
  nlohmann::json j = {{"request_id", r.request_id},
                      {"api", r.api},
                      {"outcome", r.outcome},
                      {"status", r.status},
                      {"prompt_tokens", r.prompt_tokens},
                      {"completion_tokens", r.completion_tokens},
                      {"n", r.n}};
  PutMs(j, "ttft_ms", Span(r.received, r.first_token_written));
  PutMs(j, "e2e_ms", Span(r.received, r.done));
  PutMs(j, "frontend_in_ms", Span(r.received, r.trace.submitted));
  PutMs(j, "frontend_out_ms", Span(r.trace.first_token_received, r.first_token_written));
  PutUs(j, "queue_ms", r.trace.queue_us);
  PutUs(j, "prefill_ms", r.trace.prefill_us);
  PutUs(j, "kv_transfer_ms", r.trace.kv_transfer_us);
  PutUs(j, "decode_queue_ms", r.trace.decode_queue_us);
  PutUs(j, "first_decode_step_ms", r.trace.first_decode_step_us);
  if (!r.error.empty()) j["error"] = r.error;
  if (r.cancelled_by != nullptr) j["cancelled_by"] = r.cancelled_by;
  // Client text (an error message quoting the request) may hold invalid UTF-8: replace it
  // rather than throw.
  return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

void LogRequestDone(const RequestRecord& r, FrontendMetrics* metrics) {
  CLEAVE_LOG(Info) << "request_done " << RequestDoneJson(r);
  if (metrics == nullptr) return;
  if (std::optional<double> in = Span(r.received, r.trace.submitted)) {
    metrics->request_phase(RequestPhase::kFrontendIn).Observe(*in / 1000.0);
  }
  if (std::optional<double> out = Span(r.trace.first_token_received, r.first_token_written)) {
    metrics->request_phase(RequestPhase::kFrontendOut).Observe(*out / 1000.0);
  }
}

}  // namespace cleave::frontend
