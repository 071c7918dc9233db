// SelectiveScan (ssm.h) on the CPU backend against plain double-precision loops that follow
// transformers' MambaMixer / JambaMambaMixer slow path (the selective scan and its one-step state
// update), and against numbers recorded from MambaMixer itself. Shared helpers: ssm_test_util.h.
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

// N products per token, a vector exp and log1p per step, and the recurrence carrying rounding
// forward (damped: |exp(delta * A)| < 1).
constexpr double kScanAtol = 2e-5;
constexpr double kScanRtol = 1e-4;

struct ScanProblem {
  int64_t c = 0, n = 0, num_slots = 0;
  bool softplus = true;
  Rows x, dt, b, cm, z;                          // z.rows == 0: none
  std::vector<float> dt_bias, a, d, state, out;  // dt_bias / d empty: none

  size_t slot_floats() const { return static_cast<size_t>(c * n); }
};

struct ScanOptions {
  bool strided = false;
  bool dt_bias = true, d = true, z = true, softplus = true;
  float dt_lo = -1.0f, dt_hi = 1.0f;  // raw dt; with dt_bias in [-5, -2], delta is ~0.003 .. 0.3
};

ScanProblem MakeScan(int64_t c, int64_t n, int64_t num_slots, int64_t tokens, const ScanOptions& o,
                     std::mt19937& rng) {
  ScanProblem p;
  p.c = c;
  p.n = n;
  p.num_slots = num_slots;
  p.softplus = o.softplus;
  p.x = MakeRows(tokens, c, o.strided, rng, -2.0f, 2.0f);
  p.dt = MakeRows(tokens, c, o.strided, rng, o.dt_lo, o.dt_hi);
  p.b = MakeRows(tokens, n, o.strided, rng, -1.0f, 1.0f);
  p.cm = MakeRows(tokens, n, o.strided, rng, -1.0f, 1.0f);
  if (o.z) p.z = MakeRows(tokens, c, o.strided, rng, -3.0f, 3.0f);
  if (o.dt_bias) p.dt_bias = Uniform(static_cast<size_t>(c), rng, -5.0f, -2.0f);
  // A = -exp(A_log) with A_log near log(1 .. N), as Mamba initialises it.
  std::uniform_real_distribution<float> jitter(0.5f, 1.5f);
  p.a.resize(static_cast<size_t>(c * n));
  for (int64_t i = 0; i < c; ++i) {
    for (int64_t j = 0; j < n; ++j) p.a[i * n + j] = -static_cast<float>(j + 1) * jitter(rng);
  }
  if (o.d) p.d = Uniform(static_cast<size_t>(c), rng, 0.5f, 1.5f);
  p.state = Uniform(std::max<size_t>(1, num_slots * p.slot_floats()), rng, -2.0f, 2.0f);
  p.out.assign(static_cast<size_t>(std::max<int64_t>(1, tokens * c)), kNaN);
  return p;
}

absl::Status RunScan(ScanProblem& p, Batch& b, int64_t row0 = 0) {
  const int64_t r1 = row0 + b.tokens;
  SelectiveScanArgs a;
  a.x = p.x.View().Slice0(row0, r1);
  a.dt = p.dt.View().Slice0(row0, r1);
  if (!p.dt_bias.empty()) a.dt_bias = Tensor(p.dt_bias.data(), DType::kF32, {p.c});
  a.dt_softplus = p.softplus;
  a.A = Tensor(p.a.data(), DType::kF32, {p.c, p.n});
  a.B = p.b.View().Slice0(row0, r1);
  a.C = p.cm.View().Slice0(row0, r1);
  if (!p.d.empty()) a.D = Tensor(p.d.data(), DType::kF32, {p.c});
  if (p.z.rows > 0) a.z = p.z.View().Slice0(row0, r1);
  a.seqs = b.Tensors();
  a.ssm_state = Tensor(p.state.data(), DType::kF32, {p.num_slots, p.c, p.n});
  a.out = Tensor(p.out.data(), DType::kF32, {p.x.rows, p.c}).Slice0(row0, r1);
  return SelectiveScan(a);
}

