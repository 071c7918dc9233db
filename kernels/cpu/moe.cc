// CPU mixture-of-experts (see moe.h).
//
// MoeRoute is per token (softmax, top-k) followed by a counting sort of the T*k slots by expert.
// MoeExperts gathers each expert's rows into one contiguous block and runs the block through three
// Linear calls, so an expert's weights are read once per pass however many tokens chose it; the
// parallelism is Linear's own (over the block's output tiles), and experts run one after another:
// splitting the pool across experts instead would leave cores idle whenever the load is uneven,
// which routing makes the common case. The un-permute sums each token's k expert rows in slot
// order with a fixed operation sequence, so with Linear in batch-invariant mode a token's output
// row is bitwise independent of what else is in the batch.
//
// The permutation builder and the routing check live in internal/moe_permutation.h, shared with
// the CUDA backend (kernels/cuda/moe/), to which every entry point here forwards when its output
// (for MoeRoute: the router logits) is on a CUDA device.
#include "cleave/kernels/moe.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/activation.h"
#include "cleave/kernels/cuda_moe_ops.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/internal/moe_permutation.h"
#include "parallel.h"
#include "simd.h"

namespace cleave::kernels {
namespace {

using moe_internal::kInt32Max;
// Elements of work per ParallelFor chunk below which the pool hand-off costs more than it saves.
constexpr int64_t kMinWorkPerChunk = 16384;

int64_t MinChunk(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWorkPerChunk / std::max<int64_t>(1, work_per_item));
}

// Row stride of a 2-D view; a single row's stride is meaningless, so it is taken as packed.
int64_t RowStride(const Tensor& t) { return t.dim(0) > 1 ? t.stride(0) : t.dim(1); }

// ---------------------------------------------------------------------------------------------
// MoeRoute

// Slot order: descending probability, the lower expert id first on ties (torch.topk on CPU). NaN
// ranks above every number, as in torch.topk, which also keeps this a strict weak order (and
// std::partial_sort well-defined) whatever the logits hold.
struct RanksBefore {
  const float* probs;
  bool operator()(int32_t a, int32_t b) const {
    const float pa = probs[a], pb = probs[b];
    const bool na = std::isnan(pa), nb = std::isnan(pb);
    if (na != nb) return na;
    if (na || pa == pb) return a < b;
    return pa > pb;
  }
};

// One token: f32 softmax over its E logits (max-subtracted), then its top-k slots. `probs` and
// `order` are scratch of E entries.
void RouteToken(const float* logits, int num_experts, int top_k, bool renormalize, float* probs,
                int32_t* order, int32_t* ids, float* weights) {
  float max = logits[0];
  for (int e = 1; e < num_experts; ++e) max = std::max(max, logits[e]);
  float sum = 0.0f;
  for (int e = 0; e < num_experts; ++e) {
    probs[e] = std::exp(logits[e] - max);
    sum += probs[e];
  }
  for (int e = 0; e < num_experts; ++e) probs[e] /= sum;

  std::iota(order, order + num_experts, 0);
  std::partial_sort(order, order + top_k, order + num_experts, RanksBefore{probs});
  float top_sum = 0.0f;
  for (int j = 0; j < top_k; ++j) {
    ids[j] = order[j];
    weights[j] = probs[order[j]];
    top_sum += weights[j];
  }
  if (renormalize) {
    for (int j = 0; j < top_k; ++j) weights[j] /= top_sum;
  }
}

// ---------------------------------------------------------------------------------------------
// MoeExperts argument checks

// weights.<name>[e]: f32/bf16/f16, contiguous, of shape [rows, cols], on the CPU.
absl::Status CheckExpertWeight(const char* op, const char* name, int e, const Tensor& w,
                               int64_t rows, int64_t cols) {
  const std::string label = absl::StrCat("weights.", name, "[", e, "]");
  CLEAVE_RETURN_IF_ERROR(cpu::CheckOnCpu(op, label.c_str(), w));
  if (w.dtype() != DType::kF32 && w.dtype() != DType::kBF16 && w.dtype() != DType::kF16) {
    return cpu::ArgError(op, label.c_str(), w, "must be f32, bf16 or f16");
  }
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(op, label.c_str(), w, w.dtype(), {rows, cols}));
  return cpu::CheckContiguous(op, label.c_str(), w);
}

