// The CUDA mixture-of-experts ops (cuda_moe_ops.h) against the CPU reference: the same public calls
// (kernels::MoeRoute, MoeExperts, MoeCombine, SigmoidGatedAdd) on host tensors. Fresh random inputs
// per run (the seed is printed; CLEAVE_GPU_TEST_SEED=N repeats a run); device outputs are poisoned
// (all-ones bytes: NaN) before each call, so an element never written fails. Tolerances:
//   MoeRoute: ids, expert_offsets and permuted_slots equal the CPU's exactly. The logits rank the
//     experts with gaps of 0.1 (probability ratios of 1.1), far beyond the device's expf and
//     summation-order rounding, so no near-tie can flip an id. Weights: |got - want| <= 1e-7 +
//     1e-5 |want| (a few ulps of the softmax and of the renormalising sum).
//   MoeExperts, f32 weights: cuBLAS f32 GEMMs (no TF32) vs the CPU's, summation order only:
//     atol 1e-4, rtol 1e-4 (outputs are O(1)).
//   MoeExperts, bf16 weights: the device rounds x and the SwiGLU output to bf16 (relative 2^-9
//     each, random sign) where the CPU keeps f32: a few 1e-3 of the O(1) output scale, so atol
//     1.5e-2, rtol 2e-2. A wrong row, expert or weight is an O(1) error.
//   MoeCombine: the same product/fma sequence per element as the CPU's (which uses fma with AVX2):
//     atol 1e-6, rtol 1e-6.
//   SigmoidGatedAdd: expf vs std::exp within an ulp or two, one fma: atol 1e-6, rtol 1e-6.
// Both GEMM paths (grouped and per-expert cublasGemmEx) are run; the path auto chose is printed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <numeric>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/cuda_moe_ops.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/moe.h"
#include "cleave/kernels/tensor.h"
#include "gpu_test_util.h"
#include "gtest/gtest.h"

namespace cleave::kernels {
namespace {

using namespace gputest;  // NOLINT: the shared test vocabulary

// Token t ranks the experts by a random permutation, "cold" experts (e % 4 == 3) always last, so
// they receive no token whenever top_k <= 3E/4; logit = 0.1 * (E - 1 - rank) + a per-token
// offset (softmax ignores it).
std::vector<float> RankedLogits(int64_t t, int e, uint32_t salt) {
  std::mt19937 rng(Seed() ^ (salt * 0x9e3779b9u));
  std::normal_distribution<float> offset(0.0f, 2.0f);
  std::vector<float> logits(static_cast<size_t>(t * e));
  std::vector<int> hot, cold;
  for (int x = 0; x < e; ++x) (x % 4 == 3 ? cold : hot).push_back(x);
  for (int64_t i = 0; i < t; ++i) {
    std::shuffle(hot.begin(), hot.end(), rng);
    std::shuffle(cold.begin(), cold.end(), rng);
    std::vector<int> order = hot;
    order.insert(order.end(), cold.begin(), cold.end());
    const float off = offset(rng);
    for (int rank = 0; rank < e; ++rank) logits[i * e + order[rank]] = 0.1f * static_cast<float>(e - 1 - rank) + off;
  }
  return logits;
}

std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = F32ToBf16(v[i]);
  return out;
}

// E experts' gate, up [F, D] and down [D, F], each kind one array (expert-major) in the weight
// dtype, on the host and on the device.
struct Experts {
  DType dtype;
  int e;
  int64_t d, f;
  std::vector<float> host[3];
  std::vector<uint16_t> host16[3];
  std::unique_ptr<DeviceArray> dev[3];

