#include "cleave/common/metrics.h"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"

namespace cleave::metrics {
namespace {

template <typename T>
T Unwrap(absl::StatusOr<T> v) {
  EXPECT_TRUE(v.ok()) << v.status();
  return v.ok() ? *v : T{};
}

// The value on the line starting with `prefix` ("name{labels} "), or NaN when absent.
double SampleValue(const std::string& text, const std::string& prefix) {
  const std::string padded = "\n" + text;
  const size_t pos = padded.find("\n" + prefix);
  if (pos == std::string::npos) return std::numeric_limits<double>::quiet_NaN();
  return std::strtod(padded.c_str() + pos + 1 + prefix.size(), nullptr);
}

TEST(MetricsTest, RendersExactExposition) {
  Registry r;
  CounterFamily* finished = Unwrap(
      r.AddCounterFamily("cleave_requests_total", "Requests finished.", {"role", "outcome"}));
  Counter* ok = Unwrap(finished->WithLabels({"prefill", "ok"}));
  ok->Inc();
  ok->Inc(2);
  Unwrap(finished->WithLabels({"decode", "error"}))->Inc(0.5);
  Gauge* running = Unwrap(r.AddGauge("cleave_running_requests", "Requests running now."));
  running->Set(3);
  running->Add(1.5);
  running->Sub(0.5);
  double free_blocks = 1024;
  ASSERT_TRUE(
      r.AddGaugeCallback("cleave_kv_free_blocks", "Free KV cache blocks.", {{"tier", "gpu"}}, [&] {
         return free_blocks;
       }).ok());
  // Registered but never given a series: renders nothing.
  ASSERT_TRUE(r.AddGaugeFamily("cleave_unused", "No series yet.", {"x"}).ok());
  HistogramFamily* ttft = Unwrap(r.AddHistogramFamily("cleave_ttft_seconds", "Time to first token.",
                                                      {"role"}, {0.25, 0.5, 1}));
  Histogram* h = Unwrap(ttft->WithLabels({"prefill"}));
  // 0.25, 0.5 and 1 sit exactly on bounds and count in that bucket (le means v <= bound).
  for (double v : {0.125, 0.25, 0.375, 0.5, 1.0, 2.5}) h->Observe(v);

  const std::string want_tail =
      "# HELP cleave_ttft_seconds Time to first token.\n"
      "# TYPE cleave_ttft_seconds histogram\n"
      "cleave_ttft_seconds_bucket{role=\"prefill\",le=\"0.25\"} 2\n"
      "cleave_ttft_seconds_bucket{role=\"prefill\",le=\"0.5\"} 4\n"
      "cleave_ttft_seconds_bucket{role=\"prefill\",le=\"1\"} 5\n"
      "cleave_ttft_seconds_bucket{role=\"prefill\",le=\"+Inf\"} 6\n"
      "cleave_ttft_seconds_sum{role=\"prefill\"} 4.75\n"
      "cleave_ttft_seconds_count{role=\"prefill\"} 6\n";
  const std::string want_head =
      "# HELP cleave_requests_total Requests finished.\n"
      "# TYPE cleave_requests_total counter\n"
      "cleave_requests_total{role=\"prefill\",outcome=\"ok\"} 3\n"
      "cleave_requests_total{role=\"decode\",outcome=\"error\"} 0.5\n"
      "# HELP cleave_running_requests Requests running now.\n"
      "# TYPE cleave_running_requests gauge\n"
      "cleave_running_requests 4\n"
      "# HELP cleave_kv_free_blocks Free KV cache blocks.\n"
      "# TYPE cleave_kv_free_blocks gauge\n";
  EXPECT_EQ(r.Render(), want_head + "cleave_kv_free_blocks{tier=\"gpu\"} 1024\n" + want_tail);
  free_blocks = 7;  // callbacks are read at scrape time
  EXPECT_EQ(r.Render(), want_head + "cleave_kv_free_blocks{tier=\"gpu\"} 7\n" + want_tail);
  EXPECT_EQ(kContentType, "text/plain; version=0.0.4; charset=utf-8");
}

TEST(MetricsTest, UnlabelledHistogramAndFreshSeriesRenderZero) {
  Registry r;
  ASSERT_TRUE(r.AddCounter("a_total", "A.").ok());
  ASSERT_TRUE(r.AddHistogram("b_seconds", "B.", {1}).ok());
  EXPECT_EQ(r.Render(),
            "# HELP a_total A.\n# TYPE a_total counter\na_total 0\n"
            "# HELP b_seconds B.\n# TYPE b_seconds histogram\n"
            "b_seconds_bucket{le=\"1\"} 0\nb_seconds_bucket{le=\"+Inf\"} 0\n"
            "b_seconds_sum 0\nb_seconds_count 0\n");
}

TEST(MetricsTest, EscapesHelpAndLabelValues) {
  Registry r;
  GaugeFamily* g = Unwrap(r.AddGaugeFamily("g", "Line one\nback\\slash \"quoted\"", {"v"}));
  Unwrap(g->WithLabels({"a\"b\\c\nd"}))->Set(1);
  EXPECT_EQ(r.Render(),
            "# HELP g Line one\\nback\\\\slash \"quoted\"\n"
            "# TYPE g gauge\n"
            "g{v=\"a\\\"b\\\\c\\nd\"} 1\n");
}

TEST(MetricsTest, FormatsNumbersForPrometheus) {
  Registry r;
  GaugeFamily* g = Unwrap(r.AddGaugeFamily("g", "G.", {"k"}));
  const std::vector<std::pair<std::string, double>> cases = {
      {"int", 42},
      {"neg", -2},
      {"big_exact", 1e15},
      {"huge", 1e20},
      {"frac", 0.1},
      {"tiny", 1.5e-7},
      {"nan", std::numeric_limits<double>::quiet_NaN()},
      {"pinf", std::numeric_limits<double>::infinity()},
      {"ninf", -std::numeric_limits<double>::infinity()},
  };
  for (const auto& [k, v] : cases) Unwrap(g->WithLabels({k}))->Set(v);
  Counter* c = Unwrap(r.AddCounter("c_total", "C."));
  c->Inc(uint64_t{1} << 60);
  c->Inc();  // 2^60 + 1 is not a double; integer totals still print exactly
  EXPECT_EQ(r.Render(),
            "# HELP g G.\n# TYPE g gauge\n"
            "g{k=\"int\"} 42\ng{k=\"neg\"} -2\ng{k=\"big_exact\"} 1000000000000000\n"
            "g{k=\"huge\"} 1e+20\ng{k=\"frac\"} 0.1\ng{k=\"tiny\"} 1.5e-07\n"
            "g{k=\"nan\"} NaN\ng{k=\"pinf\"} +Inf\ng{k=\"ninf\"} -Inf\n"
            "# HELP c_total C.\n# TYPE c_total counter\nc_total 1152921504606846977\n");
}

TEST(MetricsTest, CounterIgnoresNegativeAndNonFiniteIncrements) {
  Registry r;
  Counter* c = Unwrap(r.AddCounter("c_total", "C."));
  c->Inc(3);
  c->Inc(-1);
  c->Inc(-0.5);
  c->Inc(std::numeric_limits<double>::quiet_NaN());
  c->Inc(std::numeric_limits<double>::infinity());
  c->Inc(0.25);
  EXPECT_EQ(c->Value(), 3.25);
}

TEST(MetricsTest, HistogramEdgeObservations) {
  Registry r;
  Histogram* h = Unwrap(r.AddHistogram("h", "H.", {0, 1}));
  h->Observe(-std::numeric_limits<double>::infinity());  // first bucket
  h->Observe(0);                                         // on the first bound
  h->Observe(std::nextafter(1.0, 2.0));                  // just above the last bound: +Inf
  h->Observe(std::numeric_limits<double>::quiet_NaN());  // ignored
  EXPECT_EQ(h->BucketCounts(), (std::vector<uint64_t>{2, 0, 1}));
  EXPECT_EQ(h->Count(), 3u);
}

TEST(MetricsTest, ChildrenAreStableAndInCreationOrder) {
  Registry r;
  CounterFamily* f = Unwrap(r.AddCounterFamily("f_total", "F.", {"k"}));
  Counter* first = Unwrap(f->WithLabels({"z"}));
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(f->WithLabels({std::to_string(i)}).ok());
  EXPECT_EQ(Unwrap(f->WithLabels({"z"})), first);
  EXPECT_EQ(Unwrap(f->WithLabels(std::vector<std::string>{"z"})), first);
  first->Inc();
  const std::string text = r.Render();
  EXPECT_LT(text.find("f_total{k=\"z\"} 1\n"), text.find("f_total{k=\"0\"} 0\n"));
  EXPECT_LT(text.find("f_total{k=\"0\"} 0\n"), text.find("f_total{k=\"999\"} 0\n"));
}

TEST(MetricsTest, LabelValueMapsUnknownToOther) {
  EXPECT_EQ(LabelValue("stop", {"stop", "length"}), "stop");
  EXPECT_EQ(LabelValue("length", {"stop", "length"}), "length");
  EXPECT_EQ(LabelValue("<script>", {"stop", "length"}), "other");
  EXPECT_EQ(LabelValue("", {"stop", "length"}), kOtherLabelValue);
  EXPECT_EQ(LabelValue("Stop", {"stop"}), "other");  // exact match only
  const std::vector<std::string> models = {"llama-3-8b"};
  std::string client = "llama-3-8b";
  std::string_view v = LabelValue(client, models);
  EXPECT_EQ(v, "llama-3-8b");
  EXPECT_EQ(v.data(), models[0].data());  // views the allowed set, never the client's bytes
  EXPECT_EQ(LabelValue("gpt-9", models), "other");
}

void ExpectInvalid(const absl::Status& s, const std::string& what) {
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << what << ": " << s;
}

TEST(MetricsTest, RejectsBadNames) {
  Registry r;
  for (const char* bad : {"", "1abc", "a-b", "a b", "é", "a.b"}) {
    ExpectInvalid(r.AddGauge(bad, "H.").status(), bad);
  }
  EXPECT_TRUE(r.AddGauge("a:b_c9", "Colons are legal.").ok());
  EXPECT_TRUE(r.AddGauge("_x", "Leading underscore is legal.").ok());
  for (const char* bad : {"", "1a", "a:b", "a-b", "__reserved", "le", "quantile"}) {
    ExpectInvalid(r.AddGaugeFamily("g1", "H.", {bad}).status(), bad);
    ExpectInvalid(r.AddCounterFamily("c1_total", "H.", {bad}).status(), bad);
    ExpectInvalid(r.AddHistogramFamily("h1", "H.", {bad}, {1}).status(), bad);
  }
  EXPECT_TRUE(r.AddGaugeFamily("g2", "H.", {"_ok", "a1"}).ok());
  ExpectInvalid(r.AddGaugeFamily("g3", "H.", {"a", "a"}).status(), "duplicate label");
  ExpectInvalid(r.AddCounter("requests", "H.").status(), "counter without _total");
  for (const char* bad : {"x_bucket", "x_sum", "x_count"}) {
    ExpectInvalid(r.AddGauge(bad, "H.").status(), bad);
  }
  ExpectInvalid(r.AddGauge("g4", "").status(), "empty help");
}

TEST(MetricsTest, RejectsDuplicatesAndArityMismatch) {
  Registry r;
  ASSERT_TRUE(r.AddCounter("x_total", "X.").ok());
  EXPECT_EQ(r.AddCounter("x_total", "X.").status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(r.AddGauge("x_total", "X.").status().code(), absl::StatusCode::kAlreadyExists);

  GaugeFamily* g = Unwrap(r.AddGaugeFamily("g", "G.", {"a", "b"}));
  ExpectInvalid(g->WithLabels({"only_one"}).status(), "too few");
  ExpectInvalid(g->WithLabels({"1", "2", "3"}).status(), "too many");
  ExpectInvalid(g->AddCallback({"1"}, [] { return 0.0; }), "callback arity");
  ExpectInvalid(g->AddCallback({"1", "2"}, nullptr), "null callback");
  ExpectInvalid(r.AddGaugeCallback("g_cb", "G.", {}, nullptr), "null callback");
  ASSERT_TRUE(g->AddCallback({"1", "2"}, [] { return 0.0; }).ok());
  EXPECT_EQ(g->AddCallback({"1", "2"}, [] { return 0.0; }).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(g->WithLabels({"1", "2"}).status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(g->WithLabels({"3", "4"}).ok());
  EXPECT_EQ(g->AddCallback({"3", "4"}, [] { return 0.0; }).code(),
            absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(r.AddGaugeCallback("g", "G.", {}, [] { return 0.0; }).code(),
            absl::StatusCode::kAlreadyExists);
}

TEST(MetricsTest, RejectsBadBuckets) {
  Registry r;
  const double inf = std::numeric_limits<double>::infinity();
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const std::vector<std::vector<double>> bad = {{1, 1},   {2, 1},    {0, 1, 0.5},
                                                {1, inf}, {-inf, 0}, {nan}};
  for (size_t i = 0; i < bad.size(); ++i) {
    ExpectInvalid(r.AddHistogram(absl::StrCat("h", i), "H.", bad[i]).status(),
                  absl::StrCat("buckets #", i));
  }
  EXPECT_TRUE(r.AddHistogram("only_inf", "Only the +Inf bucket.", {}).ok());
  EXPECT_TRUE(r.AddHistogram("negative_ok", "H.", {-1, 0, 1}).ok());
}

TEST(MetricsTest, BucketHelpers) {
  EXPECT_EQ(Unwrap(ExponentialBuckets(1, 2, 4)), (std::vector<double>{1, 2, 4, 8}));
  EXPECT_EQ(Unwrap(LinearBuckets(0, 5, 3)), (std::vector<double>{0, 5, 10}));
  ExpectInvalid(ExponentialBuckets(0, 2, 4).status(), "start 0");
  ExpectInvalid(ExponentialBuckets(1, 1, 4).status(), "factor 1");
  ExpectInvalid(ExponentialBuckets(1, 2, 0).status(), "count 0");
  ExpectInvalid(ExponentialBuckets(1e300, 1e10, 3).status(), "overflow");
  ExpectInvalid(LinearBuckets(0, 0, 3).status(), "width 0");
  ExpectInvalid(LinearBuckets(0, 1, 0).status(), "count 0");
  ExpectInvalid(LinearBuckets(1e20, 1, 3).status(), "step below precision");
  const std::vector<double>& lat = LatencyBucketsSeconds();
  ASSERT_EQ(lat.size(), 15u);
  EXPECT_EQ(lat.front(), 0.001);
  EXPECT_EQ(lat.back(), 60);
  Registry r;
  EXPECT_TRUE(r.AddHistogram("latency_seconds", "L.", lat).ok());
}

TEST(MetricsTest, ConcurrentRecordingGivesExactTotals) {
  Registry r;
  Counter* c = Unwrap(r.AddCounter("c_total", "C."));
  Counter* real = Unwrap(r.AddCounter("real_total", "Fractional increments."));
  Gauge* g = Unwrap(r.AddGauge("g", "G."));
  Histogram* h = Unwrap(r.AddHistogram("h_seconds", "H.", {0.5, 2}));
  constexpr int kThreads = 4, kPerThread = 100000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kPerThread; ++i) {
        c->Inc();
        real->Inc(0.5);
        g->Add(1);
        h->Observe(i % 2 == 0 ? 0.25 : 1.0);  // exact in binary, so the sum is exact too
      }
    });
  }
  for (auto& t : threads) t.join();
  constexpr uint64_t kTotal = uint64_t{kThreads} * kPerThread;
  EXPECT_EQ(c->Value(), kTotal);
  EXPECT_EQ(real->Value(), kTotal * 0.5);
  EXPECT_EQ(g->Value(), kTotal);
  EXPECT_EQ(h->Count(), kTotal);
  EXPECT_EQ(h->BucketCounts(), (std::vector<uint64_t>{kTotal / 2, kTotal / 2, 0}));
  EXPECT_EQ(h->Sum(), kTotal / 2 * 0.25 + kTotal / 2 * 1.0);
  const std::string text = r.Render();
  EXPECT_NE(text.find("c_total 400000\n"), std::string::npos) << text;
  EXPECT_NE(text.find("h_seconds_count 400000\n"), std::string::npos) << text;
}

TEST(MetricsTest, RendersWhileRecordingAndRegistering) {
  Registry r;
  CounterFamily* f = Unwrap(r.AddCounterFamily("c_total", "C.", {"k"}));
  Counter* c = Unwrap(f->WithLabels({"hot"}));
  Histogram* h = Unwrap(r.AddHistogram("h_seconds", "H.", LatencyBucketsSeconds()));
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; !stop.load(std::memory_order_relaxed); ++i) {
        c->Inc();
        h->Observe(0.001 * (i % 100000) + t);
      }
    });
  }
  std::atomic<bool> registered{false};
  threads.emplace_back([&] {  // setup-time paths racing the scrapes
    for (int i = 0; i < 2000; ++i) {
      EXPECT_TRUE(f->WithLabels({absl::StrCat("k", i)}).ok());
      EXPECT_TRUE(r.AddGauge(absl::StrCat("late_", i), "Registered mid-scrape.").ok());
    }
    registered = true;
  });
  double last = 0;
  int renders = 0;
  bool consistent = true;
  for (; consistent && (renders < 200 || !registered); ++renders) {
    const std::string text = r.Render();
    const double now = SampleValue(text, "c_total{k=\"hot\"} ");
    // A counter never goes backwards between scrapes; _count comes from the same bucket snapshot
    // as the buckets, so it always equals the +Inf bucket.
    const double count = SampleValue(text, "h_seconds_count ");
    const double inf_bucket = SampleValue(text, "h_seconds_bucket{le=\"+Inf\"} ");
    consistent = now >= last && count == inf_bucket;
    EXPECT_TRUE(consistent) << "render " << renders << ": hot " << now << " after " << last
                            << ", _count " << count << " vs +Inf bucket " << inf_bucket;
    last = now;
  }
  stop = true;
  for (auto& t : threads) t.join();
  std::printf("%d renders raced recording and registration; hot counter reached %.0f\n", renders,
              last);
  EXPECT_NE(r.Render().find("late_1999 0\n"), std::string::npos);
}

