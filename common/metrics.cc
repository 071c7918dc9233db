#include "cleave/common/metrics.h"

#include <charconv>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cleave/common/status.h"

namespace cleave::metrics {
namespace {

static_assert(std::atomic<double>::is_always_lock_free, "recording must stay lock-free");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "recording must stay lock-free");
static_assert(sizeof(Counter) == kCacheLineSize && sizeof(Gauge) == kCacheLineSize);

// Debian's Abseil has its own absl::string_view class, which std::string_view does not convert to.
absl::string_view AbslView(std::string_view s) { return {s.data(), s.size()}; }

bool IsAlpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

// [a-zA-Z_:][a-zA-Z0-9_:]*
bool IsValidMetricName(std::string_view s) {
  if (s.empty()) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (!(IsAlpha(c) || c == '_' || c == ':' || (i > 0 && IsDigit(c)))) return false;
  }
  return true;
}

// [a-zA-Z_][a-zA-Z0-9_]*, and not starting with "__" (reserved for Prometheus' internal use).
bool IsValidLabelName(std::string_view s) {
  if (s.empty() || s.starts_with("__")) return false;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (!(IsAlpha(c) || c == '_' || (i > 0 && IsDigit(c)))) return false;
  }
  return true;
}

absl::Status ValidateFamily(std::string_view name, std::string_view help, MetricType type,
                            const std::vector<std::string>& label_names,
                            const std::vector<double>& buckets) {
  if (!IsValidMetricName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("metric name '", AbslView(name), "' does not match [a-zA-Z_:][a-zA-Z0-9_:]*"));
  }
  for (std::string_view suffix : {"_bucket", "_sum", "_count"}) {
    if (name.ends_with(suffix)) {
      return absl::InvalidArgumentError(absl::StrCat("metric name '", AbslView(name), "' ends in '",
                                                     AbslView(suffix),
                                                     "', reserved for histogram series"));
    }
  }
  if (type == MetricType::kCounter && !name.ends_with("_total")) {
    return absl::InvalidArgumentError(
        absl::StrCat("counter name '", AbslView(name), "' must end in _total"));
  }
  if (help.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(AbslView(name), ": empty help text"));
  }
  std::set<std::string_view> seen;
  for (const std::string& label : label_names) {
    if (!IsValidLabelName(label)) {
      return absl::InvalidArgumentError(
          absl::StrCat(AbslView(name), ": label name '", label,
                       "' does not match [a-zA-Z_][a-zA-Z0-9_]* without '__'"));
    }
    if (label == "le" || label == "quantile") {
      return absl::InvalidArgumentError(absl::StrCat(AbslView(name), ": label name '", label,
                                                     "' is reserved for histogram/summary series"));
    }
    if (!seen.insert(label).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(AbslView(name), ": duplicate label name '", label, "'"));
    }
  }
  for (size_t i = 0; i < buckets.size(); ++i) {
    if (!std::isfinite(buckets[i])) {
      return absl::InvalidArgumentError(absl::StrCat(AbslView(name), ": bucket bound ", buckets[i],
                                                     " is not finite (+Inf is implicit)"));
    }
    if (i > 0 && !(buckets[i - 1] < buckets[i])) {
      return absl::InvalidArgumentError(absl::StrCat(AbslView(name),
                                                     ": bucket bounds must strictly increase (",
                                                     buckets[i - 1], ", ", buckets[i], ")"));
    }
  }
  return absl::OkStatus();
}

// Numbers as Prometheus' parser (Go's strconv.ParseFloat) reads them: integral values without
// exponent while exactly representable, otherwise the shortest round-trip form; NaN/+Inf/-Inf.
void AppendNumber(double v, std::string* out) {
  if (std::isnan(v)) {
    out->append("NaN");
    return;
  }
  if (std::isinf(v)) {
    out->append(v > 0 ? "+Inf" : "-Inf");
    return;
  }
  char buf[32];
  std::to_chars_result r;
  if (v == std::trunc(v) && std::fabs(v) < 0x1p63) {
    r = std::to_chars(buf, buf + sizeof(buf), static_cast<int64_t>(v));
  } else {
    r = std::to_chars(buf, buf + sizeof(buf), v);
  }
  out->append(buf, r.ptr);
}

