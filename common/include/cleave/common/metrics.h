// Prometheus metrics: counters, gauges (including callback gauges read at scrape time) and
// histograms, grouped into families with a fixed label schema and rendered in the Prometheus text
// exposition format 0.0.4. prometheus-cpp is not packaged for Debian 12, hence this small registry.
//
// Setup code registers families and takes a child pointer for every label tuple a hot path will
// record to; recording is then one relaxed atomic operation (a CAS loop for doubles) with no
// lookup and no lock:
//
//   CLEAVE_ASSIGN_OR_RETURN(CounterFamily* finished, registry.AddCounterFamily(
//       "cleave_requests_finished_total", "Requests finished, by outcome.", {"outcome"}));
//   CLEAVE_ASSIGN_OR_RETURN(Counter* ok, finished->WithLabels({"ok"}));
//   ok->Inc();                                 // hot path
//   body = registry.Render();                  // /metrics handler, served as kContentType
//
// Ownership: a Registry owns its families, a family owns its children (series); every pointer
// handed out stays valid until the Registry is destroyed. Nothing is ever removed.
// Threads: recording (Inc/Set/Add/Sub/Observe) is lock-free and safe from any thread.
// Registration, WithLabels/AddCallback and Render take short mutexes, are safe from any thread and
// may run concurrently with recording and with each other; they belong in setup code or the
// scrape handler, not in per-token paths.
// Label values: anything derived from client input must go through LabelValue() (or a switch) so
// the number of series stays bounded.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cleave::metrics {

// Content-Type header value for Registry::Render()'s output.
inline constexpr std::string_view kContentType = "text/plain; version=0.0.4; charset=utf-8";

// What LabelValue() substitutes for a value outside its allowed set.
inline constexpr std::string_view kOtherLabelValue = "other";

// Every series is aligned to its own cache line, so threads recording to different series never
// false-share. Series recorded from several threads at once still share (true sharing).
inline constexpr size_t kCacheLineSize = 64;

enum class MetricType { kCounter, kGauge, kHistogram };

class Registry;

namespace internal {
class FamilyBase;

// Relaxed atomic add for doubles: a CAS loop (x86 has no floating-point fetch-add).
inline void AtomicAdd(std::atomic<double>& a, double v) {
  double cur = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(cur, cur + v, std::memory_order_relaxed)) {
  }
}
}  // namespace internal

// A monotonic total. Integer increments are one relaxed fetch_add on a uint64 (exact past 2^53);
// fractional ones (e.g. seconds of busy time) go to a separate double through a CAS loop.
// Negative, NaN and infinite increments are ignored: a counter never goes down, and recording
// never fails or crashes.
class alignas(kCacheLineSize) Counter {
 public:
  void Inc() { whole_.fetch_add(1, std::memory_order_relaxed); }
  template <std::integral I>
  void Inc(I n) {
    if (n > 0) whole_.fetch_add(static_cast<uint64_t>(n), std::memory_order_relaxed);
  }
  void Inc(bool) = delete;
  void Inc(double v) {
    if (v > 0 && std::isfinite(v)) internal::AtomicAdd(real_, v);
  }

  double Value() const;

 private:
  friend class internal::FamilyBase;
  Counter() = default;

  std::atomic<uint64_t> whole_{0};
  std::atomic<double> real_{0.0};
};

// A value that goes up and down. Set is a relaxed store; Add/Sub/Inc/Dec a CAS loop.
class alignas(kCacheLineSize) Gauge {
 public:
  void Set(double v) { value_.store(v, std::memory_order_relaxed); }
  void Add(double v) { internal::AtomicAdd(value_, v); }
  void Sub(double v) { Add(-v); }
  void Inc() { Add(1.0); }
  void Dec() { Add(-1.0); }

  double Value() const { return value_.load(std::memory_order_relaxed); }

 private:
  friend class internal::FamilyBase;
  Gauge() = default;

  std::atomic<double> value_{0.0};
};

// Distribution over fixed buckets (the family's upper bounds, plus the implicit +Inf bucket).
// Buckets count non-cumulatively here, one atomic each; Render() accumulates them, and derives
// _count from their total so _count always equals the +Inf bucket.
class alignas(kCacheLineSize) Histogram {
 public:
  // Counts `v` in the first bucket whose upper bound is >= v (Prometheus buckets are `le`; -Inf
  // lands in the first, +Inf in the +Inf bucket) and adds it to the sum. NaN is ignored: it would
  // make the sum NaN for the rest of the process's life.
  void Observe(double v) {
    if (std::isnan(v)) return;
    const auto i =
        static_cast<size_t>(std::lower_bound(bounds_, bounds_ + num_bounds_, v) - bounds_);
    blocks_[i / kPerBlock].counts[i % kPerBlock].fetch_add(1, std::memory_order_relaxed);
    internal::AtomicAdd(sum_, v);
  }

