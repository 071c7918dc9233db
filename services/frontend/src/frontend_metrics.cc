#include "cleave/frontend/frontend_metrics.h"

#include <atomic>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"

namespace cleave::frontend {
namespace {

// Routes as labels: the fixed paths the server answers, everything else "other".
const std::vector<std::string>& Endpoints() {
  static const std::vector<std::string> kEndpoints = {
      "/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
      "/health",         "/ready",               "/metrics",   "/debug/kv"};
  return kEndpoints;
}
const std::vector<std::string>& HttpCodes() {
  static const std::vector<std::string> kCodes = {"200", "400", "401", "404", "405", "413",
                                                  "429", "431", "500", "503"};
  return kCodes;
}
const std::vector<std::string>& GrpcMethods() {
  static const std::vector<std::string> kMethods = {"Generate", "Tokenize", "Detokenize", "ListModels"};
  return kMethods;
}
// grpc::StatusCode names, by value (0..16).
constexpr const char* kGrpcCodes[] = {
    "OK",        "CANCELLED",          "UNKNOWN",           "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
    "NOT_FOUND", "ALREADY_EXISTS",     "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION", "ABORTED",  "OUT_OF_RANGE",      "UNIMPLEMENTED",    "INTERNAL",
    "UNAVAILABLE", "DATA_LOSS",        "UNAUTHENTICATED"};

}  // namespace

absl::StatusOr<std::unique_ptr<FrontendMetrics>> FrontendMetrics::Create() {
  auto m = std::unique_ptr<FrontendMetrics>(new FrontendMetrics());
  CLEAVE_RETURN_IF_ERROR(m->Init());
  return m;
}

absl::Status FrontendMetrics::Init() {
  metrics::Registry& r = registry_;
  http_cache_ = std::vector<std::atomic<metrics::Counter*>>((Endpoints().size() + 1) * (HttpCodes().size() + 1));
  grpc_cache_ = std::vector<std::atomic<metrics::Counter*>>((GrpcMethods().size() + 1) * (std::size(kGrpcCodes) + 1));
  CLEAVE_ASSIGN_OR_RETURN(http_, r.AddCounterFamily("cleave_frontend_http_requests_total",
                                                    "HTTP requests answered, by endpoint and status code.",
                                                    {"endpoint", "code"}));
  // The common series exist from the start, so rates and dashboards see zeros, not gaps.
  for (const char* e : {"/v1/completions", "/v1/chat/completions"}) {
    for (const char* code : {"200", "400", "429", "503"}) {
      CLEAVE_RETURN_IF_ERROR(http_->WithLabels({e, code}).status());
    }
  }
  CLEAVE_ASSIGN_OR_RETURN(grpc_, r.AddCounterFamily("cleave_frontend_grpc_requests_total",
                                                    "gRPC calls finished, by method and status code.",
                                                    {"method", "code"}));
  CLEAVE_RETURN_IF_ERROR(grpc_->WithLabels({"Generate", "OK"}).status());
  CLEAVE_ASSIGN_OR_RETURN(metrics::CounterFamily* ended,
                          r.AddCounterFamily("cleave_frontend_requests_finished_total",
                                             "Generations ended (one per choice), by reason.",
                                             {"reason"}));
  const char* reasons[] = {"stop", "length", "error", "cancelled"};
  for (int i = 0; i < 4; ++i) {
    CLEAVE_ASSIGN_OR_RETURN(ended_[i], ended->WithLabels({reasons[i]}));
  }
  CLEAVE_ASSIGN_OR_RETURN(in_flight_, r.AddGauge("cleave_frontend_requests_in_flight",
                                                 "Generations (choices) submitted and not yet ended."));
  const std::vector<double>& latency = metrics::LatencyBucketsSeconds();
  CLEAVE_ASSIGN_OR_RETURN(ttft_, r.AddHistogram("cleave_frontend_time_to_first_token_seconds",
                                                "From submission to the first generated token.", latency));
  // Decode steps take 0.1 ms (tiny models on a CPU) to hundreds of ms (large batches).
  const std::vector<double> itl_buckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                           0.025,  0.05,    0.1,    0.25,  0.5,    1,     2.5};
  CLEAVE_ASSIGN_OR_RETURN(itl_, r.AddHistogram("cleave_frontend_inter_token_latency_seconds",
                                               "Between consecutive generated tokens of a generation "
                                               "(tokens arriving together share the gap).",
                                               itl_buckets));
  CLEAVE_ASSIGN_OR_RETURN(e2e_, r.AddHistogram("cleave_frontend_e2e_request_latency_seconds",
                                               "From submission to the last token of a generation.", latency));
  CLEAVE_ASSIGN_OR_RETURN(prompt_tokens_, r.AddCounter("cleave_frontend_prompt_tokens_total",
                                                       "Prompt tokens of finished generations."));
  CLEAVE_ASSIGN_OR_RETURN(generation_tokens_, r.AddCounter("cleave_frontend_generation_tokens_total",
                                                           "Tokens generated by finished generations."));
  CLEAVE_ASSIGN_OR_RETURN(std::vector<double> token_buckets, metrics::ExponentialBuckets(1, 4, 10));
  CLEAVE_ASSIGN_OR_RETURN(max_tokens_, r.AddHistogram("cleave_frontend_request_max_tokens",
                                                      "max_tokens of each generation, as resolved.",
                                                      token_buckets));
  CLEAVE_ASSIGN_OR_RETURN(std::vector<double> n_buckets, metrics::ExponentialBuckets(1, 2, 9));
  CLEAVE_ASSIGN_OR_RETURN(n_, r.AddHistogram("cleave_frontend_request_n",
                                             "Choices (n) per HTTP completion request.", n_buckets));
  CLEAVE_ASSIGN_OR_RETURN(disconnects_, r.AddCounter("cleave_frontend_client_disconnects_total",
                                                     "Requests whose client went away (or cancelled "
                                                     "the gRPC call) before the end."));
  // The frontend's own share of a request's latency is tokenizing and handing over on the way in
  // and formatting and writing on the way out: tens of microseconds up to milliseconds for long
  // prompts.
  const std::vector<double> phase_buckets = {0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                                             0.0025,  0.005,    0.01,    0.025,  0.05,   0.1,    0.25,
                                             0.5,     1,        2.5};
  CLEAVE_ASSIGN_OR_RETURN(metrics::HistogramFamily * phases,
                          r.AddHistogramFamily("cleave_frontend_request_phase_seconds",
                                               "The frontend's parts of time to first token: frontend_in "
                                               "(request received -> submitted to the scheduler), "
                                               "frontend_out (first token back from the scheduler -> "
                                               "written to the client). First choice of each request.",
                                               {"phase"}, phase_buckets));
  CLEAVE_ASSIGN_OR_RETURN(phases_[static_cast<int>(RequestPhase::kFrontendIn)],
                          phases->WithLabels({"frontend_in"}));
  CLEAVE_ASSIGN_OR_RETURN(phases_[static_cast<int>(RequestPhase::kFrontendOut)],
                          phases->WithLabels({"frontend_out"}));
  CLEAVE_ASSIGN_OR_RETURN(draining_, r.AddGauge("cleave_frontend_draining",
                                                "1 while the frontend drains for shutdown (new "
                                                "generations refused, those in flight finishing), else 0."));
  return absl::OkStatus();
}

