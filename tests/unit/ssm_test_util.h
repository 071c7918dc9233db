// Shared by the Mamba op tests (ssm_conv_test.cc, ssm_scan_test.cc): packed varlen batches, test
// operands, and the checks both ops go through the same way (chunked vs one call, a sequence
// alone vs in a batch, bad arguments rejected with nothing written).
//
// Strided operands are column windows of wider buffers whose other columns are NaN, so a kernel
// that reads outside its rows poisons its output. Every state pool holds more slots than the batch
// uses; the unused ones must come back bitwise untouched.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/ssm.h"
#include "cleave/kernels/tensor.h"
#include "unit/kernel_test_util.h"

namespace cleave::kernels::ssm_testing {

inline constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// One call against the same tokens cut into chunks or decode steps (same kernel, f32 both).
inline constexpr double kChunkAtol = 1e-6;
inline constexpr double kChunkRtol = 1e-5;

// ---------------------------------------------------------------------------------------------
// Test data.

// A [rows, cols] f32 operand; with `strided`, a column window of a [rows, 2 * cols + 5] buffer
// whose other columns are NaN.
struct Rows {
  int64_t rows = 0, cols = 0, ld = 0, offset = 0;
  std::vector<float> buf;

  float at(int64_t r, int64_t c) const { return buf[r * ld + offset + c]; }
  Tensor View() { return Tensor(buf.data(), DType::kF32, {rows, ld}).Narrow(1, offset, cols); }
};

inline Rows MakeRows(int64_t rows, int64_t cols, bool strided, std::mt19937& rng, float lo,
                     float hi) {
  Rows r;
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

inline std::vector<float> Uniform(size_t n, std::mt19937& rng, float lo, float hi) {
  return testing_util::RandomFloats(n, rng, lo, hi);
}

struct Seq {
  int len;
  int slot;
  bool init;  // has_initial_state
};

// A packed batch and its index tensors.
struct Batch {
  std::vector<Seq> seqs;
  std::vector<int32_t> qsl, slots, init;
  int64_t tokens = 0;

  SsmSequences Tensors() {
    SsmSequences s;
    const int64_t b = static_cast<int64_t>(slots.size());
    s.query_start_loc = Tensor(qsl.data(), DType::kI32, {b + 1});
    s.state_slots = Tensor(slots.data(), DType::kI32, {b});
    s.has_initial_state = Tensor(init.data(), DType::kI32, {b});
    return s;
  }
};

inline Batch MakeBatch(const std::vector<Seq>& seqs) {
  Batch b;
  b.seqs = seqs;
  b.qsl.push_back(0);
  for (const Seq& s : seqs) {
    b.qsl.push_back(b.qsl.back() + s.len);
    b.slots.push_back(s.slot);
    b.init.push_back(s.init ? 1 : 0);
  }
  b.tokens = b.qsl.back();
  return b;
}

inline std::string Describe(const Batch& b) {
  std::string s = "seqs(len@slot,init)=";
  for (const Seq& q : b.seqs) absl::StrAppend(&s, q.len, "@", q.slot, q.init ? "i " : " ");
  return s;
}

inline double Silu(double v) { return v / (1.0 + std::exp(-v)); }

// torch's softplus, threshold 20.
inline double Softplus(double v) { return v > 20.0 ? v : std::log1p(std::exp(v)); }

inline std::vector<double> ToDouble(const std::vector<float>& v) { return {v.begin(), v.end()}; }

inline bool BitwiseEqual(const float* a, const float* b, size_t n) {
  return std::memcmp(a, b, n * sizeof(float)) == 0;
}

// Slots the batch does not name must not change.
inline ::testing::AssertionResult OtherSlotsUntouched(const std::vector<float>& before,
                                                      const std::vector<float>& after,
                                                      const Batch& b, size_t slot_floats,
                                                      int64_t num_slots) {
  for (int64_t s = 0; s < num_slots; ++s) {
    if (std::find(b.slots.begin(), b.slots.end(), s) != b.slots.end()) continue;
    if (!BitwiseEqual(before.data() + s * slot_floats, after.data() + s * slot_floats,
                      slot_floats)) {
      return ::testing::AssertionFailure() << "slot " << s << " is not in the batch but changed";
    }
  }
  return ::testing::AssertionSuccess();
}

// Varied lengths (1 .. 1000) on shuffled slots, half continuing from a state.
inline std::vector<Seq> VarlenSeqs(int num_slots, std::mt19937& rng) {
  const int lens[] = {1, 3, 17, 200, 1000};
  std::vector<int> slots(num_slots);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng);
  std::vector<Seq> seqs;
  for (int i = 0; i < 5; ++i) seqs.push_back({lens[i], slots[i], i % 2 == 1});
  std::shuffle(seqs.begin(), seqs.end(), rng);
  return seqs;
}

// 40 short sequences (decode: mostly one token, a few up to 4) on slots 45 down to 6 of a 48-slot
// pool, most continuing from their state.
inline std::vector<Seq> ManyDecodeSeqs() {
  std::vector<Seq> seqs;
  for (int i = 0; i < 40; ++i) seqs.push_back({i % 7 == 0 ? 1 + i % 4 : 1, 45 - i, i % 5 != 0});
  return seqs;
}

// Decodes around two prefills, on slots 0 .. 5 of an 8-slot pool (7 is spare).
inline std::vector<Seq> BatchInvarianceSeqs() {
  return {{1, 4, true}, {200, 0, true}, {3, 2, false}, {77, 5, true}, {1, 1, true}, {1, 3, true}};
}

// ---------------------------------------------------------------------------------------------
// Golden: transformers' MambaMixer itself (slow path, f32, CPU), one sequence with a cache:
// causal_conv1d_fn + mamba_selective_scan over a 5-token prefill, then causal_conv1d_update +
// mamba_selective_state_update for 3 decode steps. Recorded by wrapping those functions: each
// op's inputs as HF passed them (dt before its bias) and its outputs, and the states at the end
// (HF's conv window is K wide; ours is its last K - 1 columns). The recorded arrays live in each
// op's test.
namespace hf_recording {

// transformers 5.24.0, torch 2.15.0+cu132: hidden 8, d_inner C = 8, d_state N = 16, K = 4, dt_rank
// 2, seed 1234. Our pools have two slots; the sequence lives in slot 1.
inline constexpr int64_t kChannels = 8, kPrefill = 5, kSteps = 3, kTokens = kPrefill + kSteps;
inline constexpr int64_t kSlots = 2, kSlot = 1;

// Runs call(batch, row, n) -> absl::Status for each recorded call in order (the prefill from zero
// state, then the decode steps continuing from the slot), on rows [row, row + n) of the recorded
// [kTokens, ...] arrays. Stops at the first error.
template <typename Call>
absl::Status ForEachRecordedCall(const Call& call) {
  for (int64_t i = 0, row = 0; i <= kSteps; ++i) {
    const int64_t n = i == 0 ? kPrefill : 1;
    Batch b = MakeBatch({{static_cast<int>(n), static_cast<int>(kSlot), i > 0}});
    if (absl::Status st = call(b, row, n); !st.ok()) return st;
    row += n;
  }
  return absl::OkStatus();
}

// A recorded array as an f32 tensor; the kernels only read it.
inline Tensor Recorded(const float* p, std::initializer_list<int64_t> shape) {
  return Tensor(const_cast<float*>(p), DType::kF32, shape);
}

inline std::vector<double> Want(const float* p, size_t n) { return std::vector<double>(p, p + n); }

}  // namespace hf_recording

// ---------------------------------------------------------------------------------------------
// Checks both ops share. `Problem` is an op's test problem (ConvProblem, ScanProblem): its state
// pool `state` and `out` as f32 vectors, slot_floats() per slot; `run(problem, batch, row0)` runs
// the op on the batch's rows [row0, row0 + tokens) of the problem's operands.

// One call over `len` tokens of one sequence on `slot` (continuing from its state) against the
// same tokens in chunks of 7 carrying state, and against a 100-token prefill then one token per
// call (decode): the same outputs and final state.
template <typename Problem, typename Run>
void ExpectChunksAndDecodeMatchOneCall(const std::string& op, Problem& p, int64_t len, int64_t slot,
                                       const Run& run) {
  const std::vector<float> initial = p.state;
  Batch whole = MakeBatch({{static_cast<int>(len), static_cast<int>(slot), true}});
  ASSERT_TRUE(run(p, whole, 0).ok());
  const std::vector<double> want = ToDouble(p.out), want_state = ToDouble(p.state);

  for (const int64_t step : {int64_t{7}, int64_t{1}}) {
    p.state = initial;
    std::fill(p.out.begin(), p.out.end(), kNaN);
    const int64_t first = step == 1 ? 100 : step;
    for (int64_t t0 = 0; t0 < len;) {
      const int64_t n = std::min(len - t0, t0 == 0 ? first : step);
      Batch b = MakeBatch({{static_cast<int>(n), static_cast<int>(slot), true}});
      const absl::Status st = run(p, b, t0);
      ASSERT_TRUE(st.ok()) << st;
      t0 += n;
    }
    const std::string label = op + (step == 1 ? " prefill+decode" : " chunks of 7");
    EXPECT_TRUE(testing_util::AllClose(label + " out", p.out, want, kChunkAtol, kChunkRtol));
    EXPECT_TRUE(
        testing_util::AllClose(label + " state", p.state, want_state, kChunkAtol, kChunkRtol));
  }
}

// A sequence's output and final state are bitwise the same alone (on `spare_slot`, which the
// batch does not use, holding the same initial state; on one thread) as inside `batch` (on three
// threads).
template <typename Problem, typename Run>
void ExpectSequenceAloneEqualsSequenceInBatch(const std::string& op, Problem& p, Batch& batch,
                                              int64_t spare_slot, const Run& run) {
  const std::vector<float> initial = p.state;
  const size_t slot_floats = p.slot_floats(), channels = p.out.size() / batch.tokens;
  SetCpuThreads(3);
  ASSERT_TRUE(run(p, batch, 0).ok());
  SetCpuThreads(1);
  const std::vector<float> batch_out = p.out, batch_state = p.state;
  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    const Seq& s = batch.seqs[i];
    p.state = initial;
    std::copy_n(initial.begin() + s.slot * slot_floats, slot_floats,
                p.state.begin() + spare_slot * slot_floats);
    Batch alone = MakeBatch({{s.len, static_cast<int>(spare_slot), s.init}});
    ASSERT_TRUE(run(p, alone, batch.qsl[i]).ok());
    const size_t row = batch.qsl[i] * channels, count = s.len * channels;
    EXPECT_TRUE(BitwiseEqual(p.out.data() + row, batch_out.data() + row, count))
        << op << " out of sequence " << i;
    EXPECT_TRUE(BitwiseEqual(p.state.data() + spare_slot * slot_floats,
                             batch_state.data() + s.slot * slot_floats, slot_floats))
        << op << " state of sequence " << i;
  }
  SetCpuThreads(0);
  std::printf("[ batch invariance ] %s seed=%#x %zu sequences bitwise equal alone and in batch\n",
              op.c_str(), testing_util::kSeed, batch.seqs.size());
}

