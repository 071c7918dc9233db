// The CUDA Mamba ops (CausalConv1d, SelectiveScan; cuda_ssm_ops.h) against the CPU reference (the
// same public calls on host tensors), on fresh random inputs (seed printed; CLEAVE_GPU_TEST_SEED=N
// repeats a run). Outputs are poisoned (NaN) before each device call. A session keeps one state
// pool on each side and runs a prefill batch (uneven lengths: 0, 1, 17, 200, 513 and 3000 tokens,
// a mix of fresh and continuing sequences), a small batch (the unchunked path) and decode steps
// continuing from the states the earlier calls left, comparing outputs and the whole pool after
// every call; slots a call does not name must come back bitwise unchanged.
//
// Tolerances (the CPU op is the reference; both are f32):
//  - CausalConv1d out: atol 1e-5, rtol 1e-5 (same order of operations; exp's last bits and FMA
//    contraction differ). conv_state: exact (it holds copies of inputs).
//  - SelectiveScan out and ssm_state: atol 1e-4 * sqrt(N / 16), rtol 1e-4. The GPU cuts long
//    sequences into time chunks and combines their states (h = exp(A * sum(delta)) * h + local),
//    a reassociation of the CPU's sequential loop; with expf vs the CPU's vector exp this moves
//    the last bits, damped by |exp(delta * A)| < 1. A host emulation of the kernels' arithmetic
//    stayed within 4e-6 of a double-precision reference on these shapes.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/ssm.h"
#include "cleave/kernels/tensor.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"

namespace cleave::kernels {
namespace {

using namespace gputest;  // NOLINT: the shared test vocabulary

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kConvAtol = 1e-5f, kConvRtol = 1e-5f;
float ScanAtol(int64_t n) { return 1e-4f * std::sqrt(static_cast<float>(n) / 16.0f); }
constexpr float kScanRtol = 1e-4f;

// A [rows, cols] f32 operand; with `strided`, a column window of a [rows, 2 * cols + 5] buffer
// whose other columns are NaN (a kernel reading outside its window poisons its output).
struct HostRows {
  int64_t rows = 0, cols = 0, ld = 0, offset = 0;
  std::vector<float> buf;
  Tensor View() { return Tensor(buf.data(), DType::kF32, {rows, ld}).Narrow(1, offset, cols); }
};

HostRows MakeRows(int64_t rows, int64_t cols, bool strided, std::mt19937& rng, float lo, float hi) {
  HostRows r;
  r.rows = rows;
  r.cols = cols;
  r.ld = strided ? 2 * cols + 5 : cols;
  r.offset = strided ? cols + 2 : 0;
  r.buf.assign(static_cast<size_t>(std::max<int64_t>(1, rows * r.ld)), kNaN);
  std::uniform_real_distribution<float> dist(lo, hi);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) r.buf[i * r.ld + r.offset + j] = dist(rng);
  }
  return r;
}

// The same operand on the device, same layout.
struct DeviceRows {
  std::unique_ptr<DeviceArray> array;
  int64_t rows = 0, cols = 0, ld = 0, offset = 0;
  Tensor View() { return array->View(DType::kF32, {rows, ld}).Narrow(1, offset, cols); }
};

DeviceRows Upload(Backend& backend, const HostRows& h) {
  return {gputest::Upload(backend, h.buf), h.rows, h.cols, h.ld, h.offset};
}

