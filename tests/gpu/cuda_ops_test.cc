// Every CUDA op against the CPU reference (the same public call on host tensors), on fresh random
// inputs: the seed is drawn per run and printed, and CLEAVE_GPU_TEST_SEED=N repeats a run.
// Outputs are poisoned (all-ones bytes: NaN in f32) before each device call, so an element the
// kernel forgot to write fails, and any NaN fails. Tolerances, per op, are stated next to each test.
//
// Built wherever the CUDA toolkit is (so CI catches build breaks); run only by tests/gpu/run.sh on a
// machine with a GPU, where a missing device is a failure, not a skip.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "cleave/kernels/activation.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/cuda_backend.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/embedding.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/norm.h"
#include "cleave/kernels/rope.h"
#include "cleave/kernels/tensor.h"
#include "gtest/gtest.h"
#include "gpu_test_util.h"

namespace cleave::kernels {
namespace {

using namespace gputest;  // NOLINT: the shared test vocabulary


std::vector<uint16_t> To16(const std::vector<float>& v, DType dtype) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = dtype == DType::kBF16 ? F32ToBf16(v[i]) : F32ToF16(v[i]);
  return out;
}

// Linear. f32 weights: f32 GEMM with f32 accumulation (no TF32): rtol 1e-4, atol 1e-4 * sqrt(K).
// 16-bit weights: the device rounds x to the weight's type before the GEMM (the CPU keeps x in f32),
// so each product carries a relative error up to 2^-8 (bf16) / 2^-11 (f16): atol scales with
// sqrt(K) * |x| * |w|.
struct LinearCase {
  int64_t m, n, k;
  DType wtype;
  bool bias;
  int64_t x_stride_pad, y_stride_pad;
};

void PrintTo(const LinearCase& c, std::ostream* os) {
  *os << c.m << "x" << c.n << "x" << c.k << " " << DTypeName(c.wtype) << (c.bias ? " +bias" : "")
      << " pad " << c.x_stride_pad << "/" << c.y_stride_pad;
}

class CudaLinear : public CudaOps, public ::testing::WithParamInterface<LinearCase> {};

TEST_P(CudaLinear, MatchesCpu) {
  const LinearCase c = GetParam();
  const int64_t ldx = c.k + c.x_stride_pad, ldy = c.n + c.y_stride_pad;
  std::vector<float> x = Random(c.m * ldx, 1.0f, 1), w = Random(c.n * c.k, 0.05f, 2), b = Random(c.n, 0.1f, 3);
  // The CPU reference gets the weights as stored (16-bit ones rounded the same way).
  std::vector<uint16_t> w16 = To16(w, c.wtype);
  const void* wdata = c.wtype == DType::kF32 ? static_cast<const void*>(w.data()) : w16.data();
  Tensor hx = Tensor(x.data(), DType::kF32, {c.m, ldx}).Narrow(1, 0, c.k);
  Tensor hw(const_cast<void*>(wdata), c.wtype, {c.n, c.k});
  Tensor hb(b.data(), DType::kF32, {c.n});
  std::vector<float> want(c.m * ldy, 0.0f);
  Tensor hy = Tensor(want.data(), DType::kF32, {c.m, ldy}).Narrow(1, 0, c.n);
  ASSERT_TRUE(Linear(hx, hw, c.bias ? &hb : nullptr, hy).ok());

  auto dx = Upload(backend(), x);
  auto dw = c.wtype == DType::kF32 ? Upload(backend(), w) : Upload(backend(), w16);
  auto db = Upload(backend(), b);
  auto dy = DeviceArray::Poisoned(backend(), c.m * ldy * sizeof(float));
  Tensor tx = dx->View(DType::kF32, {c.m, ldx}).Narrow(1, 0, c.k);
  Tensor tw = dw->View(c.wtype, {c.n, c.k});
  Tensor tb = db->View(DType::kF32, {c.n});
  Tensor ty = dy->View(DType::kF32, {c.m, ldy}).Narrow(1, 0, c.n);
  absl::Status st = Linear(tx, tw, c.bias ? &tb : nullptr, ty);
  ASSERT_TRUE(st.ok()) << st;
  std::vector<float> got = dy->Download<float>();
  // Compare the written columns only (padding stays poisoned, as it must: nothing writes it).
  std::vector<float> g, r;
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t j = 0; j < c.n; ++j) {
      g.push_back(got[i * ldy + j]);
      r.push_back(want[i * ldy + j]);
    }
    for (int64_t j = c.n; j < ldy; ++j) {
      uint32_t bits;
      std::memcpy(&bits, &got[i * ldy + j], 4);
      EXPECT_EQ(bits, 0xffffffffu) << "Linear wrote row padding at " << i << "," << j;
    }
  }
  const float sk = std::sqrt(static_cast<float>(c.k));
  const float atol = c.wtype == DType::kF32 ? 1e-4f * sk : (c.wtype == DType::kBF16 ? 2e-2f : 4e-3f) * sk * 0.05f * 3;
  ExpectClose(g, r, atol, c.wtype == DType::kF32 ? 1e-4f : 2e-2f,
              "Linear " + std::to_string(c.m) + "x" + std::to_string(c.n) + "x" + std::to_string(c.k));
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLinear,
                         ::testing::Values(LinearCase{1, 256, 128, DType::kF32, false, 0, 0},
                                           LinearCase{7, 97, 131, DType::kF32, true, 5, 3},
                                           LinearCase{64, 1024, 512, DType::kBF16, false, 0, 0},
                                           LinearCase{33, 257, 1000, DType::kBF16, true, 24, 7},
                                           LinearCase{5, 300, 256, DType::kF16, true, 0, 0},
                                           LinearCase{512, 2048, 2048, DType::kBF16, false, 0, 0}));