TEST(MetricsTest, CollectedFamilyRendersWhatItsCollectorReturnsNow) {
  Registry r;
  std::vector<Sample> current = {{{"decode-0", "decode"}, 3}, {{"prefill-0", "prefill"}, 1}};
  ASSERT_TRUE(r.AddCollectedFamily("cleave_worker_requests", "Requests per worker.", MetricType::kGauge,
                                   {"worker", "role"}, [&current] { return current; })
                  .ok());
  EXPECT_EQ(r.Render(),
            "# HELP cleave_worker_requests Requests per worker.\n"
            "# TYPE cleave_worker_requests gauge\n"
            "cleave_worker_requests{worker=\"decode-0\",role=\"decode\"} 3\n"
            "cleave_worker_requests{worker=\"prefill-0\",role=\"prefill\"} 1\n");
  // A worker leaves: its series goes; a bad sample (arity) and a repeated tuple are dropped.
  current = {{{"decode-0", "decode"}, 4}, {{"only-one"}, 9}, {{"decode-0", "decode"}, 5}};
  EXPECT_EQ(r.Render(),
            "# HELP cleave_worker_requests Requests per worker.\n"
            "# TYPE cleave_worker_requests gauge\n"
            "cleave_worker_requests{worker=\"decode-0\",role=\"decode\"} 4\n");
  current.clear();
  EXPECT_EQ(r.Render(), "");  // no series: no HELP/TYPE either
  EXPECT_EQ(r.AddCollectedFamily("cleave_h", "h", MetricType::kHistogram, {}, [] { return std::vector<Sample>(); })
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r.AddCollectedFamily("cleave_c", "c", MetricType::kCounter, {}, [] { return std::vector<Sample>(); })
                .code(),
            absl::StatusCode::kInvalidArgument);  // a counter's name must end in _total
  EXPECT_EQ(r.AddCollectedFamily("cleave_worker_requests", "again", MetricType::kGauge, {},
                                 [] { return std::vector<Sample>(); })
                .code(),
            absl::StatusCode::kAlreadyExists);
}