namespace {

// Index of `value` in `allowed`, or allowed.size() for "other".
size_t IndexOf(std::string_view value, const std::vector<std::string>& allowed) {
  for (size_t i = 0; i < allowed.size(); ++i) {
    if (allowed[i] == value) return i;
  }
  return allowed.size();
}

// The label value at `index` of `allowed`, or "other" past its end.
std::string_view LabelAt(size_t index, const std::vector<std::string>& allowed) {
  return index < allowed.size() ? std::string_view(allowed[index]) : metrics::kOtherLabelValue;
}

// The series for cell `index` of a fixed label grid: created under the family's mutex the first
// time, then read from an atomic cache, so a request pays one acquire load and one atomic add.
template <typename Labels>
metrics::Counter* GridCounter(std::vector<std::atomic<metrics::Counter*>>& cache, size_t index,
                              metrics::CounterFamily& family, Labels labels) {
  metrics::Counter* c = cache[index].load(std::memory_order_acquire);
  if (c != nullptr) return c;
  const auto [a, b] = labels();
  absl::StatusOr<metrics::Counter*> made = family.WithLabels({a, b});
  if (!made.ok()) return nullptr;
  cache[index].store(*made, std::memory_order_release);
  return *made;
}

}  // namespace

void FrontendMetrics::CountHttp(std::string_view path, int status) {
  const size_t e = IndexOf(path, Endpoints()), k = IndexOf(std::to_string(status), HttpCodes());
  metrics::Counter* c = GridCounter(http_cache_, e * (HttpCodes().size() + 1) + k, *http_, [&] {
    return std::pair(LabelAt(e, Endpoints()), LabelAt(k, HttpCodes()));
  });
  if (c != nullptr) c->Inc();
}

void FrontendMetrics::CountGrpc(std::string_view method, int grpc_code) {
  constexpr size_t kNumCodes = std::size(kGrpcCodes);
  const bool known = grpc_code >= 0 && static_cast<size_t>(grpc_code) < kNumCodes;
  const size_t m = IndexOf(method, GrpcMethods());
  const size_t k = known ? static_cast<size_t>(grpc_code) : kNumCodes;
  metrics::Counter* c = GridCounter(grpc_cache_, m * (kNumCodes + 1) + k, *grpc_, [&] {
    return std::pair(LabelAt(m, GrpcMethods()),
                     known ? std::string_view(kGrpcCodes[k]) : metrics::kOtherLabelValue);
  });
  if (c != nullptr) c->Inc();
}

}  // namespace cleave::frontend