void AppendUint(uint64_t v, std::string* out) {
  char buf[24];
  out->append(buf, std::to_chars(buf, buf + sizeof(buf), v).ptr);
}

// HELP text escapes backslash and newline; label values also escape the double quote.
void AppendEscaped(std::string_view s, bool quote, std::string* out) {
  for (char c : s) {
    if (c == '\\') {
      out->append("\\\\");
    } else if (c == '\n') {
      out->append("\\n");
    } else if (c == '"' && quote) {
      out->append("\\\"");
    } else {
      out->push_back(c);
    }
  }
}

// `name{label="value",...,le="bound"} ` — everything before the sample value.
void AppendSeries(std::string_view name, std::string_view suffix,
                  const std::vector<std::string>& label_names,
                  const std::vector<std::string>& label_values, const double* le,
                  std::string* out) {
  absl::StrAppend(out, AbslView(name), AbslView(suffix));
  if (!label_names.empty() || le != nullptr) {
    out->push_back('{');
    for (size_t i = 0; i < label_names.size(); ++i) {
      if (i > 0) out->push_back(',');
      absl::StrAppend(out, label_names[i], "=\"");
      AppendEscaped(label_values[i], /*quote=*/true, out);
      out->push_back('"');
    }
    if (le != nullptr) {
      out->append(label_names.empty() ? "le=\"" : ",le=\"");
      AppendNumber(*le, out);
      out->push_back('"');
    }
    out->push_back('}');
  }
  out->push_back(' ');
}

const char* TypeName(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "untyped";
}

}  // namespace

double Counter::Value() const {
  return static_cast<double>(whole_.load(std::memory_order_relaxed)) +
         real_.load(std::memory_order_relaxed);
}

Histogram::Histogram(const std::vector<double>& bounds)
    : bounds_(bounds.data()),
      num_bounds_(bounds.size()),
      blocks_(new Block[(bounds.size() + 1 + kPerBlock - 1) / kPerBlock]()) {}

std::vector<uint64_t> Histogram::BucketCounts() const {
  std::vector<uint64_t> counts(num_bounds_ + 1);
  for (size_t i = 0; i < counts.size(); ++i) {
    counts[i] = blocks_[i / kPerBlock].counts[i % kPerBlock].load(std::memory_order_relaxed);
  }
  return counts;
}

uint64_t Histogram::Count() const {
  uint64_t total = 0;
  for (uint64_t c : BucketCounts()) total += c;
  return total;
}

namespace internal {

FamilyBase::FamilyBase(std::string name, std::string help, MetricType type,
                       std::vector<std::string> label_names, std::vector<double> buckets)
    : name_(std::move(name)),
      help_(std::move(help)),
      type_(type),
      label_names_(std::move(label_names)),
      buckets_(std::move(buckets)) {}

FamilyBase::~FamilyBase() = default;

absl::Status FamilyBase::CheckArity(const std::vector<std::string>& values) const {
  if (values.size() == label_names_.size()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(name_, " has ", label_names_.size(), " label(s) (",
                                                 absl::StrJoin(label_names_, ", "), "), got ",
                                                 values.size(), " value(s)"));
}

absl::StatusOr<Child*> FamilyBase::GetOrCreate(std::vector<std::string> values) {
  CLEAVE_RETURN_IF_ERROR(CheckArity(values));
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = index_.find(values); it != index_.end()) return it->second;
  auto child = std::make_unique<Child>();
  child->label_values = std::move(values);
  switch (type_) {
    case MetricType::kCounter:
      child->metric = std::unique_ptr<Counter>(new Counter());
      break;
    case MetricType::kGauge:
      child->metric = std::unique_ptr<Gauge>(new Gauge());
      break;
    case MetricType::kHistogram:
      child->metric = std::unique_ptr<Histogram>(new Histogram(buckets_));
      break;
  }
  Child* raw = child.get();
  index_.emplace(raw->label_values, raw);
  children_.push_back(std::move(child));
  return raw;
}