  Experts(Backend& backend, DType dt, int num_experts, int64_t dd, int64_t ff) : dtype(dt), e(num_experts), d(dd), f(ff) {
    const float scale[3] = {1.0f / std::sqrt(static_cast<float>(d)), 1.0f / std::sqrt(static_cast<float>(d)),
                            1.0f / std::sqrt(static_cast<float>(f))};
    for (int i = 0; i < 3; ++i) {
      host[i] = Random(static_cast<size_t>(e * f * d), scale[i], 100 + i);
      if (dtype == DType::kBF16) {
        host16[i] = ToBf16(host[i]);
        dev[i] = Upload(backend, host16[i]);
      } else {
        dev[i] = Upload(backend, host[i]);
      }
    }
  }
  MoeExpertWeights Weights(bool on_device) {
    MoeExpertWeights w;
    const size_t es = DTypeSize(dtype);
    for (int x = 0; x < e; ++x) {
      std::vector<Tensor>* kinds[3] = {&w.gate, &w.up, &w.down};
      for (int i = 0; i < 3; ++i) {
        const size_t off = static_cast<size_t>(x) * f * d * es;
        char* base = on_device ? static_cast<char*>(dev[i]->data())
                               : (dtype == DType::kBF16 ? reinterpret_cast<char*>(host16[i].data())
                                                        : reinterpret_cast<char*>(host[i].data()));
        const int64_t rows = i == 2 ? d : f, cols = i == 2 ? f : d;
        kinds[i]->push_back(Tensor(base + off, dtype, {rows, cols}, on_device ? Device::Cuda(0) : Device::Cpu()));
      }
    }
    return w;
  }
};

struct MoeCase {
  int64_t t;
  int e, k;
  bool renormalize;
  DType wtype;
};

void PrintTo(const MoeCase& c, std::ostream* os) {
  *os << "T" << c.t << " E" << c.e << " k" << c.k << (c.renormalize ? " renorm " : " softmax ") << DTypeName(c.wtype);
}

std::vector<MoeCase> AllCases() {
  std::vector<MoeCase> cases;
  for (int64_t t : {1, 257})
    for (int e : {8, 64})
      for (int k : {1, 2, 8})
        for (bool renorm : {false, true})
          for (DType w : {DType::kF32, DType::kBF16}) cases.push_back({t, e, k, renorm, w});
  return cases;
}

class CudaMoe : public CudaOps, public ::testing::WithParamInterface<MoeCase> {};

TEST_P(CudaMoe, RouteAndExpertsMatchCpu) {
  const MoeCase c = GetParam();
  const int64_t d = 136, f = 88;  // not multiples of 16: unaligned second-half pointers
  const std::string label = ::testing::PrintToString(c);

  // Routing.
  std::vector<float> logits = RankedLogits(c.t, c.e, 1);
  MoeRouting want_routing;
  ASSERT_TRUE(MoeRoute(Tensor(logits.data(), DType::kF32, {c.t, c.e}), c.k, c.renormalize, want_routing).ok());
  auto dlogits = Upload(backend(), logits);
  MoeRouting routing;
  absl::Status st = MoeRoute(dlogits->View(DType::kF32, {c.t, c.e}), c.k, c.renormalize, routing);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_NE(routing.device, nullptr) << label;
  EXPECT_EQ(routing.num_tokens, c.t);
  EXPECT_EQ(routing.num_experts, c.e);
  EXPECT_EQ(routing.top_k, c.k);
  ASSERT_EQ(routing.topk_ids, want_routing.topk_ids) << label << " seed " << Seed();
  EXPECT_EQ(routing.expert_offsets, want_routing.expert_offsets) << label;
  EXPECT_EQ(routing.permuted_slots, want_routing.permuted_slots) << label;
  ExpectClose(routing.topk_weights, want_routing.topk_weights, 1e-7f, 1e-5f, label + " route weights");
  if (c.k <= 3 * c.e / 4) {
    EXPECT_EQ(routing.tokens_for_expert(3), 0) << "cold expert 3 got tokens";
  }

  // Experts on the CPU (the reference) and on the device.
  Experts experts(backend(), c.wtype, c.e, d, f);
  std::vector<float> x = Random(static_cast<size_t>(c.t * d), 1.0f, 2), want(static_cast<size_t>(c.t * d));
  MoeWorkspace cpu_ws;
  Tensor hx(x.data(), DType::kF32, {c.t, d}), hout(want.data(), DType::kF32, {c.t, d});
  ASSERT_TRUE(MoeExperts(hx, want_routing, experts.Weights(false), cpu_ws, hout).ok());

  const float atol = c.wtype == DType::kF32 ? 1e-4f : 1.5e-2f, rtol = c.wtype == DType::kF32 ? 1e-4f : 2e-2f;
  auto dx = Upload(backend(), x);
  const MoeExpertWeights dweights = experts.Weights(true);
  MoeWorkspace ws;
  MoeRouting host_only = routing;  // the same routing without its device mirror: the upload path
  host_only.device.reset();
  for (cuda::MoeGemmPath path : {cuda::MoeGemmPath::kAuto, cuda::MoeGemmPath::kPerExpert}) {
    cuda::SetMoeGemmPath(path);
    for (const MoeRouting* r : {&routing, &host_only}) {
      auto dout = DeviceArray::Poisoned(backend(), static_cast<size_t>(c.t * d) * 4);
      Tensor tout = dout->View(DType::kF32, {c.t, d});
      st = MoeExperts(dx->View(DType::kF32, {c.t, d}), *r, dweights, ws, tout);
      ASSERT_TRUE(st.ok()) << label << ": " << st;
      const bool grouped = cuda::LastMoeGemmPath() == cuda::MoeGemmPath::kGrouped;
      if (path == cuda::MoeGemmPath::kAuto && r == &routing && c.t == 257 && c.e == 64 && c.k == 8) {
        std::printf("%s: auto ran the %s GEMM path\n", label.c_str(), grouped ? "grouped" : "per-expert");
      }
      ExpectClose(dout->Download<float>(), want, atol, rtol,
                  label + (grouped ? " grouped" : " per-expert") + (r == &routing ? " mirror" : " uploaded"));
    }
  }
  cuda::SetMoeGemmPath(cuda::MoeGemmPath::kAuto);

  // MoeCombine on random slot outputs, with the mirror and without.
  std::vector<float> slot_out = Random(static_cast<size_t>(c.t * c.k * d), 1.0f, 3), combine_want(c.t * d);
  Tensor hcomb(combine_want.data(), DType::kF32, {c.t, d});
  ASSERT_TRUE(MoeCombine(Tensor(slot_out.data(), DType::kF32, {c.t * c.k, d}), want_routing, hcomb).ok());
  auto dslots = Upload(backend(), slot_out);
  for (const MoeRouting* r : {&routing, &host_only}) {
    auto dcomb = DeviceArray::Poisoned(backend(), static_cast<size_t>(c.t * d) * 4);
    Tensor tcomb = dcomb->View(DType::kF32, {c.t, d});
    st = MoeCombine(dslots->View(DType::kF32, {c.t * c.k, d}), *r, tcomb);
    ASSERT_TRUE(st.ok()) << st;
    ExpectClose(dcomb->Download<float>(), combine_want, 1e-6f, 1e-6f, label + " MoeCombine");
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaMoe, ::testing::ValuesIn(AllCases()));

// No tokens: an empty routing, and MoeExperts writes nothing.
TEST_F(CudaOps, MoeEmptyBatch) {
  std::vector<float> logits(8, 0.0f);
  auto dlogits = Upload(backend(), logits);
  MoeRouting routing;
  absl::Status st = MoeRoute(dlogits->View(DType::kF32, {0, 8}), 2, true, routing);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(routing.num_tokens, 0);
  EXPECT_EQ(routing.expert_offsets, std::vector<int32_t>(9, 0));
  Experts experts(backend(), DType::kF32, 8, 16, 8);
  auto dx = Upload(backend(), std::vector<float>(16, 1.0f));
  auto dout = DeviceArray::Poisoned(backend(), 16 * 4);
  Tensor tout = dout->View(DType::kF32, {0, 16});
  MoeWorkspace ws;
  st = MoeExperts(dx->View(DType::kF32, {0, 16}), routing, experts.Weights(true), ws, tout);
  EXPECT_TRUE(st.ok()) << st;
}

TEST_F(CudaOps, SigmoidGatedAddMatchesCpu) {
  const int64_t t = 257, d = 200;
  std::vector<float> g = Random(t, 3.0f, 50), y = Random(t * d, 1.0f, 51), out = Random(t * d, 1.0f, 52);
  g[0] = -100.0f;  // saturates to 0 (exp overflows on the way)
  g[1] = 100.0f;
  std::vector<float> want = out;
  Tensor hout(want.data(), DType::kF32, {t, d});
  ASSERT_TRUE(SigmoidGatedAdd(Tensor(g.data(), DType::kF32, {t, 1}), Tensor(y.data(), DType::kF32, {t, d}), hout).ok());
  auto dg = Upload(backend(), g), dy = Upload(backend(), y), dout = Upload(backend(), out);
  Tensor tout = dout->View(DType::kF32, {t, d});
  absl::Status st = SigmoidGatedAdd(dg->View(DType::kF32, {t, 1}), dy->View(DType::kF32, {t, d}), tout);
  ASSERT_TRUE(st.ok()) << st;
  ExpectClose(dout->Download<float>(), want, 1e-6f, 1e-6f, "SigmoidGatedAdd");
}

// Bad arguments are InvalidArgument before anything runs; a good call afterwards still works.
TEST_F(CudaOps, MoeRefusesBadArgumentsThenWorks) {
  const int64_t t = 5, d = 16, f = 8;
  const int e = 4, k = 2;
  std::vector<float> logits = RankedLogits(t, e, 60);
  auto dlogits = Upload(backend(), logits);
  MoeRouting routing;
  // top_k out of range; host memory labelled as device memory.
  EXPECT_EQ(MoeRoute(dlogits->View(DType::kF32, {t, e}), 0, true, routing).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MoeRoute(dlogits->View(DType::kF32, {t, e}), 5, true, routing).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(MoeRoute(Tensor(logits.data(), DType::kF32, {t, e}, Device::Cuda(0)), 2, true, routing).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(routing.num_tokens, 0) << "a refused call must leave the routing alone";
  absl::Status st = MoeRoute(dlogits->View(DType::kF32, {t, e}), k, true, routing);
  ASSERT_TRUE(st.ok()) << st;

  Experts experts(backend(), DType::kF32, e, d, f);
  std::vector<float> x = Random(t * d, 1.0f, 61);
  auto dx = Upload(backend(), x);
  auto dout = DeviceArray::Poisoned(backend(), t * d * 4);
  Tensor tx = dx->View(DType::kF32, {t, d}), tout = dout->View(DType::kF32, {t, d});
  MoeWorkspace ws;
  const auto refused = [&](const char* what, const MoeExpertWeights& w, const MoeRouting& r, const Tensor& xin,
                           Tensor& o) {
    const absl::Status s = MoeExperts(xin, r, w, ws, o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << what << ": " << s;
  };
  MoeExpertWeights w = experts.Weights(true);
  MoeExpertWeights on_host = w;
  on_host.down[2] = experts.Weights(false).down[2];
  refused("a weight on the host", on_host, routing, tx, tout);
  MoeExpertWeights mixed = w;
  mixed.up[1] = Tensor(mixed.up[1].data(), DType::kBF16, {f, d}, Device::Cuda(0));
  refused("mixed dtypes", mixed, routing, tx, tout);
  MoeExpertWeights short_list = w;
  short_list.down.pop_back();
  refused("missing down", short_list, routing, tx, tout);
  Tensor alias = tx;
  refused("out aliases x", w, routing, tx, alias);
  MoeRouting bad = routing;
  bad.permuted_slots[0] = 99;
  refused("corrupt permutation", w, bad, tx, tout);
  Tensor fewer = tx.Slice0(0, 4), fewer_out = tout.Slice0(0, 4);
  refused("x has fewer tokens than routing", w, routing, fewer, fewer_out);

  // The good call.
  std::vector<float> want(t * d);
  MoeRouting cpu_routing;
  ASSERT_TRUE(MoeRoute(Tensor(logits.data(), DType::kF32, {t, e}), k, true, cpu_routing).ok());
  MoeWorkspace cpu_ws;
  Tensor hout(want.data(), DType::kF32, {t, d});
  ASSERT_TRUE(MoeExperts(Tensor(x.data(), DType::kF32, {t, d}), cpu_routing, experts.Weights(false), cpu_ws, hout).ok());
  st = MoeExperts(tx, routing, w, ws, tout);
  ASSERT_TRUE(st.ok()) << st;
  ExpectClose(dout->Download<float>(), want, 1e-4f, 1e-4f, "MoeExperts after refusals");

  // MoeCombine and SigmoidGatedAdd shapes.
  auto dslots = DeviceArray::Poisoned(backend(), t * k * d * 4);
  EXPECT_EQ(MoeCombine(dslots->View(DType::kF32, {t * k - 1, d}), routing, tout).code(),
            absl::StatusCode::kInvalidArgument);
  auto dg = DeviceArray::Poisoned(backend(), t * 4);
  EXPECT_EQ(SigmoidGatedAdd(dg->View(DType::kF32, {t, 2}), tx, tout).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cleave::kernels