// Every expert's gate/up [F, D] and down [D, F], with one F for all; returns F.
absl::Status CheckExpertWeights(const char* op, const MoeExpertWeights& weights, int64_t d,
                                int64_t& f) {
  const size_t num_experts = weights.gate.size();
  if (num_experts == 0 || weights.up.size() != num_experts || weights.down.size() != num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": weights hold ", weights.gate.size(), " gate, ", weights.up.size(), " up and ",
        weights.down.size(), " down projections; expected the same number >= 1 of each"));
  }
  if (num_experts > static_cast<size_t>(kInt32Max)) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", num_experts, " experts"));
  }
  CLEAVE_RETURN_IF_ERROR(CheckExpertWeight(op, "gate", 0, weights.gate[0], cpu::kAnyDim, d));
  f = weights.gate[0].dim(0);
  for (int e = 0; e < static_cast<int>(num_experts); ++e) {
    CLEAVE_RETURN_IF_ERROR(CheckExpertWeight(op, "gate", e, weights.gate[e], f, d));
    CLEAVE_RETURN_IF_ERROR(CheckExpertWeight(op, "up", e, weights.up[e], f, d));
    CLEAVE_RETURN_IF_ERROR(CheckExpertWeight(op, "down", e, weights.down[e], d, f));
  }
  return absl::OkStatus();
}

// True when the memory spanned by two 2-D f32 views intersects.
bool Overlap(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto span = [](const Tensor& t) {
    const char* begin = static_cast<const char*>(t.data());
    const int64_t elems = (t.dim(0) - 1) * RowStride(t) + t.dim(1);
    return std::pair{begin, begin + elems * static_cast<int64_t>(sizeof(float))};
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

absl::Status CheckExpertsArgs(const char* op, const Tensor& x, const MoeRouting& routing,
                              const MoeExpertWeights& weights, MoeWorkspace& ws, const Tensor& out,
                              Stream* stream, int64_t& f) {
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(op, stream));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(op, "x", x, DType::kF32, {cpu::kAnyDim, cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(op, "x", x));
  const int64_t t = x.dim(0), d = x.dim(1);
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(op, "out", out, DType::kF32, {t, d}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(op, "out", out));
  if (t > 1 && out.stride(0) < d) return cpu::ArgError(op, "out", out, "has overlapping rows");
  if (Overlap(x, out)) return cpu::ArgError(op, "out", out, "must not alias x");
  CLEAVE_RETURN_IF_ERROR(CheckExpertWeights(op, weights, d, f));
  return moe_internal::CheckMoeRoutingAndInvert(op, routing, t, weights.num_experts(), ws.slot_rows);
}

// ---------------------------------------------------------------------------------------------
// MoeExperts compute

template <typename T>
T* Grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

#if CLEAVE_CPU_AVX2
inline float MulAdd(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
#else
inline float MulAdd(float a, float b, float c) { return a * b + c; }
#endif

// out[i] = w * src[i].
void ScaleRow(float w, const float* src, int64_t n, float* out) {
  int64_t i = 0;
#if CLEAVE_CPU_AVX2
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(wv, _mm256_loadu_ps(src + i)));
#endif
  for (; i < n; ++i) out[i] = w * src[i];
}

// out[i] = fma(w, src[i], out[i]): one rounding per element, the same in the vector body and tail.
void AxpyRow(float w, const float* src, int64_t n, float* out) {
  int64_t i = 0;
#if CLEAVE_CPU_AVX2
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(out + i,
                     _mm256_fmadd_ps(wv, _mm256_loadu_ps(src + i), _mm256_loadu_ps(out + i)));
  }
#endif
  for (; i < n; ++i) out[i] = MulAdd(w, src[i], out[i]);
}

// permuted_x[r] = x[token of permuted_slots[r]].
void GatherRows(const Tensor& x, const MoeRouting& routing, float* permuted_x) {
  const int64_t d = x.dim(1), ldx = RowStride(x);
  const float* src = x.data_as<const float>();
  const int64_t rows = static_cast<int64_t>(routing.permuted_slots.size());
  cpu::ParallelFor(rows, MinChunk(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t token = routing.permuted_slots[r] / routing.top_k;
      std::memcpy(permuted_x + r * d, src + token * ldx, static_cast<size_t>(d) * sizeof(float));
    }
  });
}