  // Non-cumulative count per bucket, in bound order; the last entry is the +Inf bucket.
  std::vector<uint64_t> BucketCounts() const;
  uint64_t Count() const;  // total of BucketCounts()
  double Sum() const { return sum_.load(std::memory_order_relaxed); }

 private:
  friend class internal::FamilyBase;
  static constexpr size_t kPerBlock = kCacheLineSize / sizeof(uint64_t);
  struct alignas(kCacheLineSize) Block {
    std::atomic<uint64_t> counts[kPerBlock] = {};
  };
  // `bounds` is the family's bucket list; the family outlives its children and never changes it.
  explicit Histogram(const std::vector<double>& bounds);

  const double* bounds_;
  size_t num_bounds_;
  std::unique_ptr<Block[]> blocks_;
  std::atomic<double> sum_{0.0};
};

namespace internal {

// One series: its label values and either a recorded metric or a scrape-time callback.
struct Child {
  std::vector<std::string> label_values;
  std::variant<std::unique_ptr<Counter>, std::unique_ptr<Gauge>, std::unique_ptr<Histogram>,
               std::function<double()>>
      metric;
};

// What every family shares; Family<T> adds the typed accessors.
class FamilyBase {
 public:
  virtual ~FamilyBase();
  FamilyBase(const FamilyBase&) = delete;
  FamilyBase& operator=(const FamilyBase&) = delete;

  const std::string& name() const { return name_; }
  const std::string& help() const { return help_; }
  MetricType type() const { return type_; }
  const std::vector<std::string>& label_names() const { return label_names_; }
  const std::vector<double>& buckets() const { return buckets_; }  // histograms only

 protected:
  FamilyBase(std::string name, std::string help, MetricType type,
             std::vector<std::string> label_names, std::vector<double> buckets);

  // Finds the child with these label values or creates a recorded one.
  absl::StatusOr<Child*> GetOrCreate(std::vector<std::string> values);
  absl::Status AddCallbackChild(std::vector<std::string> values, std::function<double()> fn);
  // Appends this family (HELP, TYPE, one block of lines per child in creation order). A family
  // with no children renders nothing. Calls gauge callbacks with no lock held.
  virtual void Render(std::string* out) const;
  void RenderHeader(std::string* out) const;  // the # HELP and # TYPE lines

 private:
  friend class cleave::metrics::Registry;

  absl::Status CheckArity(const std::vector<std::string>& values) const;
  void RenderChild(const Child& child, std::string* out) const;

  const std::string name_;
  const std::string help_;
  const MetricType type_;
  const std::vector<std::string> label_names_;
  const std::vector<double> buckets_;

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<Child>> children_;      // creation order; guarded by mu_
  std::map<std::vector<std::string>, Child*> index_;  // guarded by mu_
};

}  // namespace internal

// A family of series sharing name, help, type and label names. T is Counter, Gauge or Histogram.
template <typename T>
class Family final : public internal::FamilyBase {
 public:
  // Lookup-or-create of the child for `values` (one per label name, in registration order).
  // Mutex-protected: call at setup and keep the pointer. InvalidArgument on a count mismatch,
  // FailedPrecondition when the series is a callback gauge.
  [[nodiscard]] absl::StatusOr<T*> WithLabels(std::initializer_list<std::string_view> values) {
    return WithLabels(std::vector<std::string>(values.begin(), values.end()));
  }
  [[nodiscard]] absl::StatusOr<T*> WithLabels(std::vector<std::string> values) {
    absl::StatusOr<internal::Child*> child = GetOrCreate(std::move(values));
    if (!child.ok()) return child.status();
    auto* metric = std::get_if<std::unique_ptr<T>>(&(*child)->metric);
    if (metric == nullptr) {
      return absl::FailedPreconditionError("a series of " + name() + " is a callback gauge");
    }
    return metric->get();
  }

  // Adds a series whose value is `fn()` at each Render(). `fn` runs on the scraping thread with
  // no registry lock held; it must be thread-safe, must not throw, and whatever it reads must
  // outlive every Render() (stop the /metrics server before destroying it). AlreadyExists when
  // the series exists.
  [[nodiscard]] absl::Status AddCallback(std::vector<std::string> values,
                                         std::function<double()> fn) {
    static_assert(std::is_same_v<T, Gauge>, "only gauges have callback series");
    return AddCallbackChild(std::move(values), std::move(fn));
  }

 private:
  friend class Registry;
  Family(std::string name, std::string help, MetricType type, std::vector<std::string> label_names,
         std::vector<double> buckets)
      : FamilyBase(std::move(name), std::move(help), type, std::move(label_names),
                   std::move(buckets)) {}
};

using CounterFamily = Family<Counter>;
using GaugeFamily = Family<Gauge>;
using HistogramFamily = Family<Histogram>;

