// Argument checks of the CUDA paged-attention ops and the device-side validation of their batch
// metadata. Shapes and dtypes are checked on the host before anything is launched, with the CPU
// op's messages (kernels/cpu/attention_plan.cc). query_start_loc, seq_lens and block_tables live on
// the device, so ValidateBatchKernel checks them there, in parallel over (sequence, block-table
// entry), exactly the conditions of the CPU's CheckBatchIndex; only on failure does the host copy
// the offending sequence's entries back to rebuild the CPU's message.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "paged_attention.cuh"

namespace cleave::kernels::cuda::attention {
namespace {

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

absl::Status OpError(const char* op, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", problem));
}

// The small i32 index tensors are read as plain arrays.
absl::Status CheckIndex(const char* op, const char* name, const Tensor& t, Device dev,
                        std::initializer_list<int64_t> shape) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, name, t, dev, DType::kI32, shape));
  return CheckContiguous(op, name, t);
}

// One thread per (sequence b, block-table entry i). Entry 0 of each sequence also checks the
// sequence's scalars; grid item 0 checks that query_start_loc runs from 0 to T. Every condition is
// CheckBatchIndex's, in 64 bits so that no i32 difference overflows.
__global__ void ValidateBatchKernel(Batch bt, bool decode, unsigned long long* bad) {
  const int64_t per_seq = bt.max_blocks > 0 ? bt.max_blocks : 1;
  const int64_t n = bt.num_seqs > 0 ? bt.num_seqs * per_seq : 1;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (idx == 0 && (bt.qsl[0] != 0 || bt.qsl[bt.num_seqs] != bt.num_tokens)) atomicMin(bad, 0ull);
    if (bt.num_seqs == 0) continue;
    const int64_t b = idx / per_seq, i = idx % per_seq;
    const int64_t q_len = int64_t{bt.qsl[b + 1]} - int64_t{bt.qsl[b]};
    const int64_t seq_len = bt.seq_lens[b];
    const int64_t blocks_needed = (seq_len + bt.block_size - 1) / bt.block_size;
    const bool scalars_ok =
        q_len >= 0 && (!decode || q_len == 1) && q_len <= seq_len && blocks_needed <= bt.max_blocks;
    if (!scalars_ok) {
      if (i == 0) atomicMin(bad, static_cast<unsigned long long>(b));
      continue;
    }
    if (q_len == 0) continue;
    const int64_t first_pos = seq_len - q_len;
    const int64_t first_visible = bt.window > 0 && first_pos - bt.window + 1 > 0 ? first_pos - bt.window + 1 : 0;
    if (i < first_visible / bt.block_size || i >= blocks_needed) continue;  // never read
    const int32_t id = bt.block_tables[b * bt.max_blocks + i];
    if (id < 0 || id >= bt.num_blocks) atomicMin(bad, static_cast<unsigned long long>(b));
  }
}

}  // namespace

absl::Status CheckCaches(const char* op, const Tensor& k_cache, const Tensor& v_cache, Device dev) {
  CLEAVE_RETURN_IF_ERROR(CheckOnDevice(op, "k_cache", k_cache, dev));
  const DType dt = k_cache.dtype();
  if (dt != DType::kF32 && dt != DType::kBF16) return ArgError(op, "k_cache", k_cache, "must be f32 or bf16");
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, "k_cache", k_cache, dev, dt, {kAnyDim, kAnyDim, kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(op, "k_cache", k_cache));
  if (k_cache.dim(1) == 0 || k_cache.dim(2) == 0 || k_cache.dim(3) == 0) {
    return ArgError(op, "k_cache", k_cache, "needs block_size, num_kv_heads and head_dim > 0");
  }
  if (k_cache.dim(3) > kMaxHeadDim) {
    return ArgError(op, "k_cache", k_cache, absl::StrCat("has head_dim above the CUDA kernels' ", kMaxHeadDim));
  }
  if (k_cache.dim(1) > kIntMax || k_cache.dim(2) > kIntMax) {
    return ArgError(op, "k_cache", k_cache, "exceeds the CUDA kernels' int range");
  }
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, "v_cache", v_cache, dev, dt,
                                     {k_cache.dim(0), k_cache.dim(1), k_cache.dim(2), k_cache.dim(3)}));
  return CheckContiguous(op, "v_cache", v_cache);
}