// ---------------------------------------------------------------------------------------------
// Argument errors: InvalidArgument, and nothing written.

// A small valid setup for one op's argument checks: two sequences on a two-slot pool. The op's
// fixture derives from it, makes `p` and builds the op's arguments with Args(); each case then
// breaks those one way (with `big` at hand for oversized or strided views).
template <typename Problem>
struct ArgsFixture {
  std::mt19937 rng{testing_util::kSeed + 11};
  std::vector<float> big = std::vector<float>(16 * 300, 0.0f);  // room for strided pools
  Batch batch = MakeBatch({{3, 1, true}, {2, 0, false}});
  Problem p;
};

// break_args(fixture, args) breaks a fresh Fixture's arguments; `op(args)` must then fail with
// InvalidArgument and leave the state pool and `out` as they were.
template <typename Fixture, typename Op, typename Break>
void ExpectInvalidAndNothingWritten(const char* name, const Op& op, const Break& break_args) {
  Fixture f;
  const std::vector<float> state = f.p.state;
  auto args = f.Args();
  break_args(f, args);
  const absl::Status st = op(args);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << name << ": " << st;
  std::printf("[ %-28s ] %s\n", name, st.ToString().c_str());
  EXPECT_TRUE(BitwiseEqual(state.data(), f.p.state.data(), state.size())) << name;
  EXPECT_TRUE(std::all_of(f.p.out.begin(), f.p.out.end(), [](float v) { return std::isnan(v); }))
      << name;
}