// One series of a collected family (Registry::AddCollectedFamily): label values in the family's
// label-name order, and the value.
struct Sample {
  std::vector<std::string> label_values;
  double value = 0;
};
using Collector = std::function<std::vector<Sample>()>;

// Ordered label name/value pairs, for AddGaugeCallback.
using LabelPairs = std::vector<std::pair<std::string, std::string>>;

// Owns families and renders them. Registration validates (InvalidArgument) and refuses a name
// already taken (AlreadyExists):
//   - metric names match [a-zA-Z_:][a-zA-Z0-9_:]* and do not end in _bucket, _sum or _count
//     (those suffixes belong to histogram series); counter names end in _total;
//   - label names match [a-zA-Z_][a-zA-Z0-9_]*, do not start with "__", are distinct, and are
//     not "le" or "quantile" (reserved for histogram and summary series);
//   - help text is non-empty (promtool flags a family without it);
//   - histogram bounds are finite and strictly increasing (+Inf is implicit; an empty list means
//     only the +Inf bucket).
// Families render in registration order. Thread-safety: see the file comment.
class Registry {
 public:
  Registry();
  ~Registry();
  Registry(const Registry&) = delete;
  Registry& operator=(const Registry&) = delete;

  [[nodiscard]] absl::StatusOr<CounterFamily*> AddCounterFamily(
      std::string_view name, std::string_view help, std::vector<std::string> label_names);
  [[nodiscard]] absl::StatusOr<GaugeFamily*> AddGaugeFamily(std::string_view name,
                                                            std::string_view help,
                                                            std::vector<std::string> label_names);
  [[nodiscard]] absl::StatusOr<HistogramFamily*> AddHistogramFamily(
      std::string_view name, std::string_view help, std::vector<std::string> label_names,
      std::vector<double> buckets);

  // Unlabelled shortcuts: register the family and create its single series.
  [[nodiscard]] absl::StatusOr<Counter*> AddCounter(std::string_view name, std::string_view help);
  [[nodiscard]] absl::StatusOr<Gauge*> AddGauge(std::string_view name, std::string_view help);
  [[nodiscard]] absl::StatusOr<Histogram*> AddHistogram(std::string_view name,
                                                        std::string_view help,
                                                        std::vector<double> buckets);

  // A gauge family with one callback series (see Family::AddCallback for the rules on `fn`),
  // e.g. AddGaugeCallback("cleave_kv_free_blocks", "...", {{"tier", "gpu"}}, [&] { ... }).
  // More series for the same family: AddGaugeFamily + AddCallback.
  [[nodiscard]] absl::Status AddGaugeCallback(std::string_view name, std::string_view help,
                                              const LabelPairs& labels, std::function<double()> fn);

  // A counter or gauge family whose series are produced by `collect` at each Render(): for series
  // that come and go with what they describe (the scheduler's per-worker gauges), read from their
  // owner's state under the owner's lock rather than mirrored into recorded series that could
  // never be removed. `collect` runs on the scraping thread with no registry lock held (same
  // rules as gauge callbacks). Samples of the wrong arity are dropped; of repeated label tuples
  // the first wins, so the output stays valid whatever `collect` returns.
  [[nodiscard]] absl::Status AddCollectedFamily(std::string_view name, std::string_view help,
                                                MetricType type,
                                                std::vector<std::string> label_names,
                                                Collector collect);

  // The exposition text (format 0.0.4) of every family with at least one series.
  std::string Render() const;

 private:
  template <typename T>
  absl::StatusOr<Family<T>*> AddFamily(std::string_view name, std::string_view help,
                                       MetricType type, std::vector<std::string> label_names,
                                       std::vector<double> buckets);

  mutable std::mutex mu_;
  std::vector<std::unique_ptr<internal::FamilyBase>> families_;  // registration order; mu_
  std::set<std::string, std::less<>> names_;                     // guarded by mu_
};

// Bounds a label value taken from outside (a model name, a route, a finish reason): returns the
// entry of `allowed` equal to `value`, else kOtherLabelValue. The result views `allowed`'s storage
// or a static string, never `value`'s.
std::string_view LabelValue(std::string_view value,
                            std::initializer_list<std::string_view> allowed);
std::string_view LabelValue(std::string_view value, const std::vector<std::string>& allowed);

// `count` bounds start, start*factor, start*factor^2, ...; start > 0, factor > 1, count >= 1.
absl::StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count);
// `count` bounds start, start+width, ...; width > 0, count >= 1.
absl::StatusOr<std::vector<double>> LinearBuckets(double start, double width, int count);

// Latency buckets in seconds, 1 ms .. 60 s on a 1-2.5-5 ladder: resolves inter-token latency
// (milliseconds) as well as time to first token and whole-request durations (up to a minute,
// anything longer counts in +Inf). 15 bounds.
const std::vector<double>& LatencyBucketsSeconds();

}  // namespace cleave::metrics
