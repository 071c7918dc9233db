// The device sampler's kernels (see sampling_kernels.cuh for the stages and sampling_block.cuh
// for the conventions). Filters keep best-first prefixes, so each is a Cut; the draw walks the
// survivors in id order with the host's uniform, as the CPU does.
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "sampling_block.cuh"
#include "sampling_kernels.cuh"

namespace cleave::kernels::cuda::sampling {
namespace {

constexpr unsigned kNoBad = 0xffffffffu;

// The m highest raw logits (m <= 20), highest first, as logprobs.
__device__ void TopLogprobs(const float* raw, int n, int m, double log_z, SampleRowOutcome* out, Shared& sm) {
  const Cut cut = SelectKth(raw, n, m, sm);
  if (threadIdx.x == 0) sm.ncol = 0;
  __syncthreads();
  ForRow(raw, n, [&](int j, float v, bool ok) {
    if (ok && Kept(OrderKey(v), j, cut)) {
      const int slot = atomicAdd(&sm.ncol, 1);
      if (slot < kMaxDeviceTopLogprobs) {
        sm.col_id[slot] = j;
        sm.col_v[slot] = v;
      }
    }
  });
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < m) {  // exactly m were collected; rank each among them
    const int i = static_cast<int>(threadIdx.x);
    const uint32_t key = OrderKey(sm.col_v[i]);
    const int32_t id = sm.col_id[i];
    int rank = 0;
    for (int o = 0; o < m; ++o) {
      const uint32_t ko = OrderKey(sm.col_v[o]);
      if (ko > key || (ko == key && sm.col_id[o] < id)) ++rank;
    }
    out->top_ids[rank] = id;
    out->top_logprobs[rank] = static_cast<float>(static_cast<double>(sm.col_v[i]) - log_z);
  }
  if (threadIdx.x == 0) out->num_top = m;
  __syncthreads();
}

// Thread 0 writes the row's token (or the all-masked error) and its raw logprob.
__device__ void Finish(SampleRowOutcome* out, const float* raw, int32_t token, bool want_logprobs, double log_z) {
  if (threadIdx.x != 0) return;
  if (token < 0) {
    out->error = kRowAllMasked;
    return;
  }
  out->token = token;
  if (want_logprobs) out->logprob = static_cast<float>(static_cast<double>(raw[token]) - log_z);
  out->error = kRowOk;
}

// ApplyPenalties' arithmetic, rounding for rounding. GCC at -O3 -march=x86-64-v3 (the Release
// flags) contracts `v -= f * count` into one fused multiply-add; the FMA here matches that.
__device__ float PenalizedLogit(float v, uint32_t count, const SampleRowSpec& p) {
  const float rep = p.repetition_penalty;
  if (rep != 1.0f) v = v > 0.0f ? __fdiv_rn(v, rep) : __fmul_rn(v, rep);
  v = __fmaf_rn(-p.frequency_penalty, static_cast<float>(count), v);
  if (count > 0) v = __fsub_rn(v, p.presence_penalty);
  if (v == INFINITY) v = FLT_MAX;
  return v;
}

__global__ void __launch_bounds__(kThreads) PenalizeKernel(Launch l) {
  const RowParams& rp = l.rows[blockIdx.x];
  if (rp.work == nullptr) return;
  for (int j = threadIdx.x; j < l.vocab; j += blockDim.x) rp.work[j] = rp.raw[j];
  __syncthreads();  // the copy lands before the rewritten tokens
  const SampleRowSpec& p = rp.spec;
  for (int e = threadIdx.x; e < p.penalty_count; e += blockDim.x) {
    const PenaltyEntry pe = l.entries[p.penalty_begin + e];
    if (pe.token < 0 || pe.token >= l.vocab) continue;  // the host passes only in-vocab ids
    rp.work[pe.token] = PenalizedLogit(rp.raw[pe.token], pe.output_count, p);
  }
}

__global__ void __launch_bounds__(kThreads) SampleStage1Kernel(Launch l) {
  __shared__ Shared sm;
  const int row = blockIdx.x;
  const RowParams& rp = l.rows[row];
  const SampleRowSpec p = rp.spec;
  SampleRowOutcome* out = l.outcomes + row;
  if (!p.active) {
    if (threadIdx.x == 0) out->error = kRowSkipped;
    return;
  }
  const int n = l.vocab;
  const float* raw = rp.raw;
  const float* pen = rp.penalized;
  const bool penalized = pen != raw;

  // Pass 1: NaN / +inf on the raw row, its max; argmax and finite count of the penalised row.
  float raw_max = -INFINITY;
  unsigned bad = kNoBad;  // 2 * index + (0: NaN, 1: +inf), lowest index first
  Best best{-INFINITY, kNoId};
  int finite = 0;
  ForRow(raw, n, [&](int j, float r, bool ok) {
    if (!ok) return;
    if (isnan(r) || r == INFINITY) bad = min(bad, 2u * static_cast<unsigned>(j) + (isnan(r) ? 0u : 1u));
    raw_max = fmaxf(raw_max, r);
    const float v = penalized ? pen[j] : r;
    if (v != -INFINITY) {
      ++finite;
      if (v > best.v || (v == best.v && j < best.id)) best = Best{v, j};
    }
  });
  bad = AllReduce(bad, MinOp{}, sm.cub.u, sm.bu);
  if (bad != kNoBad) {
    if (threadIdx.x == 0) {
      out->error = (bad & 1u) ? kRowPosInf : kRowNaN;
      out->bad_index = static_cast<int32_t>(bad >> 1);
    }
    return;
  }
  raw_max = AllReduce(raw_max, MaxOp{}, sm.cub.f, sm.bf);
  best = AllReduce(best, BetterOp{}, sm.cub.best, sm.bb);
  finite = AllReduce(finite, SumOp{}, sm.cub.i, sm.bi);

  // Logprobs: log-softmax of the raw row (the CPU's LogSumExp: f32 exp terms, double sum).
  const bool want_logprobs = p.want_logprobs != 0;
  double log_z = 0.0;
  if (want_logprobs) {
    double sum = 0.0;
    if (raw_max != -INFINITY) {
      ForRow(raw, n, [&](int, float r, bool ok) {
        if (ok) sum += ExpF(__fsub_rn(r, raw_max));
      });
    }
    sum = AllReduce(sum, SumOp{}, sm.cub.d, sm.bd);
    log_z = raw_max == -INFINITY ? -static_cast<double>(INFINITY) : static_cast<double>(raw_max) + log(sum);
    const int m = min(p.top_logprobs, n);
    if (m > 0) {
      TopLogprobs(raw, n, m, log_z, out, sm);
    } else if (threadIdx.x == 0) {
      out->num_top = 0;
    }
  }

  if (p.temperature == 0.0f) {
    Finish(out, raw, best.v == -INFINITY ? -1 : best.id, want_logprobs, log_z);
    return;
  }
  if (finite == 0) {
    Finish(out, raw, -1, want_logprobs, log_z);
    return;
  }
  const float max_logit = best.v, temperature = p.temperature;
  Cut cutk = KeepAll();
  int kept_k = finite;
  if (p.top_k > 0 && p.top_k < finite) {
    cutk = SelectKth(pen, n, p.top_k, sm);
    kept_k = p.top_k;
  }
  double total = 0.0;  // weight of the top-k set
  ForRow(pen, n, [&](int j, float v, bool ok) {
    if (ok && v != -INFINITY && Kept(OrderKey(v), j, cutk)) total += Weight(v, max_logit, temperature);
  });
  total = AllReduce(total, SumOp{}, sm.cub.d, sm.bd);
  // min-p, plus the CPU's "too light to matter to top-p" drop (it never moves the top-p cut,
  // and it keeps the sort segments short).
  double min_weight = p.min_p;
  if (p.top_p < 1.0f) {
    min_weight = fmax(min_weight, 0.5 * (1.0 - static_cast<double>(p.top_p)) * total / static_cast<double>(kept_k));
  }
  auto weight_of = [&](int j, float v) -> float {
    if (v == -INFINITY || !Kept(OrderKey(v), j, cutk)) return -1.0f;
    const float w = Weight(v, max_logit, temperature);
    return static_cast<double>(w) >= min_weight ? w : -1.0f;
  };
  if (p.top_p >= 1.0f) {
    Finish(out, raw, Draw(pen, n, p.uniform, weight_of, sm), want_logprobs, log_z);
    return;
  }

  // Top-p: write the survivors, in id order, into the row's sort segment for stage 2.
  int begin, end;
  ChunkOf(n, begin, end);
  int local = 0;
  for (int j = begin; j < end; ++j) local += weight_of(j, pen[j]) >= 0.0f ? 1 : 0;
  int before, count;
  cub::BlockScan<int, kThreads>(sm.cub.scan_i).ExclusiveSum(local, before, count);
  const int64_t base = static_cast<int64_t>(rp.sort_slot) * n;
  uint32_t* keys = l.sort_keys + base;
  int32_t* ids = l.sort_ids + base;
  for (int j = begin, o = before; j < end; ++j) {
    const float v = pen[j];
    if (weight_of(j, v) >= 0.0f) {
      keys[o] = OrderKey(v);
      ids[o] = j;
      ++o;
    }
  }
  if (threadIdx.x == 0) {
    l.seg_end[rp.sort_slot] = static_cast<int32_t>(base + count);
    RowState& st = l.states[row];
    st.pending = 1;
    st.count = count;
    st.max_logit = max_logit;
    st.cutk_key = cutk.key;
    st.cutk_id = cutk.id;
    st.min_weight = min_weight;
    st.topp_target = static_cast<double>(p.top_p) * total;
    st.log_z = log_z;
    out->error = kRowOk;  // the token comes from stage 2
  }
}

__global__ void __launch_bounds__(kThreads) SampleStage2Kernel(Launch l) {
  __shared__ Shared sm;
  const int row = blockIdx.x;
  const RowState st = l.states[row];
  if (!st.pending) return;
  const RowParams& rp = l.rows[row];
  const SampleRowSpec p = rp.spec;
  const int n = l.vocab;
  const int64_t base = static_cast<int64_t>(rp.sort_slot) * n;
  const float max_logit = st.max_logit, temperature = p.temperature;
  const Cut cutp = TopPCut(l.sorted_keys + base, l.sorted_ids + base, st.count, max_logit, temperature,
                           st.topp_target, sm);
  const Cut cutk{st.cutk_key, st.cutk_id};
  const double min_weight = st.min_weight;
  auto weight_of = [&](int j, float v) -> float {
    if (v == -INFINITY) return -1.0f;
    const uint32_t key = OrderKey(v);
    if (!Kept(key, j, cutk) || !Kept(key, j, cutp)) return -1.0f;
    const float w = Weight(v, max_logit, temperature);
    return static_cast<double>(w) >= min_weight ? w : -1.0f;
  };
  const int32_t token = Draw(rp.penalized, n, p.uniform, weight_of, sm);
  Finish(l.outcomes + row, rp.raw, token, p.want_logprobs != 0, st.log_z);
}

}  // namespace

cudaError_t LaunchPenalize(const Launch& l, cudaStream_t stream) {
  PenalizeKernel<<<l.num_rows, kThreads, 0, stream>>>(l);
  return cudaGetLastError();
}

cudaError_t LaunchStage1(const Launch& l, cudaStream_t stream) {
  SampleStage1Kernel<<<l.num_rows, kThreads, 0, stream>>>(l);
  return cudaGetLastError();
}

cudaError_t LaunchStage2(const Launch& l, cudaStream_t stream) {
  SampleStage2Kernel<<<l.num_rows, kThreads, 0, stream>>>(l);
  return cudaGetLastError();
}

}  // namespace cleave::kernels::cuda::sampling