std::vector<double> ScanReference(const ScanProblem& p, const Batch& b, std::vector<double>& state,
                                  int64_t row0 = 0) {
  state = ToDouble(p.state);
  std::vector<double> out(static_cast<size_t>(b.tokens * p.c));
  std::vector<double> h(static_cast<size_t>(p.n));
  for (size_t i = 0; i < b.seqs.size(); ++i) {
    const Seq& s = b.seqs[i];
    for (int64_t c = 0; c < p.c; ++c) {
      double* slot = state.data() + (s.slot * p.c + c) * p.n;
      for (int64_t j = 0; j < p.n; ++j) h[j] = s.init ? slot[j] : 0.0;
      for (int t = 0; t < s.len; ++t) {
        const int64_t r = row0 + b.qsl[i] + t;
        double delta = double{p.dt.at(r, c)} + (p.dt_bias.empty() ? 0.0 : p.dt_bias[c]);
        if (p.softplus) delta = Softplus(delta);
        const double u = p.x.at(r, c);
        double y = 0.0;
        for (int64_t j = 0; j < p.n; ++j) {
          h[j] = std::exp(delta * p.a[c * p.n + j]) * h[j] + delta * p.b.at(r, j) * u;
          y += h[j] * p.cm.at(r, j);
        }
        if (!p.d.empty()) y += double{p.d[c]} * u;
        if (p.z.rows > 0) y *= Silu(p.z.at(r, c));
        out[(b.qsl[i] + t) * p.c + c] = y;
      }
      std::copy(h.begin(), h.end(), slot);
    }
  }
  return out;
}

struct ScanShape {
  int64_t c, n;
};

void CheckScanAgainstReference(const ScanShape& sh, const std::vector<Seq>& seqs, int64_t slots,
                               const ScanOptions& o, const std::string& label, uint32_t salt) {
  std::mt19937 rng(kSeed + salt);
  Batch b = MakeBatch(seqs);
  ScanProblem p = MakeScan(sh.c, sh.n, slots, b.tokens, o, rng);
  std::vector<double> want_state;
  const std::vector<double> want = ScanReference(p, b, want_state);
  const std::vector<float> before = p.state;
  const absl::Status st = RunScan(p, b);
  ASSERT_TRUE(st.ok()) << st;
  const std::string name = absl::StrCat(
      label, " C=", sh.c, " N=", sh.n, o.strided ? " strided" : "", o.dt_bias ? "" : " no-dt_bias",
      o.d ? "" : " no-D", o.z ? "" : " no-z", o.softplus ? "" : " no-softplus", " ", Describe(b));
  EXPECT_TRUE(
      AllClose(name + " out", p.out.data(), want.data(), want.size(), kScanAtol, kScanRtol));
  EXPECT_TRUE(AllClose(name + " state", p.state, want_state, kScanAtol, kScanRtol));
  EXPECT_TRUE(OtherSlotsUntouched(before, p.state, b, p.slot_floats(), slots));
}

TEST(SelectiveScanTest, SingleSequence) {
  // N = 16 runs the fixed-N kernel; 5 and 24 the general one (24: one 8x8 transpose and a tail).
  for (const ScanShape& sh : {ScanShape{16, 16}, ScanShape{37, 16}, ScanShape{100, 5},
                              ScanShape{64, 24}, ScanShape{8, 1}}) {
    for (const Seq& s : {Seq{1, 0, false}, Seq{2, 1, true}, Seq{130, 1, false}, Seq{70, 0, true}}) {
      CheckScanAgainstReference(sh, {s}, 2, {}, "single", static_cast<uint32_t>(sh.c + s.len));
    }
  }
}

TEST(SelectiveScanTest, VarlenBatch) {
  std::mt19937 rng(kSeed);
  ScanOptions strided;
  strided.strided = true;
  CheckScanAgainstReference({80, 16}, VarlenSeqs(8, rng), 8, {}, "varlen", 1);
  CheckScanAgainstReference({80, 16}, VarlenSeqs(8, rng), 8, strided, "varlen", 2);
  CheckScanAgainstReference({21, 7}, VarlenSeqs(8, rng), 8, strided, "varlen", 3);
}

TEST(SelectiveScanTest, OptionalOperandsAbsent) {
  ScanOptions o;
  o.strided = true;
  o.dt_bias = o.d = o.z = false;
  o.softplus = false;
  o.dt_lo = 0.0f;  // delta = dt itself, so keep it a plausible step
  o.dt_hi = 0.3f;
  CheckScanAgainstReference({40, 16}, {{33, 1, true}, {5, 0, false}}, 2, o, "bare", 4);
  ScanOptions only_z_missing;
  only_z_missing.z = false;
  CheckScanAgainstReference({40, 16}, {{33, 1, true}}, 2, only_z_missing, "no-z", 5);
}