// Runs `command`, returning its exit code and combined stdout/stderr.
std::pair<int, std::string> RunShell(const std::string& command) {
  std::string output;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return {-1, "popen failed"};
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), pipe)) > 0;) output.append(buf, n);
  const int status = ::pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

TEST(MetricsTest, PromtoolAcceptsEveryTypeWithoutLintComplaints) {
  const auto [found, where] = RunShell("command -v promtool");
  ASSERT_EQ(found, 0) << "promtool not found: run scripts/install-deps.sh (Debian package "
                         "'prometheus' provides /usr/bin/promtool)";
  Registry r;
  CounterFamily* tokens = Unwrap(r.AddCounterFamily("cleave_generated_tokens_total",
                                                    "Tokens generated, by role and finish reason.",
                                                    {"role", "finish_reason"}));
  Unwrap(tokens->WithLabels({"decode", std::string(LabelValue("stop", {"stop", "length"}))}))
      ->Inc(7);
  Unwrap(tokens->WithLabels({"decode", std::string(LabelValue("evil\"\\\n", {"stop"}))}))->Inc();
  Unwrap(r.AddCounter("cleave_busy_seconds_total", "Busy time.\nSecond line \\ here."))->Inc(0.125);
  GaugeFamily* temps = Unwrap(r.AddGaugeFamily("cleave_odd_values", "Odd gauge values.", {"case"}));
  Unwrap(temps->WithLabels({"nan"}))->Set(std::numeric_limits<double>::quiet_NaN());
  Unwrap(temps->WithLabels({"inf"}))->Set(std::numeric_limits<double>::infinity());
  Unwrap(temps->WithLabels({"quote\"d \\ \n"}))->Set(-1e-9);
  ASSERT_TRUE(
      r.AddGaugeCallback("cleave_kv_free_blocks", "Free KV cache blocks.", {{"tier", "gpu"}}, [] {
         return 4096.0;
       }).ok());
  HistogramFamily* ttft =
      Unwrap(r.AddHistogramFamily("cleave_time_to_first_token_seconds", "Time to first token.",
                                  {"role"}, LatencyBucketsSeconds()));
  Histogram* h = Unwrap(ttft->WithLabels({"prefill"}));
  for (double v : {0.0005, 0.001, 0.3, 2.5, 120.0}) h->Observe(v);
  Unwrap(r.AddHistogram("cleave_batch_tokens", "Tokens per batch.",
                        Unwrap(ExponentialBuckets(1, 2, 12))))
      ->Observe(300);
  ASSERT_TRUE(r.AddCollectedFamily("cleave_worker_preemptions_total", "Preemptions per worker.",
                                   MetricType::kCounter, {"worker"},
                                   [] { return std::vector<Sample>{{{"decode-0"}, 2}}; })
                  .ok());

  const std::string path = (std::filesystem::temp_directory_path() /
                            ("cleave_metrics_" + std::to_string(::getpid()) + ".prom"))
                               .string();
  std::ofstream(path) << r.Render();
  const auto [rc, output] = RunShell("promtool check metrics < '" + path + "'");
  std::filesystem::remove(path);
  EXPECT_EQ(rc, 0) << output << "\n--- input ---\n" << r.Render();
  EXPECT_EQ(output, "") << "promtool complained:\n" << output;
}

}  // namespace
}  // namespace cleave::metrics