// RmsNorm / AddRmsNorm: a per-row f32 reduction in a different order: rtol 1e-5, atol 1e-5.
TEST_F(CudaOps, RmsNormAndAddRmsNormMatchCpu) {
  for (auto [t, d] : {std::pair<int64_t, int64_t>{1, 64}, {13, 4096}, {257, 333}}) {
    std::vector<float> x = Random(t * d, 1.0f, 10), res = Random(t * d, 1.0f, 11), wt = Random(d, 0.2f, 12);
    for (float& v : wt) v += 1.0f;
    // RmsNorm
    std::vector<float> want(t * d);
    Tensor hx(x.data(), DType::kF32, {t, d}), hw(wt.data(), DType::kF32, {d}), ho(want.data(), DType::kF32, {t, d});
    ASSERT_TRUE(RmsNorm(hx, hw, 1e-6f, ho).ok());
    auto dx = Upload(backend(), x), dw = Upload(backend(), wt);
    auto dout = DeviceArray::Poisoned(backend(), t * d * 4);
    Tensor tout = dout->View(DType::kF32, {t, d});
    absl::Status st = RmsNorm(dx->View(DType::kF32, {t, d}), dw->View(DType::kF32, {d}), 1e-6f, tout);
    ASSERT_TRUE(st.ok()) << st;
    ExpectClose(dout->Download<float>(), want, 1e-5f, 1e-5f, "RmsNorm");
    // AddRmsNorm: both the updated residual and the output.
    std::vector<float> res_want = res, out_want(t * d);
    Tensor hr(res_want.data(), DType::kF32, {t, d}), hout(out_want.data(), DType::kF32, {t, d});
    ASSERT_TRUE(AddRmsNorm(hx, hr, hw, 1e-5f, hout).ok());
    auto dres = Upload(backend(), res);
    auto dout2 = DeviceArray::Poisoned(backend(), t * d * 4);
    Tensor tres = dres->View(DType::kF32, {t, d}), tout2 = dout2->View(DType::kF32, {t, d});
    st = AddRmsNorm(dx->View(DType::kF32, {t, d}), tres, dw->View(DType::kF32, {d}), 1e-5f, tout2);
    ASSERT_TRUE(st.ok()) << st;
    ExpectClose(dres->Download<float>(), res_want, 1e-6f, 1e-6f, "AddRmsNorm residual");
    ExpectClose(dout2->Download<float>(), out_want, 1e-5f, 1e-5f, "AddRmsNorm out");
  }
}

// ApplyRope: one multiply-add pair per element with the same tables: atol 1e-5, rtol 1e-5.
TEST_F(CudaOps, RopeMatchesCpuForBothStylesAndPartialRotation) {
  for (RopeStyle style : {RopeStyle::kHalves, RopeStyle::kInterleaved}) {
    for (int rotary : {64, 32}) {
      const int64_t t = 19, hq = 8, hk = 2, hd = 64, positions = 512;
      RopeConfig rc;
      rc.rotary_dim = rotary;
      rc.style = style;
      std::vector<float> cos(positions * rotary / 2), sin(positions * rotary / 2);
      Tensor hcos(cos.data(), DType::kF32, {positions, rotary / 2}), hsin(sin.data(), DType::kF32, {positions, rotary / 2});
      ASSERT_TRUE(BuildRopeTables(rc, hcos, hsin).ok());
      std::vector<int32_t> pos(t);
      std::mt19937 rng(Seed());
      for (auto& p : pos) p = static_cast<int32_t>(rng() % positions);
      std::vector<float> q = Random(t * hq * hd, 1.0f, 20), k = Random(t * hk * hd, 1.0f, 21);
      std::vector<float> qw = q, kw = k;
      Tensor hq3(qw.data(), DType::kF32, {t, hq, hd}), hk3(kw.data(), DType::kF32, {t, hk, hd});
      Tensor hpos(pos.data(), DType::kI32, {t});
      ASSERT_TRUE(ApplyRope(hpos, hcos, hsin, style, hq3, hk3).ok());
      auto dq = Upload(backend(), q), dk = Upload(backend(), k), dpos = Upload(backend(), pos);
      auto dcos = Upload(backend(), cos), dsin = Upload(backend(), sin);
      Tensor tq = dq->View(DType::kF32, {t, hq, hd}), tk = dk->View(DType::kF32, {t, hk, hd});
      absl::Status st = ApplyRope(dpos->View(DType::kI32, {t}), dcos->View(DType::kF32, {positions, rotary / 2}),
                                  dsin->View(DType::kF32, {positions, rotary / 2}), style, tq, tk);
      ASSERT_TRUE(st.ok()) << st;
      ExpectClose(dq->Download<float>(), qw, 1e-5f, 1e-5f, "Rope q");
      ExpectClose(dk->Download<float>(), kw, 1e-5f, 1e-5f, "Rope k");
      // A position past the tables is refused, and nothing is read out of bounds.
      std::vector<int32_t> bad = pos;
      bad[3] = positions;
      auto dbad = Upload(backend(), bad);
      st = ApplyRope(dbad->View(DType::kI32, {t}), dcos->View(DType::kF32, {positions, rotary / 2}),
                     dsin->View(DType::kF32, {positions, rotary / 2}), style, tq, tk);
      EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    }
  }
}