absl::Status CheckAttentionArgs(const char* op, const PagedAttentionArgs& a, Stream* stream, bool decode,
                                CallShape* shape) {
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(op, "out", a.out));
  const Device dev = a.out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(op, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, "q", a.q, dev, DType::kF32, {kAnyDim, kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(op, "q", a.q));
  CLEAVE_RETURN_IF_ERROR(CheckCaches(op, a.k_cache, a.v_cache, dev));
  const int64_t t = a.q.dim(0), hq = a.q.dim(1), dh = a.q.dim(2);
  const int64_t hk = a.k_cache.dim(2);
  if (hq == 0 || hq % hk != 0) {
    return OpError(op, absl::StrCat("num_q_heads ", hq, " (q ", a.q.DebugString(),
                                    ") must be a positive multiple of num_kv_heads ", hk, " (k_cache ",
                                    a.k_cache.DebugString(), ")"));
  }
  if (dh != a.k_cache.dim(3)) {
    return OpError(op, absl::StrCat("head_dim of q ", a.q.DebugString(), " differs from k_cache ",
                                    a.k_cache.DebugString()));
  }
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, "out", a.out, dev, DType::kF32, {t, hq, dh}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(op, "out", a.out));
  // B comes from seq_lens; the other two index tensors must agree with it.
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "seq_lens", a.seq_lens, dev, {kAnyDim}));
  const int64_t b = a.seq_lens.dim(0);
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "query_start_loc", a.query_start_loc, dev, {kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "block_tables", a.block_tables, dev, {kAnyDim, kAnyDim}));
  if (a.query_start_loc.dim(0) != b + 1 || a.block_tables.dim(0) != b) {
    return OpError(op, absl::StrCat("batch sizes disagree: seq_lens ", a.seq_lens.DebugString(), " gives B = ", b,
                                    ", so query_start_loc ", a.query_start_loc.DebugString(),
                                    " must be [B + 1] and block_tables ", a.block_tables.DebugString(),
                                    " must be [B, max_blocks_per_seq]"));
  }
  if (a.sliding_window < 0) {
    return OpError(op, absl::StrCat("sliding_window must be >= 0, got ", a.sliding_window));
  }
  if (!std::isfinite(a.scale)) return OpError(op, absl::StrCat("scale must be finite, got ", a.scale));
  if (t > kIntMax || b + 1 > kIntMax || hq > kIntMax || a.block_tables.dim(1) > kIntMax) {
    return OpError(op, absl::StrCat("q ", a.q.DebugString(), " / block_tables ", a.block_tables.DebugString(),
                                    " exceed the CUDA kernels' int range"));
  }
  if (decode && t != b) {
    return OpError(op, absl::StrCat("decode needs one query per sequence: q ", a.q.DebugString(), " has ", t,
                                    " tokens for ", b, " sequences"));
  }
  shape->device = dev;
  shape->num_tokens = t;
  shape->num_seqs = b;
  shape->num_q_heads = hq;
  shape->num_kv_heads = hk;
  shape->group = hq / hk;
  shape->head_dim = dh;
  shape->cache_dtype = a.k_cache.dtype();
  return absl::OkStatus();
}

Batch MakeBatch(const PagedAttentionArgs& a) {
  Batch bt;
  bt.qsl = a.query_start_loc.data_as<const int32_t>();
  bt.seq_lens = a.seq_lens.data_as<const int32_t>();
  bt.block_tables = a.block_tables.data_as<const int32_t>();
  bt.num_seqs = static_cast<int>(a.seq_lens.dim(0));
  bt.num_tokens = static_cast<int>(a.q.dim(0));
  bt.max_blocks = static_cast<int>(a.block_tables.dim(1));
  bt.block_size = static_cast<int>(a.k_cache.dim(1));
  bt.window = a.sliding_window;
  bt.num_blocks = a.k_cache.dim(0);
  bt.max_kv = a.block_tables.dim(1) * a.k_cache.dim(1);
  return bt;
}

absl::Status LaunchValidateBatch(const Batch& batch, bool decode, unsigned long long* bad, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t per_seq = batch.max_blocks > 0 ? batch.max_blocks : 1;
  const unsigned int blocks = GridFor(batch.num_seqs * per_seq, kThreads);
  ValidateBatchKernel<<<blocks, kThreads, 0, stream>>>(batch, decode, bad);
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("ValidateBatch launch");
  return absl::OkStatus();
}

