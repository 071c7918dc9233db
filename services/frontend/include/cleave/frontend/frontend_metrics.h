// The frontend's Prometheus metrics (GET /metrics), named and documented in docs/metrics.md.
// Every series is created here, up front, so request paths only touch atomics; label values come
// from fixed sets (an unknown route or status is "other"), never from what a client sends.
#pragma once

#include <array>
#include <atomic>
#include <vector>
#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "cleave/common/metrics.h"

namespace cleave::frontend {

// Why a generation ended, as counted by cleave_frontend_requests_finished_total.
enum class EndReason { kStop, kLength, kError, kCancelled };
// The frontend's own parts of a request's time to first token
// (cleave_frontend_request_phase_seconds{phase}; see request_log.h for where each starts and ends).
enum class RequestPhase { kFrontendIn, kFrontendOut };

class FrontendMetrics {
 public:
  static absl::StatusOr<std::unique_ptr<FrontendMetrics>> Create();

  std::string Render() const { return registry_.Render(); }
  // For a second listener serving the same series (the frontend's admin port).
  const metrics::Registry& registry() const { return registry_; }

  // One HTTP response: `path` is mapped to a bounded endpoint label, `status` to its code.
  void CountHttp(std::string_view path, int status);
  // One gRPC call of `method` ("Generate", "Tokenize", ...) ending with a grpc::StatusCode.
  void CountGrpc(std::string_view method, int grpc_code);
  void CountEnd(EndReason reason) { ended_[static_cast<int>(reason)]->Inc(); }

  metrics::Gauge& in_flight() { return *in_flight_; }
  metrics::Histogram& time_to_first_token() { return *ttft_; }
  metrics::Histogram& inter_token_latency() { return *itl_; }
  metrics::Histogram& e2e_latency() { return *e2e_; }
  metrics::Counter& prompt_tokens() { return *prompt_tokens_; }
  metrics::Counter& generation_tokens() { return *generation_tokens_; }
  metrics::Histogram& max_tokens_param() { return *max_tokens_; }
  metrics::Histogram& n_param() { return *n_; }
  metrics::Counter& client_disconnects() { return *disconnects_; }
  metrics::Histogram& request_phase(RequestPhase phase) { return *phases_[static_cast<int>(phase)]; }
  // 1 from SIGTERM until the process exits (new generations refused, in-flight ones finishing).
  metrics::Gauge& draining() { return *draining_; }

 private:
  FrontendMetrics() = default;
  absl::Status Init();

  metrics::Registry registry_;
  metrics::CounterFamily* http_ = nullptr;
  metrics::CounterFamily* grpc_ = nullptr;
  // Series of the (endpoint, code) and (method, code) grids, filled on first use.
  std::vector<std::atomic<metrics::Counter*>> http_cache_, grpc_cache_;
  std::array<metrics::Counter*, 4> ended_{};
  metrics::Gauge* in_flight_ = nullptr;
  metrics::Histogram* ttft_ = nullptr;
  metrics::Histogram* itl_ = nullptr;
  metrics::Histogram* e2e_ = nullptr;
  metrics::Counter* prompt_tokens_ = nullptr;
  metrics::Counter* generation_tokens_ = nullptr;
  metrics::Histogram* max_tokens_ = nullptr;
  metrics::Histogram* n_ = nullptr;
  metrics::Counter* disconnects_ = nullptr;
  std::array<metrics::Histogram*, 2> phases_{};
  metrics::Gauge* draining_ = nullptr;
};

}  // namespace cleave::frontend