// dt on both sides of softplus' threshold (20) and far below it.
TEST(SelectiveScanTest, SoftplusThreshold) {
  ScanOptions o;
  o.dt_bias = false;
  o.dt_lo = -30.0f;
  o.dt_hi = 30.0f;
  CheckScanAgainstReference({32, 16}, {{64, 0, true}}, 1, o, "softplus", 6);
}

TEST(SelectiveScanTest, EmptySequences) {
  CheckScanAgainstReference({16, 16}, {{0, 0, true}, {0, 1, false}, {5, 2, true}}, 4, {}, "empty",
                            7);
}

// 2000 tokens: no drift. The last 100 tokens are held to the same tolerance as the whole.
TEST(SelectiveScanTest, LongSequenceDoesNotDrift) {
  std::mt19937 rng(kSeed + 8);
  ScanOptions o;
  o.strided = true;
  const int64_t len = 2000, c = 48, n = 16;
  Batch b = MakeBatch({{static_cast<int>(len), 1, true}});
  ScanProblem p = MakeScan(c, n, 2, len, o, rng);
  std::vector<double> want_state;
  const std::vector<double> want = ScanReference(p, b, want_state);
  ASSERT_TRUE(RunScan(p, b).ok());
  EXPECT_TRUE(AllClose("scan 2000 tokens out", p.out.data(), want.data(), want.size(), kScanAtol,
                       kScanRtol));
  const size_t tail = static_cast<size_t>(100 * c);
  EXPECT_TRUE(AllClose("scan 2000 tokens, last 100 out", p.out.data() + want.size() - tail,
                       want.data() + want.size() - tail, tail, kScanAtol, kScanRtol));
  EXPECT_TRUE(AllClose("scan 2000 tokens state", p.state, want_state, kScanAtol, kScanRtol));
}

TEST(SelectiveScanTest, ChunksAndDecodeMatchOneCall) {
  std::mt19937 rng(kSeed + 9);
  ScanOptions o;
  o.strided = true;
  ScanProblem p = MakeScan(72, 16, 3, 300, o, rng);
  ExpectChunksAndDecodeMatchOneCall("scan", p, 300, 2, &RunScan);
}

// Many short sequences (decode), over several channel blocks (64 channels each, the last one
// partial), on three threads: the block-major path.
TEST(SelectiveScanTest, ManyDecodeSequencesMatchReference) {
  SetCpuThreads(3);
  ScanOptions o;
  o.strided = true;
  CheckScanAgainstReference({520, 16}, ManyDecodeSeqs(), 48, o, "decode", 14);
  SetCpuThreads(0);
}

TEST(SelectiveScanTest, SequenceAloneEqualsSequenceInBatch) {
  std::mt19937 rng(kSeed + 10);
  Batch batch = MakeBatch(BatchInvarianceSeqs());
  ScanOptions o;
  o.strided = true;
  ScanProblem p = MakeScan(136, 16, 8, batch.tokens, o, rng);
  ExpectSequenceAloneEqualsSequenceInBatch("scan", p, batch, /*spare_slot=*/7, &RunScan);
}