// Expert e's block of rows through SwiGLU(x gate^T, x up^T) down^T: three GEMMs over all its rows.
absl::Status RunExpert(int e, const MoeRouting& routing, const MoeExpertWeights& weights, int64_t d,
                       int64_t f, MoeWorkspace& ws) {
  const int64_t r0 = routing.expert_offsets[e];
  const int64_t n = routing.expert_offsets[e + 1] - r0;
  if (n == 0) return absl::OkStatus();
  Tensor x(ws.permuted_x.data() + r0 * d, DType::kF32, {n, d});
  Tensor gate_up(ws.gate_up.data() + r0 * 2 * f, DType::kF32, {n, 2 * f});
  Tensor gate = gate_up.Narrow(1, 0, f), up = gate_up.Narrow(1, f, f);
  Tensor act(ws.act.data() + r0 * f, DType::kF32, {n, f});
  Tensor y(ws.expert_out.data() + r0 * d, DType::kF32, {n, d});
  CLEAVE_RETURN_IF_ERROR(Linear(x, weights.gate[e], nullptr, gate));
  CLEAVE_RETURN_IF_ERROR(Linear(x, weights.up[e], nullptr, up));
  CLEAVE_RETURN_IF_ERROR(SwiGlu(gate_up, act));
  return Linear(act, weights.down[e], nullptr, y);
}

// out[t] = sum over slots j in order of topk_weights[t*k + j] * rows[row_of(t*k + j)]: the one
// combine of MoeExperts (rows permuted, row_of = slot_rows) and MoeCombine (row_of = identity).
template <typename RowOf>
void WeightedCombine(const MoeRouting& routing, const float* rows, RowOf row_of, int64_t d, Tensor& out) {
  const int64_t t = out.dim(0), k = routing.top_k, ldo = RowStride(out);
  float* o = out.data_as<float>();
  cpu::ParallelFor(t, MinChunk(k * d), [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const int64_t s0 = token * k;
      float* dst = o + token * ldo;
      ScaleRow(routing.topk_weights[s0], rows + row_of(s0) * d, d, dst);
      for (int64_t j = 1; j < k; ++j) {
        AxpyRow(routing.topk_weights[s0 + j], rows + row_of(s0 + j) * d, d, dst);
      }
    }
  });
}

void Unpermute(const MoeRouting& routing, const MoeWorkspace& ws, int64_t d, Tensor& out) {
  WeightedCombine(routing, ws.expert_out.data(),
                  [&](int64_t s) { return static_cast<int64_t>(ws.slot_rows[s]); }, d, out);
}

}  // namespace

absl::Status MoeRoute(const Tensor& router_logits, int top_k, bool renormalize, MoeRouting& routing,
                      Stream* stream) {
#if CLEAVE_WITH_CUDA
  // No output tensor: the logits' device decides.
  if (!router_logits.device().is_cpu()) {
    return cuda::MoeRoute(router_logits, top_k, renormalize, routing, stream);
  }
#endif
  constexpr const char* kOp = "MoeRoute";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "router_logits", router_logits, DType::kF32,
                                          {cpu::kAnyDim, cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "router_logits", router_logits));
  const int64_t t = router_logits.dim(0), num_experts = router_logits.dim(1);
  if (num_experts > kInt32Max) {
    return cpu::ArgError(kOp, "router_logits", router_logits, "has more experts than int32 ids");
  }
  if (top_k < 1 || top_k > num_experts) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": top_k ", top_k, " must be in [1, ",
                                                   num_experts, "] (router_logits ",
                                                   router_logits.DebugString(), ")"));
  }
  if (t * top_k > kInt32Max) {
    return cpu::ArgError(kOp, "router_logits", router_logits,
                         absl::StrCat("with top_k ", top_k, " has more slots than int32 indexes"));
  }

  routing.num_tokens = static_cast<int>(t);
  routing.num_experts = static_cast<int>(num_experts);
  routing.top_k = top_k;
  const size_t slots = static_cast<size_t>(t * top_k);
  routing.topk_ids.resize(slots);
  routing.topk_weights.resize(slots);
  const float* logits = router_logits.data_as<const float>();
  const int64_t ld = RowStride(router_logits);
  cpu::ParallelFor(t, MinChunk(8 * num_experts), [&](int64_t begin, int64_t end) {
    std::vector<float> probs(static_cast<size_t>(num_experts));
    std::vector<int32_t> order(static_cast<size_t>(num_experts));
    for (int64_t i = begin; i < end; ++i) {
      RouteToken(logits + i * ld, routing.num_experts, top_k, renormalize, probs.data(),
                 order.data(), routing.topk_ids.data() + i * top_k,
                 routing.topk_weights.data() + i * top_k);
    }
  });
  moe_internal::BuildMoePermutation(routing);
  routing.device.reset();  // the host fields changed; no device mirror of them
  return absl::OkStatus();
}