absl::Status FamilyBase::AddCallbackChild(std::vector<std::string> values,
                                          std::function<double()> fn) {
  CLEAVE_RETURN_IF_ERROR(CheckArity(values));
  if (!fn) return absl::InvalidArgumentError(absl::StrCat(name_, ": empty gauge callback"));
  std::lock_guard<std::mutex> lock(mu_);
  if (index_.contains(values)) {
    return absl::AlreadyExistsError(
        absl::StrCat(name_, "{", absl::StrJoin(values, ","), "} already exists"));
  }
  auto child = std::make_unique<Child>();
  child->label_values = std::move(values);
  child->metric = std::move(fn);
  index_.emplace(child->label_values, child.get());
  children_.push_back(std::move(child));
  return absl::OkStatus();
}

void FamilyBase::Render(std::string* out) const {
  // Children are never removed or moved, so the snapshot stays valid after unlocking; callbacks
  // then run with no lock held.
  std::vector<const Child*> children;
  {
    std::lock_guard<std::mutex> lock(mu_);
    children.reserve(children_.size());
    for (const auto& child : children_) children.push_back(child.get());
  }
  if (children.empty()) return;
  RenderHeader(out);
  for (const Child* child : children) RenderChild(*child, out);
}

void FamilyBase::RenderHeader(std::string* out) const {
  absl::StrAppend(out, "# HELP ", name_, " ");
  AppendEscaped(help_, /*quote=*/false, out);
  absl::StrAppend(out, "\n# TYPE ", name_, " ", TypeName(type_), "\n");
}

namespace {

// A family without stored children: Render() asks its collector for the current series.
class CollectedFamily final : public FamilyBase {
 public:
  CollectedFamily(std::string name, std::string help, MetricType type,
                  std::vector<std::string> label_names, Collector collect)
      : FamilyBase(std::move(name), std::move(help), type, std::move(label_names), {}),
        collect_(std::move(collect)) {}

  void Render(std::string* out) const override {
    const std::vector<Sample> samples = collect_();
    std::set<std::vector<std::string>> seen;
    bool header = false;
    for (const Sample& s : samples) {
      if (s.label_values.size() != label_names().size() || !seen.insert(s.label_values).second) {
        continue;
      }
      if (!header) RenderHeader(out);
      header = true;
      AppendSeries(name(), "", label_names(), s.label_values, nullptr, out);
      AppendNumber(s.value, out);
      out->push_back('\n');
    }
  }

 private:
  const Collector collect_;
};

}  // namespace

void FamilyBase::RenderChild(const Child& child, std::string* out) const {
  const std::vector<std::string>& values = child.label_values;
  if (const auto* counter = std::get_if<std::unique_ptr<Counter>>(&child.metric)) {
    AppendSeries(name_, "", label_names_, values, nullptr, out);
    // Integer totals print exactly, even past 2^53.
    const double real = (*counter)->real_.load(std::memory_order_relaxed);
    const uint64_t whole = (*counter)->whole_.load(std::memory_order_relaxed);
    if (real == 0) {
      AppendUint(whole, out);
    } else {
      AppendNumber(static_cast<double>(whole) + real, out);
    }
  } else if (const auto* gauge = std::get_if<std::unique_ptr<Gauge>>(&child.metric)) {
    AppendSeries(name_, "", label_names_, values, nullptr, out);
    AppendNumber((*gauge)->Value(), out);
  } else if (const auto* fn = std::get_if<std::function<double()>>(&child.metric)) {
    AppendSeries(name_, "", label_names_, values, nullptr, out);
    AppendNumber((*fn)(), out);
  } else {
    const Histogram& h = *std::get<std::unique_ptr<Histogram>>(child.metric);
    const std::vector<uint64_t> counts = h.BucketCounts();
    const double sum = h.Sum();
    uint64_t cumulative = 0;
    for (size_t i = 0; i < counts.size(); ++i) {
      cumulative += counts[i];
      constexpr double kInf = std::numeric_limits<double>::infinity();
      AppendSeries(name_, "_bucket", label_names_, values,
                   i < buckets_.size() ? &buckets_[i] : &kInf, out);
      AppendUint(cumulative, out);
      out->push_back('\n');
    }
    AppendSeries(name_, "_sum", label_names_, values, nullptr, out);
    AppendNumber(sum, out);
    out->push_back('\n');
    AppendSeries(name_, "_count", label_names_, values, nullptr, out);
    AppendUint(cumulative, out);
  }
  out->push_back('\n');
}

}  // namespace internal