std::vector<float> Uniform(size_t n, std::mt19937& rng, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

struct Seq {
  int len;
  int slot;
  bool init;  // has_initial_state
};

// A packed batch: its index vectors on the host and on the device.
struct Batch {
  std::vector<int32_t> qsl{0}, slots, init;
  int64_t tokens = 0;
  std::unique_ptr<DeviceArray> d_qsl, d_slots, d_init;

  int64_t size() const { return static_cast<int64_t>(slots.size()); }
  SsmSequences Host() {
    return {Tensor(qsl.data(), DType::kI32, {size() + 1}), Tensor(slots.data(), DType::kI32, {size()}),
            Tensor(init.data(), DType::kI32, {size()})};
  }
  // Uploads the index vectors as they are now (tests break them first to check the errors).
  SsmSequences Device(Backend& backend) {
    d_qsl = gputest::Upload(backend, qsl);
    d_slots = gputest::Upload(backend, slots);
    d_init = gputest::Upload(backend, init);
    return {d_qsl->View(DType::kI32, {size() + 1}), d_slots->View(DType::kI32, {size()}),
            d_init->View(DType::kI32, {size()})};
  }
};

Batch MakeBatch(const std::vector<Seq>& seqs) {
  Batch b;
  for (const Seq& s : seqs) {
    b.qsl.push_back(b.qsl.back() + s.len);
    b.slots.push_back(s.slot);
    b.init.push_back(s.init ? 1 : 0);
  }
  b.tokens = b.qsl.back();
  return b;
}

// Every slot `b` does not name is bitwise as it was.
void ExpectOtherSlotsUntouched(const std::vector<float>& before, const std::vector<float>& after, const Batch& b,
                               size_t slot_floats, const std::string& what) {
  for (size_t s = 0; s * slot_floats < before.size(); ++s) {
    if (std::find(b.slots.begin(), b.slots.end(), static_cast<int32_t>(s)) != b.slots.end()) continue;
    EXPECT_EQ(std::memcmp(before.data() + s * slot_floats, after.data() + s * slot_floats, slot_floats * 4), 0)
        << what << ": slot " << s << " is not in the batch but changed";
  }
}

bool AllNaN(const std::vector<float>& v) {
  return std::all_of(v.begin(), v.end(), [](float x) { return std::isnan(x); });
}

// 8 sequences on shuffled slots of a 10-slot pool (two spare): 0, 1, 17, 200, 513 and 3000 tokens
// (T = 3732: the chunked scan), fresh and continuing.
std::vector<Seq> PrefillSeqs() {
  return {{3000, 5, true}, {0, 2, false}, {1, 7, true}, {0, 0, true},
          {200, 1, false}, {17, 3, true}, {1, 4, false}, {513, 6, true}};
}
// T = 161: the single-pass scan.
std::vector<Seq> SmallSeqs() { return {{100, 8, false}, {1, 5, true}, {0, 9, false}, {60, 2, true}}; }
// One token for every slot, all continuing but one (a fresh sequence joining the decode batch).
std::vector<Seq> DecodeSeqs(int step) {
  std::vector<Seq> seqs;
  for (int s = 9; s >= 0; --s) seqs.push_back({1, s, s != step});
  return seqs;
}
constexpr int64_t kSlots = 10;

// ---- SelectiveScan ----------------------------------------------------------------------------

struct ScanOptions {
  int64_t c = 200, n = 16;  // 200: a partial channel block
  bool strided = false, extras = true;  // extras: dt_bias, D and z
  bool softplus = true;
  int64_t slots = kSlots;  // the state pool's
};

class ScanSession {
 public:
  ScanSession(Backend& backend, const ScanOptions& o, uint32_t salt)
      : backend_(backend), o_(o), rng_(Seed() ^ (salt * 0x9e3779b9u)) {
    const int64_t c = o.c, n = o.n;
    if (o.extras && o.softplus) dt_bias_ = Uniform(c, rng_, -5.0f, -2.0f);
    if (o.extras) d_ = Uniform(c, rng_, 0.5f, 1.5f);
    std::uniform_real_distribution<float> jitter(0.5f, 1.5f);
    a_.resize(static_cast<size_t>(c * n));
    for (int64_t i = 0; i < c; ++i) {
      for (int64_t j = 0; j < n; ++j) a_[i * n + j] = -static_cast<float>(j + 1) * jitter(rng_);
    }
    state_ = Uniform(static_cast<size_t>(o.slots * c * n), rng_, -2.0f, 2.0f);
    d_state_ = gputest::Upload(backend, state_);
    d_a_ = gputest::Upload(backend, a_);
    if (!dt_bias_.empty()) d_dt_bias_ = gputest::Upload(backend, dt_bias_);
    if (!d_.empty()) d_d_ = gputest::Upload(backend, d_);
  }

  // Fresh inputs for `seqs`; runs both backends and compares out and the whole state pool.
  void Step(const std::vector<Seq>& seqs, const std::string& what) {
    const int64_t c = o_.c, n = o_.n;
    Batch b = MakeBatch(seqs);
    const int64_t t = b.tokens;
    HostRows x = MakeRows(t, c, o_.strided, rng_, -2.0f, 2.0f);
    // Without softplus, dt is delta itself: kept positive and small so the recurrence decays.
    HostRows dt = o_.softplus ? MakeRows(t, c, o_.strided, rng_, -1.0f, 1.0f)
                              : MakeRows(t, c, o_.strided, rng_, 0.0f, 0.2f);
    HostRows bm = MakeRows(t, n, o_.strided, rng_, -1.0f, 1.0f);
    HostRows cm = MakeRows(t, n, o_.strided, rng_, -1.0f, 1.0f);
    HostRows z = MakeRows(o_.extras ? t : 0, c, o_.strided, rng_, -3.0f, 3.0f);

    std::vector<float> want(static_cast<size_t>(std::max<int64_t>(1, t * c)), kNaN);
    SelectiveScanArgs h;
    h.x = x.View();
    h.dt = dt.View();
    if (!dt_bias_.empty()) h.dt_bias = Tensor(dt_bias_.data(), DType::kF32, {c});
    h.dt_softplus = o_.softplus;
    h.A = Tensor(a_.data(), DType::kF32, {c, n});
    h.B = bm.View();
    h.C = cm.View();
    if (!d_.empty()) h.D = Tensor(d_.data(), DType::kF32, {c});
    if (o_.extras) h.z = z.View();
    h.seqs = b.Host();
    h.ssm_state = Tensor(state_.data(), DType::kF32, {o_.slots, c, n});
    h.out = Tensor(want.data(), DType::kF32, {t, c});
    const absl::Status cpu = SelectiveScan(h);
    ASSERT_TRUE(cpu.ok()) << cpu;

    DeviceRows dx = Upload(backend_, x), ddt = Upload(backend_, dt), db = Upload(backend_, bm);
    DeviceRows dc = Upload(backend_, cm), dz = Upload(backend_, z);
    auto dout = DeviceArray::Poisoned(backend_, want.size() * sizeof(float));
    const std::vector<float> before = d_state_->Download<float>();
    SelectiveScanArgs g;
    g.x = dx.View();
    g.dt = ddt.View();
    if (d_dt_bias_) g.dt_bias = d_dt_bias_->View(DType::kF32, {c});
    g.dt_softplus = o_.softplus;
    g.A = d_a_->View(DType::kF32, {c, n});
    g.B = db.View();
    g.C = dc.View();
    if (d_d_) g.D = d_d_->View(DType::kF32, {c});
    if (o_.extras) g.z = dz.View();
    g.seqs = b.Device(backend_);
    g.ssm_state = d_state_->View(DType::kF32, {o_.slots, c, n});
    g.out = dout->View(DType::kF32, {t, c});
    const absl::Status gpu = SelectiveScan(g);
    ASSERT_TRUE(gpu.ok()) << gpu;

    const std::string label = "SelectiveScan " + what + " N=" + std::to_string(n) +
                              (o_.strided ? " strided" : "") + (o_.extras ? " +dt_bias,D,z" : "") +
                              (o_.softplus ? "" : " no-softplus");
    std::vector<float> got = dout->Download<float>();
    got.resize(static_cast<size_t>(t * c));
    want.resize(got.size());
    ExpectClose(got, want, ScanAtol(n), kScanRtol, label + " out");
    const std::vector<float> after = d_state_->Download<float>();
    ExpectClose(after, state_, ScanAtol(n), kScanRtol, label + " ssm_state");
    ExpectOtherSlotsUntouched(before, after, b, static_cast<size_t>(c * n), label);
  }

  // The device call on `b`'s index vectors as they are (possibly broken), with zero inputs; for
  // the argument tests. `out` must stay poisoned and the pool unchanged when it fails.
  absl::Status DeviceCallOn(Batch& b, int64_t t, bool* untouched) {
    const int64_t c = o_.c, n = o_.n;
    auto zeros = gputest::Upload(backend_, std::vector<float>(static_cast<size_t>(t * std::max(c, n)), 0.0f));
    auto dout = DeviceArray::Poisoned(backend_, static_cast<size_t>(t * c) * sizeof(float));
    const std::vector<float> before = d_state_->Download<float>();
    SelectiveScanArgs g;
    g.x = g.dt = g.z = zeros->View(DType::kF32, {t, c});
    g.A = d_a_->View(DType::kF32, {c, n});
    g.B = g.C = zeros->View(DType::kF32, {t, n});
    g.seqs = b.Device(backend_);
    g.ssm_state = d_state_->View(DType::kF32, {o_.slots, c, n});
    g.out = dout->View(DType::kF32, {t, c});
    const absl::Status st = SelectiveScan(g);
    const std::vector<float> after = d_state_->Download<float>();
    *untouched = AllNaN(dout->Download<float>()) && std::memcmp(before.data(), after.data(), before.size() * 4) == 0;
    return st;
  }

 private:
  Backend& backend_;
  ScanOptions o_;
  std::mt19937 rng_;
  std::vector<float> dt_bias_, a_, d_, state_;  // state_: the CPU reference's pool
  std::unique_ptr<DeviceArray> d_state_, d_a_, d_dt_bias_, d_d_;
};

// Prefill (chunked), a small batch (single pass), then decode steps continuing from the states.
void RunScanSession(Backend& backend, const ScanOptions& o, uint32_t salt) {
  ScanSession s(backend, o, salt);
  s.Step(PrefillSeqs(), "prefill");
  s.Step(SmallSeqs(), "small batch");
  for (int step = 0; step < 3; ++step) s.Step(DecodeSeqs(step), "decode step " + std::to_string(step));
}

TEST_F(CudaOps, SelectiveScanN16MatchesCpu) {
  RunScanSession(backend(), {200, 16, false, true, true}, 100);
  RunScanSession(backend(), {200, 16, true, true, true}, 101);
  RunScanSession(backend(), {200, 16, true, false, true}, 102);
  RunScanSession(backend(), {64, 16, false, false, false}, 103);
}

TEST_F(CudaOps, SelectiveScanN128MatchesCpu) {
  RunScanSession(backend(), {200, 128, true, true, true}, 110);
  RunScanSession(backend(), {130, 128, false, false, true}, 111);
  RunScanSession(backend(), {40, 20, true, true, true}, 112);  // N not a multiple of 16
}

// A wider decode batch (64 sequences, one token each, on a 64-slot pool) after a prefill of all
// of them (1 .. 90 tokens: T = 2932, the chunked path).
TEST_F(CudaOps, SelectiveScanDecodeBatch64MatchesCpu) {
  ScanOptions o;
  o.c = 512;
  o.slots = 64;
  ScanSession s(backend(), o, 120);
  std::vector<Seq> prefill, decode;
  for (int i = 0; i < 64; ++i) prefill.push_back({1 + (i * 37) % 90, i, i % 3 == 0});
  for (int i = 0; i < 64; ++i) decode.push_back({1, 63 - i, true});
  s.Step(prefill, "prefill of 64");
  for (int step = 0; step < 3; ++step) s.Step(decode, "decode batch 64, step " + std::to_string(step));
}

// ---- CausalConv1d -----------------------------------------------------------------------------

struct ConvOptions {
  int64_t c = 200, k = 4;
  bool strided = false, bias = true, silu = true;
  int64_t slots = kSlots;
};

class ConvSession {
 public:
  ConvSession(Backend& backend, const ConvOptions& o, uint32_t salt)
      : backend_(backend), o_(o), rng_(Seed() ^ (salt * 0x9e3779b9u)) {
    weight_ = Uniform(static_cast<size_t>(o.c * o.k), rng_, -1.0f, 1.0f);
    if (o.bias) bias_ = Uniform(static_cast<size_t>(o.c), rng_, -1.0f, 1.0f);
    state_ = Uniform(static_cast<size_t>(o.slots * o.c * (o.k - 1)), rng_, -2.0f, 2.0f);
    d_state_ = gputest::Upload(backend, state_);
    d_weight_ = gputest::Upload(backend, weight_);
    if (o.bias) d_bias_ = gputest::Upload(backend, bias_);
  }

  void Step(const std::vector<Seq>& seqs, const std::string& what) {
    const int64_t c = o_.c, k = o_.k;
    Batch b = MakeBatch(seqs);
    const int64_t t = b.tokens;
    HostRows x = MakeRows(t, c, o_.strided, rng_, -2.0f, 2.0f);
    std::vector<float> want(static_cast<size_t>(std::max<int64_t>(1, t * c)), kNaN);
    CausalConv1dArgs h;
    h.x = x.View();
    h.weight = Tensor(weight_.data(), DType::kF32, {c, k});
    if (o_.bias) h.bias = Tensor(bias_.data(), DType::kF32, {c});
    h.seqs = b.Host();
    h.conv_state = Tensor(state_.data(), DType::kF32, {o_.slots, c, k - 1});
    h.silu = o_.silu;
    h.out = Tensor(want.data(), DType::kF32, {t, c});
    const absl::Status cpu = CausalConv1d(h);
    ASSERT_TRUE(cpu.ok()) << cpu;

    DeviceRows dx = Upload(backend_, x);
    auto dout = DeviceArray::Poisoned(backend_, want.size() * sizeof(float));
    const std::vector<float> before = d_state_->Download<float>();
    CausalConv1dArgs g;
    g.x = dx.View();
    g.weight = d_weight_->View(DType::kF32, {c, k});
    if (o_.bias) g.bias = d_bias_->View(DType::kF32, {c});
    g.seqs = b.Device(backend_);
    g.conv_state = d_state_->View(DType::kF32, {o_.slots, c, k - 1});
    g.silu = o_.silu;
    g.out = dout->View(DType::kF32, {t, c});
    const absl::Status gpu = CausalConv1d(g);
    ASSERT_TRUE(gpu.ok()) << gpu;

    const std::string label = "CausalConv1d " + what + " K=" + std::to_string(k) + (o_.strided ? " strided" : "") +
                              (o_.bias ? " +bias" : "") + (o_.silu ? " silu" : "");
    std::vector<float> got = dout->Download<float>();
    got.resize(static_cast<size_t>(t * c));
    want.resize(got.size());
    ExpectClose(got, want, kConvAtol, kConvRtol, label + " out");
    const std::vector<float> after = d_state_->Download<float>();
    ExpectClose(after, state_, 0.0f, 0.0f, label + " conv_state");
    ExpectOtherSlotsUntouched(before, after, b, static_cast<size_t>(c * (k - 1)), label);
  }

  absl::Status DeviceCallOn(Batch& b, int64_t t, bool* untouched) {
    const int64_t c = o_.c, k = o_.k;
    auto zeros = gputest::Upload(backend_, std::vector<float>(static_cast<size_t>(t * c), 0.0f));
    auto dout = DeviceArray::Poisoned(backend_, static_cast<size_t>(t * c) * sizeof(float));
    const std::vector<float> before = d_state_->Download<float>();
    CausalConv1dArgs g;
    g.x = zeros->View(DType::kF32, {t, c});
    g.weight = d_weight_->View(DType::kF32, {c, k});
    g.seqs = b.Device(backend_);
    g.conv_state = d_state_->View(DType::kF32, {o_.slots, c, k - 1});
    g.out = dout->View(DType::kF32, {t, c});
    const absl::Status st = CausalConv1d(g);
    const std::vector<float> after = d_state_->Download<float>();
    *untouched = AllNaN(dout->Download<float>()) && std::memcmp(before.data(), after.data(), before.size() * 4) == 0;
    return st;
  }

 private:
  Backend& backend_;
  ConvOptions o_;
  std::mt19937 rng_;
  std::vector<float> weight_, bias_, state_;
  std::unique_ptr<DeviceArray> d_state_, d_weight_, d_bias_;
};

void RunConvSession(Backend& backend, const ConvOptions& o, uint32_t salt) {
  ConvSession s(backend, o, salt);
  s.Step(PrefillSeqs(), "prefill");
  s.Step(SmallSeqs(), "small batch");
  for (int step = 0; step < 3; ++step) s.Step(DecodeSeqs(step), "decode step " + std::to_string(step));
}

TEST_F(CudaOps, CausalConv1dMatchesCpu) {
  RunConvSession(backend(), {200, 4, false, true, true}, 200);
  RunConvSession(backend(), {200, 4, true, false, true}, 201);
  RunConvSession(backend(), {130, 4, true, true, false}, 202);
  RunConvSession(backend(), {64, 3, true, true, true}, 203);  // the generic-K kernel
  RunConvSession(backend(), {64, 7, false, true, true}, 204);
}

// ---- Bad arguments ----------------------------------------------------------------------------

struct SeqBreak {
  const char* name;
  const char* message;  // a part of the expected message
  void (*apply)(Batch&);
};

// Two sequences ({3 tokens, slot 1, continuing}, {2 tokens, slot 0, fresh}), broken one way each.
const SeqBreak kSeqBreaks[] = {
    {"slot out of range", "state_slots[0] = 10 is outside the pool's 10 slots", [](Batch& b) { b.slots[0] = 10; }},
    {"negative slot", "state_slots[1] = -1", [](Batch& b) { b.slots[1] = -1; }},
    {"duplicate slots", "state slot 1 is used by two sequences", [](Batch& b) { b.slots[1] = b.slots[0]; }},
    {"qsl not monotonic", "query_start_loc decreases at sequence 1: 6 -> 5", [](Batch& b) { b.qsl = {0, 6, 5}; }},
    {"qsl does not start at 0", "query_start_loc must run from 0 to T = 5", [](Batch& b) { b.qsl = {1, 3, 5}; }},
    {"qsl ends before T", "query_start_loc must run from 0 to T = 5, got 0 .. 4", [](Batch& b) { b.qsl = {0, 3, 4}; }},
    {"has_initial_state not 0/1", "has_initial_state[0] = 2 must be 0 or 1", [](Batch& b) { b.init[0] = 2; }},
};

template <typename Session>
void ExpectBadBatchesRejectedThenGoodCall(Session& s, const char* op) {
  for (const SeqBreak& brk : kSeqBreaks) {
    Batch b = MakeBatch({{3, 1, true}, {2, 0, false}});
    brk.apply(b);
    bool untouched = false;
    const absl::Status st = s.DeviceCallOn(b, 5, &untouched);
    std::printf("[ %s %-26s ] %s\n", op, brk.name, st.ToString().c_str());
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << op << " " << brk.name << ": " << st;
    EXPECT_NE(st.message().find(brk.message), std::string::npos) << op << " " << brk.name << ": " << st;
    EXPECT_TRUE(untouched) << op << " " << brk.name << ": wrote out or the state pool";
  }
  // The device and the stream are fine afterwards: a good call matches the CPU.
  s.Step({{3, 1, true}, {2, 0, false}, {40, 4, true}}, "good call after bad ones");
}

TEST_F(CudaOps, SsmBadBatchesRejectedWithNothingWritten) {
  ScanSession scan(backend(), {64, 16, false, false, true}, 300);
  ExpectBadBatchesRejectedThenGoodCall(scan, "SelectiveScan");
  ConvSession conv(backend(), {64, 4, false, true, true}, 301);
  ExpectBadBatchesRejectedThenGoodCall(conv, "CausalConv1d");
}

TEST_F(CudaOps, SsmHostCheckedArgumentsRejected) {
  std::vector<float> host(64 * 16, 0.0f);
  auto dev = gputest::Upload(backend(), host);
  auto dout = DeviceArray::Poisoned(backend(), 4 * 64 * sizeof(float));
  Batch b = MakeBatch({{4, 0, false}});
  SelectiveScanArgs a;
  a.x = a.dt = dev->View(DType::kF32, {4, 64});
  a.A = dev->View(DType::kF32, {64, 16});
  a.B = Tensor(host.data(), DType::kF32, {4, 16});  // on the CPU: a dispatch bug, not a copy
  a.C = dev->View(DType::kF32, {4, 16});
  a.seqs = b.Device(backend());
  auto state = DeviceArray::Poisoned(backend(), 64 * 16 * sizeof(float));
  a.ssm_state = state->View(DType::kF32, {1, 64, 16});
  a.out = dout->View(DType::kF32, {4, 64});
  absl::Status st = SelectiveScan(a);
  std::printf("[ host-side check ] %s\n", st.ToString().c_str());
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  a.B = dev->View(DType::kF32, {4, 16});
  a.A = dev->View(DType::kF32, {64, 300});  // N > 256
  st = SelectiveScan(a);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  a.A = dev->View(DType::kF32, {64, 16});
  a.out = dout->View(DType::kF32, {4, 64});
  a.ssm_state = dev->View(DType::kF32, {1, 64, 16});  // overlaps the inputs
  st = SelectiveScan(a);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_TRUE(AllNaN(dout->Download<float>()));
}

}  // namespace
}  // namespace cleave::kernels