// ---------------------------------------------------------------------------------------------
// Golden: the scan half of the recorded MambaMixer run (see ssm_test_util.h).
namespace hf_golden {
constexpr float kA[] = {  // [8, 16]
    -2.10874605f,  -1.66958296f, -2.13966632f,  -2.96242666f, -4.66460991f,  -5.604671f,
    -6.55482388f,  -7.97200727f, -9.97924328f,  -15.6004076f, -8.95349121f,  -10.0438967f,
    -5.7132864f,   -8.70713139f, -19.9095631f,  -15.0325546f, -0.767203569f, -2.61516547f,
    -4.18918085f,  -4.68380499f, -3.65569925f,  -8.00093269f, -7.07314539f,  -6.95251608f,
    -5.78018188f,  -13.8960505f, -19.1755123f,  -12.5667715f, -10.2240553f,  -12.8951359f,
    -31.3806305f,  -15.4935741f, -0.983698249f, -2.15585303f, -2.75148273f,  -5.43992043f,
    -6.82553673f,  -6.31317568f, -12.05194f,    -8.73854733f, -10.2552233f,  -8.63268661f,
    -6.97492981f,  -12.9761181f, -13.3698645f,  -17.1612186f, -16.0261745f,  -14.1776581f,
    -0.809797108f, -2.97946668f, -2.90597105f,  -4.59879112f, -2.30330372f,  -3.4574554f,
    -4.20638752f,  -7.38000679f, -9.89368153f,  -12.7004471f, -12.5187006f,  -17.8146915f,
    -14.2267561f,  -12.7552052f, -25.2909966f,  -21.3528728f, -0.729278445f, -1.50635636f,
    -3.12986684f,  -4.12718916f, -3.70045209f,  -6.05136824f, -5.63738155f,  -8.19629765f,
    -3.92085743f,  -12.9789648f, -11.9479113f,  -9.22844028f, -8.51746273f,  -15.0723295f,
    -7.10816479f,  -22.1445179f, -1.16892529f,  -2.02960587f, -3.59313202f,  -6.6956625f,
    -2.93333125f,  -3.41553068f, -3.29751325f,  -11.2565794f, -9.33138466f,  -10.3374653f,
    -6.18017769f,  -17.8647785f, -16.3062572f,  -16.0699692f, -16.0545177f,  -17.7202015f,
    -0.55927217f,  -1.49591553f, -3.59525108f,  -5.20200968f, -4.20010567f,  -6.85527563f,
    -7.22349739f,  -4.35164022f, -6.51405573f,  -8.92338943f, -13.9577112f,  -11.8974667f,
    -16.768671f,   -10.5454254f, -18.4887276f,  -20.8679447f, -0.875583351f, -1.38539243f,
    -3.97630262f,  -4.90305328f, -5.50269508f,  -5.41371536f, -8.10871315f,  -4.2665453f,
    -12.6291409f,  -9.82007313f, -12.8771973f,  -14.8971186f, -15.6012297f,  -10.839016f,
    -14.5273561f,  -15.7701797f};
constexpr float kD[] = {  // [8]
    1.0616883f,   1.03974545f,  1.06624496f, 0.830664635f,
    0.680712879f, 0.873593926f, 0.84792918f, 1.37278843f};
constexpr float kDtBias[] = {  // [8]
    -2.62795281f, -4.53389978f, -4.07779169f, -2.09076905f,
    -5.47897816f, -2.70304465f, -2.82528162f, -5.57338715f};
constexpr float kU[] = {  // [8, 8]
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
constexpr float kDt[] = {  // [8, 8]
    0.0853514746f,   0.0269134548f,  -0.0596854798f, -0.0248257499f, -0.0799172521f,
    -0.00393573847f, -0.0556044243f, 0.0133095458f,  -0.0820776373f, 0.00873394962f,
    0.0789627805f,   -0.0040643895f, 0.0296013132f,  -0.0421392955f, 0.00663772132f,
    0.0130305439f,   0.0606699027f,  -0.0370948985f, -0.0774568468f, 0.0277330652f,
    0.0199424177f,   0.0717973262f,  0.0365477763f,  -0.0324944966f, -0.162414104f,
    0.0304446779f,   0.164450988f,   -0.0186656788f, 0.0406080969f,  -0.100846857f,
    -0.00467351079f, 0.0356061161f,  0.0215214603f,  0.0160255488f,  -0.00929328147f,
    -0.0137168895f,  -0.0327631049f, -0.0132502373f, -0.0265213884f, 0.0102503244f,
    0.074889943f,    -0.0522635356f, -0.0996451825f, 0.0394585878f,  0.0334540606f,
    0.097214818f,    0.0538735166f,  -0.0449416898f, -0.228166834f,  -0.0758884922f,
    0.157099009f,    0.0695471466f,  0.219020367f,   0.0157508552f,  0.153978378f,
    -0.0385212414f,  -0.23589617f,   0.0482971817f,  0.241395533f,   -0.0304022506f,
    0.0534138009f,   -0.151884258f,  -0.0123057663f, 0.0547587648f};
constexpr float kB[] = {  // [8, 16]
    -0.014828885f,  -0.18412903f,   -0.00983736292f, -0.110502481f,   0.124736957f,
    -0.158920333f,  -0.0726601705f, -0.0961435437f,  0.177486524f,    -0.278614312f,
    0.0725464895f,  0.0416000225f,  -0.191270143f,   -0.139672294f,   -0.0592142865f,
    -0.233783722f,  -0.170988813f,  -0.248964652f,   -0.0396553688f,  -0.0288662538f,
    -0.0207110979f, -0.347801387f,  -0.0282169506f,  0.14489463f,     -0.0810873732f,
    0.263247699f,   0.473596752f,   -0.0948743224f,  -0.00598860951f, 0.521937549f,
    -0.161842838f,  -0.0120760677f, 0.0893731564f,   0.256911993f,    0.00674954336f,
    -0.170788348f,  0.0584593453f,  0.3006019f,      0.084291935f,    -0.0287657063f,
    -0.378394216f,  -0.0128980037f, -0.230984226f,   -0.00401949836f, 0.118171334f,
    -0.513713241f,  0.0370351449f,  0.363433182f,    0.103202693f,    -0.511864841f,
    0.286414593f,   -1.44985843f,   0.0274244491f,   -0.257016957f,   1.59104264f,
    0.336587489f,   0.188789412f,   0.165999532f,    0.100351378f,    0.0780432299f,
    0.362016708f,   -0.129614159f,  -0.550230324f,   -1.04062045f,    -0.175364658f,
    -0.0577361137f, -0.251438886f,  0.95457375f,     -0.247802064f,   -0.26548475f,
    -0.502347231f,  0.0203607678f,  -0.349300593f,   0.318568945f,    0.726925611f,
    -0.204864755f,  -0.333673239f,  0.93566668f,     -0.0625358671f,  0.18521817f,
    -0.0345535129f, 0.00303770602f, 0.0020301193f,   -0.112878986f,   0.137527227f,
    -0.109281667f,  -0.190325141f,  -0.121134952f,   0.113134108f,    -0.12995109f,
    -0.125223666f,  0.071385473f,   -0.0882331282f,  -0.131174982f,   0.0107655637f,
    -0.0619453229f, -0.287774771f,  0.0185878575f,   -0.222678676f,   0.479711592f,
    -0.124052241f,  -0.326820374f,  -0.282937109f,   0.2266054f,      -0.128183141f,
    0.411385298f,   0.333614439f,   0.0255750306f,   -0.0800978169f,  0.941603184f,
    -0.032723695f,  -0.0087178871f, 0.190272123f,    0.284285128f,    -0.180997223f,
    -0.233632475f,  -0.200549662f,  0.385422677f,    1.34264946f,     0.387456477f,
    -0.485501975f,  -0.129945844f,  -0.255881846f,   0.324082494f,    0.00448512658f,
    -0.30995214f,   -0.246971801f,  -0.735678434f};
constexpr float kC[] = {  // [8, 16]
    -0.199056968f,  -0.144609302f,   0.26950267f,    -0.289523274f,  0.0104739135f,  0.125669405f,
    0.0186673459f,  -0.0727741495f,  0.245027661f,   0.0965142325f,  -0.0047969548f, -0.11547479f,
    0.00608682167f, -0.0301517043f,  0.326502621f,   0.0397251882f,  0.236825272f,   0.0866636708f,
    0.0445210002f,  0.173718423f,    -0.148767456f,  0.113068104f,   -0.174250498f,  0.313511729f,
    -0.202867553f,  0.0097577516f,   0.00763110491f, 0.0980252475f,  0.419100046f,   0.258656472f,
    -0.0243991166f, -0.00884437002f, -0.102438442f,  0.0717817768f,  -0.0372200906f, -0.108509496f,
    0.0479576066f,  0.00137461536f,  0.0944743082f,  -0.142705962f,  0.0465238653f,  0.0992469564f,
    0.0564949326f,  0.165497541f,    0.00610129815f, -0.437767893f,  -0.105212808f,  0.103429511f,
    0.142477617f,   0.385707706f,    0.467005134f,   -0.0675937235f, -0.525506377f,  -0.33884564f,
    0.0176502373f,  0.402408868f,    0.0401267521f,  -0.124596924f,  -0.420183063f,  -0.314203888f,
    -0.102826901f,  1.17137802f,     0.552538395f,   0.0825521573f,  0.223743051f,   0.101682425f,
    -0.23119159f,   0.212944925f,    -0.082063958f,  0.531756222f,   -0.0950621888f, 0.334574878f,
    -0.436660975f,  -0.0679017603f,  -0.128470629f,  0.221066594f,   0.667576075f,   0.0571293831f,
    -0.275303096f,  -0.0478322059f,  -0.0986739546f, -0.153982252f,  0.115388103f,   -0.142580062f,
    -0.0278273672f, -0.00339167751f, -0.0266866833f, -0.058780212f,  0.160347775f,   -0.0972077325f,
    -0.0115891919f, -0.0748063996f,  -0.144532949f,  -0.127698168f,  0.0268066712f,  0.0456169732f,
    0.284084916f,   0.212070674f,    -0.301722378f,  0.299833536f,   -0.149944022f,  -0.0508019328f,
    -0.200955361f,  0.324677557f,    -0.166545004f,  0.00116072223f, -0.0486892909f, 0.174636319f,
    0.334672093f,   0.0842323378f,   -0.495370209f,  0.0697659925f,  -0.374872178f,  0.678239346f,
    -0.0832677782f, -0.511056185f,   -0.1774728f,    -0.18930611f,   0.347524256f,   -0.112724781f,
    0.469957799f,   0.513625026f,    -0.524719834f,  0.0527742207f,  -0.0784191042f, -0.0135778449f,
    0.0566462316f,  0.418928653f};
constexpr float kZ[] = {  // [8, 8]
    -0.148168534f,  -1.1363703f,    0.658591807f,  0.444063604f,  0.363694608f,  0.884483874f,
    -0.560896039f,  -0.357089579f,  0.146783337f,  -0.38089487f,  0.208216473f,  0.474006534f,
    0.199762896f,   -0.0737478212f, 0.852086425f,  -0.117151506f, 0.456148893f,  -1.14120042f,
    -0.926517785f,  0.717785358f,   -0.553668559f, -1.65087688f,  -0.315635234f, 0.844804645f,
    0.48372829f,    -0.657991767f,  2.68585849f,   -0.761143744f, 0.074889861f,  0.129112184f,
    0.492557794f,   -0.828893542f,  1.25832379f,   -0.609123766f, 1.7110312f,    0.683233976f,
    -0.138763309f,  1.82996166f,    0.258310944f,  0.988527477f,  -0.873025835f, 0.676899314f,
    -1.92221785f,   0.302321494f,   -0.18112275f,  -0.495792091f, -0.651953459f, 1.14220119f,
    0.689761996f,   0.282332003f,   -0.693774402f, 0.692205369f,  -0.165636808f, 0.956206203f,
    -0.0147861168f, 0.373236537f,   0.483669549f,  -0.598995984f, -0.514948368f, 1.04034984f,
    -0.0523061156f, 0.563356757f,   0.0356789231f, -0.308680177f};
constexpr float kY[] = {  // [8, 8]
    0.00048886193f, 0.0303054042f,   -0.0374337584f,  0.00958779454f,  -0.0403605215f,
    0.196777284f,   0.0063303248f,   0.0389408581f,   0.0245764162f,   0.0138134276f,
    0.0162270665f,  -0.00443460327f, -0.00346039655f, 0.00329994387f,  -0.0209201649f,
    -0.0454328805f, -0.0810089111f,  0.0390219726f,   -0.075926207f,   -0.0233239662f,
    0.0272908192f,  0.0659327134f,   -0.0122370785f,  -0.225310698f,   0.429459929f,
    0.0391193405f,  -0.309835345f,   0.0313875116f,   0.00567402737f,  0.00193940534f,
    0.206406951f,   0.0794076398f,   -0.217208147f,   -0.0503628701f,  0.272223413f,
    -0.0280796736f, 0.0101375524f,   0.00127800822f,  -0.024719093f,   1.16856599f,
    0.0105964961f,  -0.0432097316f,  0.0491509773f,   -0.00989307463f, 0.0113155153f,
    -0.0118348477f, 0.0232413877f,   -0.308325887f,   -0.0477206372f,  -0.0121076228f,
    0.0435776599f,  -0.00628332142f, -0.00220979564f, -0.145153388f,   0.000841007801f,
    0.253174275f,   -0.0291897655f,  0.0498532541f,   0.028338762f,    0.0891999602f,
    0.00462811673f, 0.0448505655f,   0.0167958811f,   0.0460626297f};
constexpr float kSsmStateAfter[] = {  // [8, 16]
    0.00403108634f,   -0.0338191465f,   0.017070502f,     -0.0610329397f,   0.00287823426f,
    -0.00666291313f,  0.0189040229f,    0.00104616839f,   0.00514109572f,   0.000276719802f,
    0.000550562749f,  -0.00119897025f,  0.00828071404f,   -0.0025862609f,   0.00123910024f,
    0.00241468148f,   -0.000791103754f, 5.46906958e-05f,  -0.000349775044f, 0.00486932183f,
    -0.000275759026f, -0.000800897426f, -0.00620614178f,  -0.00144443347f,  0.000527606171f,
    0.000511195511f,  0.00137835438f,   -0.00127735129f,  -0.000912122428f, 0.0021473933f,
    0.00086201285f,   0.00303928717f,   -0.000185710582f, 0.00054613169f,   5.25696669e-05f,
    0.00331781502f,   0.000172760629f,  0.000320637948f,  -0.00494639343f,  -0.00179216568f,
    4.32537636e-05f,  0.000153334506f,  0.00128441409f,   -0.00155734469f,  -0.000242333437f,
    -0.000297352264f, 0.00107774697f,   0.00380476681f,   0.00346973166f,   0.00659641344f,
    -0.00298202294f,  -0.00252225366f,  -0.00268689916f,  0.00828581583f,   0.0186631717f,
    0.00574379694f,   -0.0074463021f,   -0.00222401298f,  -0.00417903159f,  0.00500940438f,
    0.000140982593f,  -0.00534115825f,  -0.0038233581f,   -0.0113965524f,   -2.83994887e-05f,
    -0.000718292897f, 0.000648724206f,  -0.00137207424f,  0.000176020665f,  -0.000445632584f,
    0.000286259456f,  1.930914e-05f,    0.00105905777f,   0.000385233609f,  2.34635081e-07f,
    -0.000220230155f, 0.000687146792f,  0.000198681533f,  -7.13461777e-05f, 7.27110892e-05f,
    0.0048566591f,    -0.00217432831f,  0.00148555217f,   -0.00722875167f,  0.000837998232f,
    0.00438759197f,   0.013846484f,     0.00110152923f,   -0.00204059947f,  -0.00478771608f,
    -0.00534465769f,  0.00246954407f,   0.000454270979f,  -0.00834174454f,  -0.00177017774f,
    -0.00587218953f,  0.0206979476f,    0.00246821623f,   -0.00262787845f,  -0.0399365835f,
    -0.0104291858f,   0.0243684202f,    0.0985580236f,    0.0282259881f,    -0.0267711841f,
    -0.00920689106f,  -0.0170194749f,   0.0199910887f,    0.00105970562f,   -0.0245835204f,
    -0.0152705554f,   -0.0451891609f,   -0.00237332471f,  -0.000715903996f, -0.0018991949f,
    0.00724482955f,   -0.00154077483f,  -0.00305998418f,  -0.00545909163f,  0.000587996794f,
    -0.00141817948f,  0.00326001225f,   0.00505671324f,   -0.00132864364f,  -0.00169077038f,
    0.00845142733f,   4.1243693e-05f,   0.00203805394f};
}  // namespace hf_golden

TEST(SelectiveScanTest, MatchesTransformersMambaMixer) {
  using namespace hf_golden;                  // NOLINT(build/namespaces): the arrays
  using namespace ssm_testing::hf_recording;  // NOLINT(build/namespaces): the run
  constexpr int64_t kN = 16;
  std::vector<float> ssm_state(kSlots * kChannels * kN, kNaN);
  std::vector<float> y(kTokens * kChannels);
  const absl::Status st = ForEachRecordedCall([&](Batch& b, int64_t row, int64_t n) {
    SelectiveScanArgs a;
    a.x = Recorded(kU, {kTokens, kChannels}).Slice0(row, row + n);
    a.dt = Recorded(kDt, {kTokens, kChannels}).Slice0(row, row + n);
    a.dt_bias = Recorded(kDtBias, {kChannels});
    a.A = Recorded(kA, {kChannels, kN});
    a.B = Recorded(kB, {kTokens, kN}).Slice0(row, row + n);
    a.C = Recorded(kC, {kTokens, kN}).Slice0(row, row + n);
    a.D = Recorded(kD, {kChannels});
    a.z = Recorded(kZ, {kTokens, kChannels}).Slice0(row, row + n);
    a.seqs = b.Tensors();
    a.ssm_state = Tensor(ssm_state.data(), DType::kF32, {kSlots, kChannels, kN});
    a.out = Tensor(y.data() + row * kChannels, DType::kF32, {n, kChannels});
    return SelectiveScan(a);
  });
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_TRUE(AllClose("HF scan out", y, Want(kY, y.size()), 1e-6, 1e-5));
  const size_t ss = kChannels * kN;
  EXPECT_TRUE(AllClose("HF ssm state", ssm_state.data() + kSlot * ss,
                       Want(kSsmStateAfter, ss).data(), ss, 1e-6, 1e-5));
}

// ---------------------------------------------------------------------------------------------
// Argument errors: InvalidArgument, and nothing written.

struct ScanArgsFixture : ArgsFixture<ScanProblem> {
  ScanArgsFixture() { p = MakeScan(16, 16, 2, batch.tokens, {}, rng); }
  SelectiveScanArgs Args() {
    SelectiveScanArgs a;
    a.x = p.x.View();
    a.dt = p.dt.View();
    a.dt_bias = Tensor(p.dt_bias.data(), DType::kF32, {16});
    a.A = Tensor(p.a.data(), DType::kF32, {16, 16});
    a.B = p.b.View();
    a.C = p.cm.View();
    a.D = Tensor(p.d.data(), DType::kF32, {16});
    a.z = p.z.View();
    a.seqs = batch.Tensors();
    a.ssm_state = Tensor(p.state.data(), DType::kF32, {2, 16, 16});
    a.out = Tensor(p.out.data(), DType::kF32, {batch.tokens, 16});
    return a;
  }
};

// SelectiveScan on the default (cpu) stream, as a plain function of its arguments.
absl::Status RunScanArgs(SelectiveScanArgs& a) { return SelectiveScan(a); }

TEST(SelectiveScanArgumentsTest, BadSequencesAreInvalidArgument) {
  ExpectBadSequencesRejected<ScanArgsFixture>(&RunScanArgs);
}

TEST(SelectiveScanArgumentsTest, BadShapesAreInvalidArgument) {
  const ArgBreaks<ScanArgsFixture, SelectiveScanArgs> breaks = {
      {"A wrong C",
       [](SelectiveScanArgs& a, ScanArgsFixture& f) {
         a.A = Tensor(f.p.a.data(), DType::kF32, {8, 16});
       }},
      {"B wrong N", [](SelectiveScanArgs& a, ScanArgsFixture&) { a.B = a.B.Narrow(1, 0, 15); }},
      {"C wrong T", [](SelectiveScanArgs& a, ScanArgsFixture&) { a.C = a.C.Slice0(0, 4); }},
      {"dt wrong C", [](SelectiveScanArgs& a, ScanArgsFixture&) { a.dt = a.dt.Narrow(1, 0, 8); }},
      {"z wrong C", [](SelectiveScanArgs& a, ScanArgsFixture&) { a.z = a.z.Narrow(1, 0, 8); }},
      {"D wrong length", [](SelectiveScanArgs& a, ScanArgsFixture&) { a.D = a.D.Narrow(0, 0, 3); }},
      {"dt_bias i32",
       [](SelectiveScanArgs& a, ScanArgsFixture&) {
         a.dt_bias = Tensor(a.dt_bias.data(), DType::kI32, {16});
       }},
      {"ssm_state wrong N",
       [](SelectiveScanArgs& a, ScanArgsFixture& f) {
         a.ssm_state = Tensor(f.p.state.data(), DType::kF32, {4, 16, 8});
       }},
      {"N above the CPU limit",
       [](SelectiveScanArgs& a, ScanArgsFixture& f) {
         a.A = Tensor(f.big.data(), DType::kF32, {16, 300});
       }},
      {"ssm_state strided",
       [](SelectiveScanArgs& a, ScanArgsFixture& f) {
         a.ssm_state = Tensor(f.big.data(), DType::kF32, {2, 32, 16}).Narrow(1, 0, 16);
       }},
      {"out aliases ssm_state",
       [](SelectiveScanArgs& a, ScanArgsFixture& f) {
         a.out = Tensor(f.p.state.data(), DType::kF32, {5, 16});
       }},
  };
  ExpectEachBreakRejected(breaks, &RunScanArgs);
}

// An empty batch (B = 0, T = 0) is a no-op.
TEST(SelectiveScanArgumentsTest, EmptyBatchIsOk) {
  std::mt19937 rng(kSeed + 12);
  Batch b = MakeBatch({});
  ScanProblem p = MakeScan(16, 16, 2, 0, {}, rng);
  const std::vector<float> state = p.state;
  EXPECT_TRUE(RunScan(p, b).ok());
  EXPECT_TRUE(BitwiseEqual(state.data(), p.state.data(), state.size()));
}

}  // namespace
}  // namespace cleave::kernels