Registry::Registry() = default;
Registry::~Registry() = default;

template <typename T>
absl::StatusOr<Family<T>*> Registry::AddFamily(std::string_view name, std::string_view help,
                                               MetricType type,
                                               std::vector<std::string> label_names,
                                               std::vector<double> buckets) {
  CLEAVE_RETURN_IF_ERROR(ValidateFamily(name, help, type, label_names, buckets));
  std::lock_guard<std::mutex> lock(mu_);
  if (names_.contains(name)) {
    return absl::AlreadyExistsError(
        absl::StrCat("metric family '", AbslView(name), "' already registered"));
  }
  auto* family = new Family<T>(std::string(name), std::string(help), type, std::move(label_names),
                               std::move(buckets));
  families_.emplace_back(family);
  names_.emplace(name);
  return family;
}

absl::StatusOr<CounterFamily*> Registry::AddCounterFamily(std::string_view name,
                                                          std::string_view help,
                                                          std::vector<std::string> label_names) {
  return AddFamily<Counter>(name, help, MetricType::kCounter, std::move(label_names), {});
}

absl::StatusOr<GaugeFamily*> Registry::AddGaugeFamily(std::string_view name, std::string_view help,
                                                      std::vector<std::string> label_names) {
  return AddFamily<Gauge>(name, help, MetricType::kGauge, std::move(label_names), {});
}

absl::StatusOr<HistogramFamily*> Registry::AddHistogramFamily(std::string_view name,
                                                              std::string_view help,
                                                              std::vector<std::string> label_names,
                                                              std::vector<double> buckets) {
  return AddFamily<Histogram>(name, help, MetricType::kHistogram, std::move(label_names),
                              std::move(buckets));
}

absl::StatusOr<Counter*> Registry::AddCounter(std::string_view name, std::string_view help) {
  CLEAVE_ASSIGN_OR_RETURN(CounterFamily * family, AddCounterFamily(name, help, {}));
  return family->WithLabels({});
}

absl::StatusOr<Gauge*> Registry::AddGauge(std::string_view name, std::string_view help) {
  CLEAVE_ASSIGN_OR_RETURN(GaugeFamily * family, AddGaugeFamily(name, help, {}));
  return family->WithLabels({});
}

absl::StatusOr<Histogram*> Registry::AddHistogram(std::string_view name, std::string_view help,
                                                  std::vector<double> buckets) {
  CLEAVE_ASSIGN_OR_RETURN(HistogramFamily * family,
                          AddHistogramFamily(name, help, {}, std::move(buckets)));
  return family->WithLabels({});
}

absl::Status Registry::AddGaugeCallback(std::string_view name, std::string_view help,
                                        const LabelPairs& labels, std::function<double()> fn) {
  if (!fn) {
    return absl::InvalidArgumentError(absl::StrCat(AbslView(name), ": empty gauge callback"));
  }
  std::vector<std::string> names, values;
  for (const auto& [label, value] : labels) {
    names.push_back(label);
    values.push_back(value);
  }
  CLEAVE_ASSIGN_OR_RETURN(GaugeFamily * family, AddGaugeFamily(name, help, std::move(names)));
  return family->AddCallback(std::move(values), std::move(fn));
}