// Named ways to break one op's arguments.
template <typename Fixture, typename Args>
using ArgBreaks = std::vector<std::pair<const char*, void (*)(Args&, Fixture&)>>;

template <typename Fixture, typename Args, typename Op>
void ExpectEachBreakRejected(const ArgBreaks<Fixture, Args>& breaks, const Op& op) {
  for (const auto& [name, apply] : breaks) {
    ExpectInvalidAndNothingWritten<Fixture>(
        name, op, [apply = apply](Fixture& f, Args& args) { apply(args, f); });
  }
}

// A way to break the index tensors, applied to both ops.
struct SeqBreak {
  const char* name;
  void (*apply)(Batch&);
};

inline const SeqBreak kSeqBreaks[] = {
    {"slot out of range", [](Batch& b) { b.slots[0] = 2; }},
    {"negative slot", [](Batch& b) { b.slots[1] = -1; }},
    {"duplicate slots", [](Batch& b) { b.slots[1] = b.slots[0]; }},
    {"qsl not monotonic",
     [](Batch& b) {
       b.qsl = {0, 6, 5};
     }},
    {"qsl does not start at 0",
     [](Batch& b) {
       b.qsl = {1, 3, 5};
     }},
    {"qsl ends before T",
     [](Batch& b) {
       b.qsl = {0, 3, 4};
     }},
    {"has_initial_state not 0/1", [](Batch& b) { b.init[0] = 2; }},
};

// Each kSeqBreaks case on one op.
template <typename Fixture, typename Op>
void ExpectBadSequencesRejected(const Op& op) {
  for (const SeqBreak& brk : kSeqBreaks) {
    ExpectInvalidAndNothingWritten<Fixture>(brk.name, op, [&brk](Fixture& f, auto& args) {
      brk.apply(f.batch);
      args.seqs = f.batch.Tensors();
    });
  }
}

}  // namespace cleave::kernels::ssm_testing
