// CUDA embedding lookup: one block per token (grid-stride over tokens), threads across the row,
// each element widened to f32 as the CPU reference does (bf16: the bits shifted into the high
// half; f16: the exact hardware conversion), so results are bit-identical for non-NaN values.
//
// Ids live on the device, so their range check is too: the kernel records the first
// out-of-range token, writes zeros to its out row and reads no table row for it; the host reads
// the record back, which synchronises the stream. Unlike the CPU op, the rows of valid ids are
// still written when another id is bad.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/cuda_check.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ops.h"

namespace cleave::kernels::cuda {
namespace {

constexpr int kMaxThreads = 256;

enum class Kind { kF32, kBF16, kF16 };

template <Kind K>
using Storage = std::conditional_t<K == Kind::kF32, float, uint16_t>;

template <Kind K>
__device__ float Widen(Storage<K> v) {
  if constexpr (K == Kind::kF32) {
    return v;
  } else if constexpr (K == Kind::kBF16) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  } else {
    return __half2float(__ushort_as_half(v));
  }
}

// ld_table: table row stride in elements.
template <Kind K>
__global__ void EmbeddingKernel(const int32_t* ids, int64_t tokens, const Storage<K>* table, int64_t ld_table,
                                int64_t vocab, float* out, int64_t ldo, int64_t d, unsigned long long* bad) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int32_t id = ids[t];
    const bool ok = id >= 0 && id < vocab;
    if (!ok && threadIdx.x == 0) atomicMin(bad, static_cast<unsigned long long>(t));
    const Storage<K>* row = table + (ok ? static_cast<int64_t>(id) : 0) * ld_table;
    float* o = out + t * ldo;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) o[j] = ok ? Widen<K>(row[j]) : 0.0f;
  }
}

template <Kind K>
void Launch(unsigned int blocks, int threads, cudaStream_t s, const int32_t* ids, int64_t tokens, const void* table,
            int64_t ld_table, int64_t vocab, float* out, int64_t ldo, int64_t d, unsigned long long* bad) {
  EmbeddingKernel<K><<<blocks, threads, 0, s>>>(ids, tokens, static_cast<const Storage<K>*>(table), ld_table, vocab,
                                                out, ldo, d, bad);
}

}  // namespace

// Blocking: synchronises `stream` to report an out-of-range id.
absl::Status EmbeddingLookup(const Tensor& ids, const Tensor& table, Tensor& out, Stream* stream) {
  constexpr const char* kOp = "EmbeddingLookup";
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "out", out));
  const Device dev = out.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "ids", ids, dev, DType::kI32, {kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(kOp, "ids", ids));
  const DType dt = table.dtype();
  if (dt != DType::kF32 && dt != DType::kBF16 && dt != DType::kF16) {
    return ArgError(kOp, "table", table, "must be f32, bf16 or f16");
  }
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "table", table, dev, dt, {kAnyDim, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "table", table));
  const int64_t t = ids.dim(0), v = table.dim(0), d = table.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "out", out, dev, DType::kF32, {t, d}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "out", out));
  if (t == 0) return absl::OkStatus();  // with d == 0 the ids are still checked, as on CPU

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  FirstBadIndex bad(s);
  CLEAVE_RETURN_IF_ERROR(bad.Init());
  const int64_t ld_table = v > 1 ? table.stride(0) : d;
  const int64_t ldo = t > 1 ? out.stride(0) : d;
  const int threads = static_cast<int>(std::clamp<int64_t>((d + 31) / 32 * 32, 32, kMaxThreads));
  const unsigned int blocks = GridFor(t, 1, int64_t{1} << 30);
  const int32_t* id = ids.data_as<const int32_t>();
  float* o = out.data_as<float>();
  switch (dt) {
    case DType::kBF16:
      Launch<Kind::kBF16>(blocks, threads, s, id, t, table.data(), ld_table, v, o, ldo, d, bad.slot());
      break;
    case DType::kF16:
      Launch<Kind::kF16>(blocks, threads, s, id, t, table.data(), ld_table, v, o, ldo, d, bad.slot());
      break;
    default:
      Launch<Kind::kF32>(blocks, threads, s, id, t, table.data(), ld_table, v, o, ldo, d, bad.slot());
      break;
  }
  CLEAVE_CUDA_RETURN_IF_LAUNCH_ERROR("EmbeddingLookup launch");
  int64_t first = -1;
  CLEAVE_RETURN_IF_ERROR(bad.Read(&first));
  if (first < 0) return absl::OkStatus();
  int32_t bad_id = 0;
  CLEAVE_RETURN_IF_ERROR(ReadI32(id + first, s, &bad_id));
  return absl::InvalidArgumentError(absl::StrCat(kOp, ": ids[", first, "] = ", bad_id,
                                                 " is outside the vocabulary [0, ", v, ") of table ",
                                                 table.DebugString()));
}

}  // namespace cleave::kernels::cuda
