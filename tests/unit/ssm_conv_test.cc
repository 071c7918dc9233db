// CausalConv1d (ssm.h) on the CPU backend against plain double-precision loops that follow
// transformers' MambaMixer / JambaMambaMixer slow path (causal_conv1d_fn / _update), and against
// numbers recorded from MambaMixer itself. Shared helpers: ssm_test_util.h.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
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
#include "unit/ssm_test_util.h"

namespace cleave::kernels {
namespace {

using namespace ssm_testing;  // NOLINT(build/namespaces)
using testing_util::AllClose;
using testing_util::kSeed;

// K products and a vector exp (~2 ulp) in f32 against double.
constexpr double kConvAtol = 2e-6;
constexpr double kConvRtol = 2e-5;

struct ConvProblem {
  int64_t c = 0, k = 0, num_slots = 0;
  bool silu = true;
  Rows x;
  std::vector<float> weight, bias, state, out;  // bias empty: none

  size_t slot_floats() const { return static_cast<size_t>(c * (k - 1)); }
};

ConvProblem MakeConv(int64_t c, int64_t k, int64_t num_slots, int64_t tokens, bool strided,
                     bool with_bias, std::mt19937& rng) {
  ConvProblem p;
  p.c = c;
  p.k = k;
  p.num_slots = num_slots;
  p.x = MakeRows(tokens, c, strided, rng, -2.0f, 2.0f);
  p.weight = Uniform(static_cast<size_t>(c * k), rng, -0.7f, 0.7f);
  if (with_bias) p.bias = Uniform(static_cast<size_t>(c), rng, -0.5f, 0.5f);
  p.state = Uniform(std::max<size_t>(1, num_slots * p.slot_floats()), rng, -2.0f, 2.0f);
  p.out.assign(static_cast<size_t>(std::max<int64_t>(1, tokens * c)), kNaN);
  return p;
}

// Runs the batch on rows [row0, row0 + tokens) of x / out.
absl::Status RunConv(ConvProblem& p, Batch& b, int64_t row0 = 0) {
  CausalConv1dArgs a;
  a.x = p.x.View().Slice0(row0, row0 + b.tokens);
  a.weight = Tensor(p.weight.data(), DType::kF32, {p.c, p.k});
  if (!p.bias.empty()) a.bias = Tensor(p.bias.data(), DType::kF32, {p.c});
  a.seqs = b.Tensors();
  a.conv_state = Tensor(p.state.data(), DType::kF32, {p.num_slots, p.c, p.k - 1});
  a.silu = p.silu;
  a.out = Tensor(p.out.data(), DType::kF32, {p.x.rows, p.c}).Slice0(row0, row0 + b.tokens);
  return CausalConv1d(a);
}

// out for the batch's rows, and the whole pool afterwards (in `state`), in double.
std::vector<double> ConvReference(const ConvProblem& p, const Batch& b, std::vector<double>& state,
                                  int64_t row0 = 0) {
  const int64_t hist = p.k - 1;
  state = ToDouble(p.state);
  std::vector<double> out(static_cast<size_t>(b.tokens * p.c));
  for (size_t i = 0; i < b.seqs.size(); ++i) {
    const Seq& s = b.seqs[i];
    for (int64_t c = 0; c < p.c; ++c) {
      double* slot = state.data() + (s.slot * p.c + c) * hist;
      std::vector<double> xpad(static_cast<size_t>(hist), 0.0);
      if (s.init) std::copy(slot, slot + hist, xpad.begin());
      for (int t = 0; t < s.len; ++t) xpad.push_back(p.x.at(row0 + b.qsl[i] + t, c));
      for (int t = 0; t < s.len; ++t) {
        double acc = p.bias.empty() ? 0.0 : p.bias[c];
        for (int64_t j = 0; j < p.k; ++j) acc += double{p.weight[c * p.k + j]} * xpad[t + j];
        out[(b.qsl[i] + t) * p.c + c] = p.silu ? Silu(acc) : acc;
      }
      std::copy(xpad.end() - hist, xpad.end(), slot);
    }
  }
  return out;
}

struct ConvShape {
  int64_t c, k;
  bool strided, bias;
};

void CheckConvAgainstReference(const ConvShape& sh, const std::vector<Seq>& seqs, int64_t slots,
                               const std::string& label, uint32_t salt, bool silu = true) {
  std::mt19937 rng(kSeed + salt);
  Batch b = MakeBatch(seqs);
  ConvProblem p = MakeConv(sh.c, sh.k, slots, b.tokens, sh.strided, sh.bias, rng);
  p.silu = silu;
  std::vector<double> want_state;
  const std::vector<double> want = ConvReference(p, b, want_state);
  const std::vector<float> before = p.state;
  const absl::Status st = RunConv(p, b);
  ASSERT_TRUE(st.ok()) << st;
  const std::string name =
      absl::StrCat(label, " C=", sh.c, " K=", sh.k, sh.strided ? " strided" : "",
                   sh.bias ? "" : " no-bias", silu ? "" : " no-silu", " ", Describe(b));
  EXPECT_TRUE(
      AllClose(name + " out", p.out.data(), want.data(), want.size(), kConvAtol, kConvRtol));
  EXPECT_TRUE(AllClose(name + " state", p.state, want_state, kConvAtol, kConvRtol));
  EXPECT_TRUE(OtherSlotsUntouched(before, p.state, b, p.slot_floats(), slots));
}

TEST(CausalConv1dTest, SingleSequence) {
  for (const ConvShape& sh :
       {ConvShape{16, 4, false, true}, ConvShape{37, 4, false, true}, ConvShape{100, 3, true, true},
        ConvShape{8, 1, false, true}, ConvShape{64, 2, false, false}}) {
    for (const Seq& s : {Seq{1, 0, false}, Seq{2, 1, true}, Seq{50, 1, false}, Seq{50, 0, true}}) {
      CheckConvAgainstReference(sh, {s}, 2, "single", static_cast<uint32_t>(sh.c * 10 + s.len));
    }
  }
}

TEST(CausalConv1dTest, VarlenBatch) {
  std::mt19937 rng(kSeed);
  for (const ConvShape& sh : {ConvShape{80, 4, false, true}, ConvShape{80, 4, true, true},
                              ConvShape{13, 3, true, false}}) {
    CheckConvAgainstReference(sh, VarlenSeqs(8, rng), 8, "varlen", 1);
  }
}

TEST(CausalConv1dTest, NoBiasNoSilu) {
  CheckConvAgainstReference({24, 4, true, false}, {{9, 2, true}, {4, 0, false}}, 3, "plain", 2,
                            /*silu=*/false);
}

// Empty sequences: with a state they keep it; without, their slot is reset to zeros (the state
// after no tokens from zero state).
TEST(CausalConv1dTest, EmptySequences) {
  CheckConvAgainstReference({16, 4, false, true}, {{0, 0, true}, {0, 1, false}, {5, 2, true}}, 4,
                            "empty", 3);
}

TEST(CausalConv1dTest, LongSequence) {
  CheckConvAgainstReference({48, 4, true, true}, {{2000, 1, true}}, 2, "long", 4);
}

// Chunks of 7 tokens carrying state, and prefill then token-by-token decode, give what one call
// gives.
TEST(CausalConv1dTest, ChunksAndDecodeMatchOneCall) {
  std::mt19937 rng(kSeed + 5);
  ConvProblem p = MakeConv(40, 4, 3, 300, /*strided=*/true, /*with_bias=*/true, rng);
  ExpectChunksAndDecodeMatchOneCall("conv", p, 300, 1, &RunConv);
}

// Decode against transformers' causal_conv1d_update path: a K-wide window rolled left by one,
// the new input written last, out = act(sum(window * weight) + bias).
TEST(CausalConv1dTest, DecodeMatchesHfRollingWindow) {
  std::mt19937 rng(kSeed + 6);
  const int64_t c = 24, k = 4, prefill = 2, steps = 10, slot = 0;
  ConvProblem p = MakeConv(c, k, 1, prefill + steps, false, true, rng);
  Batch pre = MakeBatch({{static_cast<int>(prefill), static_cast<int>(slot), false}});
  ASSERT_TRUE(RunConv(p, pre).ok());
  // HF after the prefill: the last K inputs, left zero-padded.
  std::vector<double> window(static_cast<size_t>(c * k), 0.0);
  for (int64_t ch = 0; ch < c; ++ch) {
    for (int64_t t = 0; t < prefill; ++t) window[ch * k + k - prefill + t] = p.x.at(t, ch);
  }
  std::vector<double> want(static_cast<size_t>(steps * c));
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t row = prefill + s;
    for (int64_t ch = 0; ch < c; ++ch) {
      double* w = window.data() + ch * k;
      std::rotate(w, w + 1, w + k);
      w[k - 1] = p.x.at(row, ch);
      double acc = p.bias[ch];
      for (int64_t j = 0; j < k; ++j) acc += w[j] * p.weight[ch * k + j];
      want[s * c + ch] = Silu(acc);
    }
    Batch step = MakeBatch({{1, static_cast<int>(slot), true}});
    ASSERT_TRUE(RunConv(p, step, row).ok());
  }
  EXPECT_TRUE(AllClose("conv decode vs HF rolling window", p.out.data() + prefill * c, want.data(),
                       want.size(), kConvAtol, kConvRtol));
}

// Many short sequences (decode), over several channel blocks (256 channels each, the last one
// partial), on three threads: the block-major path.
TEST(CausalConv1dTest, ManyDecodeSequencesMatchReference) {
  SetCpuThreads(3);
  CheckConvAgainstReference({520, 4, true, true}, ManyDecodeSeqs(), 48, "decode", 13);
  SetCpuThreads(0);
}

TEST(CausalConv1dTest, SequenceAloneEqualsSequenceInBatch) {
  std::mt19937 rng(kSeed + 10);
  Batch batch = MakeBatch(BatchInvarianceSeqs());
  ConvProblem p = MakeConv(136, 4, 8, batch.tokens, true, true, rng);
  ExpectSequenceAloneEqualsSequenceInBatch("conv", p, batch, /*spare_slot=*/7, &RunConv);
}

// ---------------------------------------------------------------------------------------------
// Golden: the conv half of the recorded MambaMixer run (see ssm_test_util.h).
namespace hf_golden {
constexpr float kConvX[] = {  // [8, 8]
    -1.46765518f,  0.367480934f,   -0.0829232782f, 0.777502656f,  -1.5557574f,    2.29854107f,
    1.08004761f,   -0.787539601f,  0.223580137f,   -0.714081824f, -1.79840624f,   0.0674028918f,
    0.976973414f,  0.372771055f,   -0.421159983f,  1.1608212f,    -0.359838307f,  0.635807514f,
    -0.154667765f, 0.0130157862f,  -0.242360026f,  0.214757562f,  0.0720646232f,  0.578366399f,
    -0.312096566f, 0.347708344f,   0.512879014f,   -0.22766301f,  -0.0805126652f, -0.139094427f,
    -0.165092617f, -0.41105178f,   0.109344475f,   0.828999281f,  0.453935921f,   -0.107164435f,
    0.0873888806f, 0.565297365f,   1.50228393f,    1.70714438f,   0.595395088f,   0.0732851475f,
    0.984956384f,  -0.0860062689f, -0.48005107f,   0.675158143f,  0.59420836f,    -0.282915801f,
    0.104637548f,  -0.113593668f,  -1.24502337f,   0.0398193598f, 0.68670541f,    -0.61516118f,
    0.26083684f,   1.44177401f,    1.12096596f,    -0.264370143f, 1.67294705f,    1.27115524f,
    -1.05449438f,  1.86429453f,    0.0811134875f,  0.202925801f};
constexpr float kConvW[] = {  // [8, 4]
    -1.04025149f,  0.473695815f,   -0.485872239f, -0.1334185f,   -0.443907082f,  0.284622192f,
    0.281882048f,  0.050100565f,   -0.432961702f, 0.0240236968f, -0.337511152f,  -0.224801555f,
    -0.313791424f, -0.0182031617f, 0.0788210928f, 0.25145641f,   -0.370916307f,  0.233630762f,
    0.315795213f,  0.717651069f,   0.194636956f,  -0.512292624f, -0.0915519446f, 0.30335623f,
    0.882664502f,  -0.0216782093f, -0.261728048f, -0.181306764f, 0.411878824f,   0.444413871f,
    -0.866336703f, 0.353610188f};
constexpr float kConvB[] = {  // [8]
    -0.209296182f, -0.258026659f, -0.196059942f, -0.113878332f,
    -0.307872802f, -0.133923009f, 0.119816892f,  -0.237812713f};
constexpr float kConvOut[] = {  // [8, 8]
    -0.0066964617f, -0.105522208f,  -0.0808605626f, 0.0424797721f,  -0.276295781f, 0.358984858f,
    -0.0365580991f, -0.192949176f,  0.292116404f,   -0.0860897601f, 0.131990582f,  -0.0175052937f,
    -0.0466223545f, -0.102325335f,  -0.0413818359f, 0.599827886f,   -0.266234159f, -0.135596424f,
    0.270275325f,   -0.0561602488f, -0.198031142f,  -0.278464139f,  0.106121384f,  -0.277200252f,
    1.37336457f,    -0.168818712f,  -0.115582429f,  -0.165140808f,  0.214165106f,  0.0312355924f,
    0.818920553f,   -0.23097077f,   -0.182206586f,  0.225308746f,   0.174744204f,  -0.081986472f,
    -0.230407268f,  0.00645824894f, -0.184192911f,  1.18184972f,    -0.054364156f, -0.0916115716f,
    -0.186518088f,  -0.0667787045f, -0.202104017f,  0.0704589933f,  -0.132523611f, -0.258256912f,
    -0.0634210482f, -0.074226208f,  -0.177947417f,  -0.0182806402f, 0.0435594544f, -0.232095048f,
    -0.113671042f,  0.831497431f,   -0.106203318f,  -0.223028034f,  -0.136257842f, 0.136868492f,
    -0.268378645f,  0.14184922f,    1.07204819f,    -0.253003269f};
constexpr float kConvStateAfter[] = {  // [8, 3]
    0.595395088f, 0.104637548f, 1.12096596f,   0.0732851475f,  -0.113593668f, -0.264370143f,
    0.984956384f, -1.24502337f, 1.67294705f,   -0.0860062689f, 0.0398193598f, 1.27115524f,
    -0.48005107f, 0.68670541f,  -1.05449438f,  0.675158143f,   -0.61516118f,  1.86429453f,
    0.59420836f,  0.26083684f,  0.0811134875f, -0.282915801f,  1.44177401f,   0.202925801f};
}  // namespace hf_golden

TEST(CausalConv1dTest, MatchesTransformersMambaMixer) {
  using namespace hf_golden;                  // NOLINT(build/namespaces): the arrays
  using namespace ssm_testing::hf_recording;  // NOLINT(build/namespaces): the run
  constexpr int64_t kK = 4;
  std::vector<float> conv_state(kSlots * kChannels * (kK - 1), kNaN);
  std::vector<float> conv_out(kTokens * kChannels);
  const absl::Status st = ForEachRecordedCall([&](Batch& b, int64_t row, int64_t n) {
    CausalConv1dArgs a;
    a.x = Recorded(kConvX, {kTokens, kChannels}).Slice0(row, row + n);
    a.weight = Recorded(kConvW, {kChannels, kK});
    a.bias = Recorded(kConvB, {kChannels});
    a.seqs = b.Tensors();
    a.conv_state = Tensor(conv_state.data(), DType::kF32, {kSlots, kChannels, kK - 1});
    a.out = Tensor(conv_out.data() + row * kChannels, DType::kF32, {n, kChannels});
    return CausalConv1d(a);
  });
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_TRUE(AllClose("HF conv out", conv_out, Want(kConvOut, conv_out.size()), 1e-6, 1e-5));
  const size_t cs = kChannels * (kK - 1);
  EXPECT_TRUE(AllClose("HF conv state", conv_state.data() + kSlot * cs,
                       Want(kConvStateAfter, cs).data(), cs, 0.0, 0.0));
}

// ---------------------------------------------------------------------------------------------
// Argument errors: InvalidArgument, and nothing written.

struct ConvArgsFixture : ArgsFixture<ConvProblem> {
  ConvArgsFixture() { p = MakeConv(16, 4, 2, batch.tokens, false, true, rng); }
  CausalConv1dArgs Args() {
    CausalConv1dArgs a;
    a.x = p.x.View();
    a.weight = Tensor(p.weight.data(), DType::kF32, {16, 4});
    a.bias = Tensor(p.bias.data(), DType::kF32, {16});
    a.seqs = batch.Tensors();
    a.conv_state = Tensor(p.state.data(), DType::kF32, {2, 16, 3});
    a.out = Tensor(p.out.data(), DType::kF32, {batch.tokens, 16});
    return a;
  }
};

// CausalConv1d on the default (cpu) stream, as a plain function of its arguments.
absl::Status RunConvArgs(CausalConv1dArgs& a) { return CausalConv1d(a); }

TEST(CausalConv1dArgumentsTest, BadSequencesAreInvalidArgument) {
  ExpectBadSequencesRejected<ConvArgsFixture>(&RunConvArgs);
}

TEST(CausalConv1dArgumentsTest, BadShapesAreInvalidArgument) {
  const ArgBreaks<ConvArgsFixture, CausalConv1dArgs> breaks = {
      {"weight C mismatch",
       [](CausalConv1dArgs& a, ConvArgsFixture& f) {
         a.weight = Tensor(f.p.weight.data(), DType::kF32, {8, 8});
       }},
      {"bias wrong length",
       [](CausalConv1dArgs& a, ConvArgsFixture&) { a.bias = a.bias.Narrow(0, 0, 15); }},
      {"conv_state wrong K",
       [](CausalConv1dArgs& a, ConvArgsFixture& f) {
         a.conv_state = Tensor(f.p.state.data(), DType::kF32, {2, 16, 2});
       }},
      {"conv_state wrong C",
       [](CausalConv1dArgs& a, ConvArgsFixture& f) {
         a.conv_state = Tensor(f.p.state.data(), DType::kF32, {1, 32, 3});
       }},
      {"conv_state strided",
       [](CausalConv1dArgs& a, ConvArgsFixture& f) {
         a.conv_state = Tensor(f.big.data(), DType::kF32, {2, 32, 3}).Narrow(1, 0, 16);
       }},
      {"out wrong T",
       [](CausalConv1dArgs& a, ConvArgsFixture& f) {
         a.out = Tensor(f.p.out.data(), DType::kF32, {4, 16});
       }},
      {"x rank 3",
       [](CausalConv1dArgs& a, ConvArgsFixture& f) {
         a.x = Tensor(f.p.x.buf.data(), DType::kF32, {5, 4, 4});
       }},
      {"out aliases x",
       [](CausalConv1dArgs& a, ConvArgsFixture& f) {
         a.out = Tensor(f.p.x.buf.data(), DType::kF32, {5, 16});
       }},
      {"qsl wrong dtype",
       [](CausalConv1dArgs& a, ConvArgsFixture&) {
         a.seqs.query_start_loc = Tensor(a.seqs.query_start_loc.data(), DType::kF32, {3});
       }},
      {"slots wrong B",
       [](CausalConv1dArgs& a, ConvArgsFixture&) {
         a.seqs.state_slots = a.seqs.state_slots.Narrow(0, 0, 1);
       }},
  };
  ExpectEachBreakRejected(breaks, &RunConvArgs);
}

// An empty batch (B = 0, T = 0) is a no-op.
TEST(CausalConv1dArgumentsTest, EmptyBatchIsOk) {
  std::mt19937 rng(kSeed + 12);
  Batch b = MakeBatch({});
  ConvProblem p = MakeConv(16, 4, 2, 0, false, true, rng);
  const std::vector<float> state = p.state;
  EXPECT_TRUE(RunConv(p, b).ok());
  EXPECT_TRUE(BitwiseEqual(state.data(), p.state.data(), state.size()));
}

}  // namespace
}  // namespace cleave::kernels