absl::Status MoeExperts(const Tensor& x, const MoeRouting& routing, const MoeExpertWeights& weights,
                        MoeWorkspace& ws, Tensor& out, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!out.device().is_cpu()) return cuda::MoeExperts(x, routing, weights, ws, out, stream);
#endif
  constexpr const char* kOp = "MoeExperts";
  int64_t f = 0;
  CLEAVE_RETURN_IF_ERROR(CheckExpertsArgs(kOp, x, routing, weights, ws, out, stream, f));
  const int64_t d = x.dim(1);
  const size_t rows = routing.permuted_slots.size();
  if (rows == 0 || d == 0) return absl::OkStatus();

  GatherRows(x, routing, Grow(ws.permuted_x, rows * static_cast<size_t>(d)));
  Grow(ws.gate_up, rows * static_cast<size_t>(2 * f));
  Grow(ws.act, rows * static_cast<size_t>(f));
  Grow(ws.expert_out, rows * static_cast<size_t>(d));
  for (int e = 0; e < weights.num_experts(); ++e) {
    CLEAVE_RETURN_IF_ERROR(RunExpert(e, routing, weights, d, f, ws));
  }
  Unpermute(routing, ws, d, out);
  return absl::OkStatus();
}

absl::Status MoeCombine(const Tensor& slot_out, const MoeRouting& routing, Tensor& out,
                        Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!out.device().is_cpu()) return cuda::MoeCombine(slot_out, routing, out, stream);
#endif
  constexpr const char* kOp = "MoeCombine";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "out", out, DType::kF32, {cpu::kAnyDim, cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "out", out));
  const int64_t t = out.dim(0), d = out.dim(1);
  if (t > 1 && out.stride(0) < d) return cpu::ArgError(kOp, "out", out, "has overlapping rows");
  const int64_t k = routing.top_k;
  if (routing.num_tokens != t || k < 1 ||
      routing.topk_weights.size() != static_cast<size_t>(t * k)) {
    return absl::InvalidArgumentError(absl::StrCat(kOp, ": routing is for ", routing.num_tokens,
                                                   " tokens with top_k ", k, ", out has ", t, " rows"));
  }
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "slot_out", slot_out, DType::kF32, {t * k, d}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous(kOp, "slot_out", slot_out));
  if (Overlap(slot_out, out)) return cpu::ArgError(kOp, "out", out, "must not alias slot_out");
  if (t == 0 || d == 0) return absl::OkStatus();
  WeightedCombine(routing, slot_out.data_as<const float>(), [](int64_t s) { return s; }, d, out);
  return absl::OkStatus();
}

absl::Status SigmoidGatedAdd(const Tensor& gate_logit, const Tensor& y, Tensor& out,
                             Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!out.device().is_cpu()) return cuda::SigmoidGatedAdd(gate_logit, y, out, stream);
#endif
  constexpr const char* kOp = "SigmoidGatedAdd";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "y", y, DType::kF32, {cpu::kAnyDim, cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "y", y));
  const int64_t t = y.dim(0), d = y.dim(1);
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "gate_logit", gate_logit, DType::kF32, {t, 1}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "out", out, DType::kF32, {t, d}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride(kOp, "out", out));
  if (t > 1 && out.stride(0) < d) return cpu::ArgError(kOp, "out", out, "has overlapping rows");
  if (t == 0 || d == 0) return absl::OkStatus();

  const float* g = gate_logit.data_as<const float>();
  const int64_t ldg = t > 1 ? gate_logit.stride(0) : 1;
  const float* src = y.data_as<const float>();
  float* dst = out.data_as<float>();
  const int64_t ldy = RowStride(y), ldo = RowStride(out);
  cpu::ParallelFor(t, MinChunk(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float s = 1.0f / (1.0f + std::exp(-g[i * ldg]));
      AxpyRow(s, src + i * ldy, d, dst + i * ldo);
    }
  });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