absl::Status Registry::AddCollectedFamily(std::string_view name, std::string_view help,
                                          MetricType type, std::vector<std::string> label_names,
                                          Collector collect) {
  if (type == MetricType::kHistogram) {
    return absl::InvalidArgumentError(absl::StrCat(AbslView(name), ": collected families are counters or gauges"));
  }
  if (!collect) return absl::InvalidArgumentError(absl::StrCat(AbslView(name), ": empty collector"));
  CLEAVE_RETURN_IF_ERROR(ValidateFamily(name, help, type, label_names, {}));
  std::lock_guard<std::mutex> lock(mu_);
  if (names_.contains(name)) {
    return absl::AlreadyExistsError(
        absl::StrCat("metric family '", AbslView(name), "' already registered"));
  }
  families_.push_back(std::make_unique<internal::CollectedFamily>(
      std::string(name), std::string(help), type, std::move(label_names), std::move(collect)));
  names_.emplace(name);
  return absl::OkStatus();
}

std::string Registry::Render() const {
  std::vector<const internal::FamilyBase*> families;
  {
    std::lock_guard<std::mutex> lock(mu_);
    families.reserve(families_.size());
    for (const auto& family : families_) families.push_back(family.get());
  }
  std::string out;
  for (const internal::FamilyBase* family : families) family->Render(&out);
  return out;
}

std::string_view LabelValue(std::string_view value,
                            std::initializer_list<std::string_view> allowed) {
  for (std::string_view a : allowed) {
    if (a == value) return a;
  }
  return kOtherLabelValue;
}

std::string_view LabelValue(std::string_view value, const std::vector<std::string>& allowed) {
  for (const std::string& a : allowed) {
    if (a == value) return a;
  }
  return kOtherLabelValue;
}

namespace {
// Catches overflow, and bounds that collapse when the step is below the start's precision.
absl::Status CheckBuckets(const std::vector<double>& bounds) {
  for (size_t i = 0; i < bounds.size(); ++i) {
    if (!std::isfinite(bounds[i]) || (i > 0 && !(bounds[i - 1] < bounds[i]))) {
      return absl::InvalidArgumentError(
          absl::StrCat("bucket bounds are not finite and strictly increasing at ", bounds[i]));
    }
  }
  return absl::OkStatus();
}
}  // namespace

absl::StatusOr<std::vector<double>> ExponentialBuckets(double start, double factor, int count) {
  CLEAVE_CHECK_ARG(start > 0 && std::isfinite(start), "ExponentialBuckets: start must be > 0");
  CLEAVE_CHECK_ARG(factor > 1 && std::isfinite(factor), "ExponentialBuckets: factor must be > 1");
  CLEAVE_CHECK_ARG(count >= 1, "ExponentialBuckets: count must be >= 1");
  std::vector<double> bounds;
  bounds.reserve(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) bounds.push_back(start * std::pow(factor, i));
  CLEAVE_RETURN_IF_ERROR(CheckBuckets(bounds));
  return bounds;
}

absl::StatusOr<std::vector<double>> LinearBuckets(double start, double width, int count) {
  CLEAVE_CHECK_ARG(std::isfinite(start), "LinearBuckets: start must be finite");
  CLEAVE_CHECK_ARG(width > 0 && std::isfinite(width), "LinearBuckets: width must be > 0");
  CLEAVE_CHECK_ARG(count >= 1, "LinearBuckets: count must be >= 1");
  std::vector<double> bounds;
  bounds.reserve(static_cast<size_t>(count));
  for (int i = 0; i < count; ++i) bounds.push_back(start + width * i);
  CLEAVE_RETURN_IF_ERROR(CheckBuckets(bounds));
  return bounds;
}

const std::vector<double>& LatencyBucketsSeconds() {
  static const std::vector<double> kBuckets = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                               0.5,   1,      2.5,   5,    10,    30,   60};
  return kBuckets;
}

}  // namespace cleave::metrics