// SwiGlu: elementwise, expf on both sides: atol 1e-6, rtol 1e-5.
TEST_F(CudaOps, SwiGluMatchesCpu) {
  for (auto [t, f] : {std::pair<int64_t, int64_t>{1, 96}, {37, 1408}, {128, 11008}}) {
    std::vector<float> gu = Random(t * 2 * f, 2.0f, 30), want(t * f);
    Tensor hgu(gu.data(), DType::kF32, {t, 2 * f}), hout(want.data(), DType::kF32, {t, f});
    ASSERT_TRUE(SwiGlu(hgu, hout).ok());
    auto dgu = Upload(backend(), gu);
    auto dout = DeviceArray::Poisoned(backend(), t * f * 4);
    Tensor tout = dout->View(DType::kF32, {t, f});
    absl::Status st = SwiGlu(dgu->View(DType::kF32, {t, 2 * f}), tout);
    ASSERT_TRUE(st.ok()) << st;
    ExpectClose(dout->Download<float>(), want, 1e-6f, 1e-5f, "SwiGlu");
  }
}

// EmbeddingLookup: a copy (16-bit tables widened exactly): bitwise equal.
TEST_F(CudaOps, EmbeddingMatchesCpuAndRefusesBadIds) {
  const int64_t v = 1000, d = 384, t = 77;
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    std::vector<float> table = Random(v * d, 1.0f, 40);
    std::vector<uint16_t> table16 = To16(table, dtype);
    const void* tdata = dtype == DType::kF32 ? static_cast<const void*>(table.data()) : table16.data();
    std::vector<int32_t> ids(t);
    std::mt19937 rng(Seed() + 1);
    for (auto& id : ids) id = static_cast<int32_t>(rng() % v);
    std::vector<float> want(t * d);
    Tensor hids(ids.data(), DType::kI32, {t}), htable(const_cast<void*>(tdata), dtype, {v, d});
    Tensor hout(want.data(), DType::kF32, {t, d});
    ASSERT_TRUE(EmbeddingLookup(hids, htable, hout).ok());
    auto dids = Upload(backend(), ids);
    auto dtable = dtype == DType::kF32 ? Upload(backend(), table) : Upload(backend(), table16);
    auto dout = DeviceArray::Poisoned(backend(), t * d * 4);
    Tensor tout = dout->View(DType::kF32, {t, d});
    absl::Status st = EmbeddingLookup(dids->View(DType::kI32, {t}), dtable->View(dtype, {v, d}), tout);
    ASSERT_TRUE(st.ok()) << st;
    ExpectClose(dout->Download<float>(), want, 0.0f, 0.0f, "Embedding");
    std::vector<int32_t> bad = ids;
    bad[10] = static_cast<int32_t>(v);
    auto dbad = Upload(backend(), bad);
    st = EmbeddingLookup(dbad->View(DType::kI32, {t}), dtable->View(dtype, {v, d}), tout);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  }
}

// Tensors on different devices are refused before any launch.
TEST_F(CudaOps, MixedDevicesAreRefused) {
  std::vector<float> x(4 * 8, 1.0f), w(8, 1.0f);
  auto dout = DeviceArray::Poisoned(backend(), x.size() * 4);
  Tensor tout = dout->View(DType::kF32, {4, 8});
  Tensor host_x(x.data(), DType::kF32, {4, 8}), host_w(w.data(), DType::kF32, {8});
  EXPECT_EQ(RmsNorm(host_x, host_w, 1e-6f, tout).code(), absl::StatusCode::kInvalidArgument);
  std::vector<float> gu(4 * 16, 1.0f);
  EXPECT_EQ(SwiGlu(Tensor(gu.data(), DType::kF32, {4, 16}), tout).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace cleave::kernels