// The checks of the CPU's CheckBatchIndex for one sequence, in its order and words.
absl::Status DescribeBadBatch(const char* op, const Batch& bt, bool decode, int64_t first_bad, cudaStream_t stream) {
  int32_t q_first = 0, q_last = 0;
  CLEAVE_RETURN_IF_ERROR(ReadI32(bt.qsl, stream, &q_first));
  CLEAVE_RETURN_IF_ERROR(ReadI32(bt.qsl + bt.num_seqs, stream, &q_last));
  if (q_first != 0 || q_last != bt.num_tokens) {
    return OpError(op, absl::StrCat("query_start_loc must run from 0 to T = ", bt.num_tokens, ", got ", q_first,
                                    " .. ", q_last));
  }
  const int64_t b = first_bad;
  if (b >= 0 && b < bt.num_seqs) {
    int32_t qs = 0, qe = 0, sl = 0;
    CLEAVE_RETURN_IF_ERROR(ReadI32(bt.qsl + b, stream, &qs));
    CLEAVE_RETURN_IF_ERROR(ReadI32(bt.qsl + b + 1, stream, &qe));
    CLEAVE_RETURN_IF_ERROR(ReadI32(bt.seq_lens + b, stream, &sl));
    const int64_t q_len = int64_t{qe} - int64_t{qs}, seq_len = sl;
    if (q_len < 0) {
      return OpError(op, absl::StrCat("query_start_loc decreases at sequence ", b, ": ", qs, " -> ", qe));
    }
    if (decode && q_len != 1) {
      return OpError(op, absl::StrCat("decode needs exactly one new token per sequence; sequence ", b, " has ",
                                      q_len));
    }
    if (q_len > seq_len) {
      return OpError(op, absl::StrCat("sequence ", b, " has ", q_len, " new tokens but seq_len ", seq_len));
    }
    const int64_t blocks_needed = (seq_len + bt.block_size - 1) / bt.block_size;
    if (blocks_needed > bt.max_blocks) {
      return OpError(op, absl::StrCat("sequence ", b, " has seq_len ", seq_len, " = ", blocks_needed, " blocks of ",
                                      bt.block_size, " but block_tables rows hold ", bt.max_blocks));
    }
    if (blocks_needed > 0) {
      std::vector<int32_t> row(static_cast<size_t>(blocks_needed));
      CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(row.data(), bt.block_tables + b * bt.max_blocks,
                                                  row.size() * sizeof(int32_t), cudaMemcpyDeviceToHost, stream));
      CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
      const int64_t first_pos = seq_len - q_len;
      const int64_t first_visible = bt.window > 0 && first_pos - bt.window + 1 > 0 ? first_pos - bt.window + 1 : 0;
      for (int64_t i = first_visible / bt.block_size; i < blocks_needed; ++i) {
        if (row[i] < 0 || row[i] >= bt.num_blocks) {
          return OpError(op, absl::StrCat("block_tables[", b, "][", i, "] = ", row[i], " is outside the cache's ",
                                          bt.num_blocks, " blocks"));
        }
      }
    }
  }
  // Unreachable unless the metadata changed while the op ran.
  return OpError(op, absl::StrCat("the batch metadata of sequence ", b, " was rejected on the device"));
}

absl::Status RunChecked(const char* op, const PagedAttentionArgs& args, Stream* stream, bool decode,
                        LaunchFn launch) {
  CallShape cs;
  CLEAVE_RETURN_IF_ERROR(CheckAttentionArgs(op, args, stream, decode, &cs));
  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(cs.device.index));
  const cudaStream_t s = NativeStream(stream);
  FirstBadIndex bad(s);
  CLEAVE_RETURN_IF_ERROR(bad.Init());
  const Batch bt = MakeBatch(args);
  CLEAVE_RETURN_IF_ERROR(LaunchValidateBatch(bt, decode, bad.slot(), s));
  CLEAVE_RETURN_IF_ERROR(launch(args, cs, bt, s));
  int64_t first_bad = -1;
  CLEAVE_RETURN_IF_ERROR(bad.Read(&first_bad));
  if (first_bad < 0) return absl::OkStatus();
  return DescribeBadBatch(op, bt, decode, first_bad, s);
}

}  // namespace cleave::kernels::cuda::attention
