// Host side of the device sampler: checks, one stream-ordered workspace per call, the launches
// (penalties, stage 1, CUB's segmented sort for top-p rows, stage 2) and the single copy back.
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <vector>

#include "../common/cuda_check.h"
#include "cleave/common/status.h"
#include "sampling_cuda.h"
#include "sampling_kernels.cuh"

namespace cleave::kernels::cuda {
namespace {

constexpr const char* kOp = "SampleRows";

size_t Align(size_t bytes) { return (bytes + 255) & ~size_t{255}; }

// Byte offsets of one call's arrays in its workspace. The first four are uploaded in one copy.
struct Layout {
  size_t params, entries, seg_begin, seg_end;  // uploaded
  size_t outcomes, states, work, keys0, keys1, ids0, ids1, temp, total;
};

Layout MakeLayout(int64_t rows, int64_t num_entries, int64_t penalized_rows, int64_t slots, int64_t vocab,
                  size_t temp_bytes) {
  Layout l{};
  size_t at = 0;
  auto take = [&at](size_t bytes) {
    const size_t offset = at;
    at += Align(bytes);
    return offset;
  };
  const size_t items = static_cast<size_t>(slots * vocab);
  l.params = take(sizeof(sampling::RowParams) * rows);
  l.entries = take(sizeof(PenaltyEntry) * num_entries);
  l.seg_begin = take(sizeof(int32_t) * slots);
  l.seg_end = take(sizeof(int32_t) * slots);
  l.outcomes = take(sizeof(SampleRowOutcome) * rows);
  l.states = take(sizeof(sampling::RowState) * rows);
  l.work = take(sizeof(float) * static_cast<size_t>(penalized_rows * vocab));
  l.keys0 = take(sizeof(uint32_t) * items);
  l.keys1 = take(sizeof(uint32_t) * items);
  l.ids0 = take(sizeof(int32_t) * items);
  l.ids1 = take(sizeof(int32_t) * items);
  l.temp = take(temp_bytes);
  l.total = at;
  return l;
}


// CUB's segmented sort: query (temp == nullptr) or run. Descending by key, stable, so equal keys
// keep stage 1's id order.
cudaError_t SortSegments(void* temp, size_t& temp_bytes, cub::DoubleBuffer<uint32_t>& keys,
                         cub::DoubleBuffer<int32_t>& ids, int items, int slots, const int32_t* begin,
                         const int32_t* end, cudaStream_t stream) {
  return cub::DeviceSegmentedRadixSort::SortPairsDescending(temp, temp_bytes, keys, ids, items, slots, begin, end, 0,
                                                            32, stream);
}

}  // namespace

absl::Status CheckSampleRowsArgs(const Tensor& logits, int64_t rows, Stream* stream) {
  CLEAVE_RETURN_IF_ERROR(CheckCudaDevice(kOp, "logits", logits));
  const Device dev = logits.device();
  CLEAVE_RETURN_IF_ERROR(CheckStream(kOp, stream, dev));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(kOp, "logits", logits, dev, DType::kF32, {rows, kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(CheckUnitInnerStride(kOp, "logits", logits));
  const int64_t vocab = logits.dim(1);
  if (vocab < 1 || vocab >= (int64_t{1} << 30)) {
    return ArgError(kOp, "logits", logits, "must have between 1 and 2^30 - 1 columns");
  }
  if (rows > (int64_t{1} << 30)) return ArgError(kOp, "logits", logits, "has more than 2^30 rows");
  return absl::OkStatus();
}

absl::Status SampleRowsOnDevice(const Tensor& logits, const SampleRowSpec* specs, int64_t rows,
                                const PenaltyEntry* entries, int64_t num_entries, SampleRowOutcome* outcomes,
                                Stream* stream) {
  CLEAVE_RETURN_IF_ERROR(CheckSampleRowsArgs(logits, rows, stream));
  const Device dev = logits.device();
  const int64_t vocab = logits.dim(1);
  if (rows == 0) return absl::OkStatus();
  if (num_entries < 0 || num_entries >= (int64_t{1} << 31)) {
    return absl::InvalidArgumentError("SampleRows: too many penalty entries");
  }
  const int64_t ld = rows > 1 ? logits.stride(0) : vocab;

  // Host copy of the per-row launch params; device pointers are filled once the workspace exists.
  std::vector<sampling::RowParams> params(rows);
  int64_t penalized_rows = 0, slots = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const SampleRowSpec& s = specs[r];
    params[r].spec = s;
    params[r].sort_slot = -1;
    if (!s.active) continue;
    if (s.penalty_count < 0 || s.penalty_begin < 0 || s.penalty_begin + int64_t{s.penalty_count} > num_entries) {
      return absl::InvalidArgumentError("SampleRows: a row's penalty entries lie outside the entries array");
    }
    if (s.penalty_count > 0) ++penalized_rows;
    if (s.temperature > 0.0f && s.top_p < 1.0f) params[r].sort_slot = static_cast<int32_t>(slots++);
  }
  // CUB takes int offsets and item counts.
  if (slots * vocab >= (int64_t{1} << 31)) {
    return absl::InvalidArgumentError("SampleRows: top-p rows * vocab exceeds 2^31 - 1 sort items");
  }

  ScopedDevice scoped;
  CLEAVE_RETURN_IF_ERROR(scoped.Set(dev.index));
  const cudaStream_t s = NativeStream(stream);
  const int items = static_cast<int>(slots * vocab);

  size_t temp_bytes = 0;
  if (slots > 0) {
    cub::DoubleBuffer<uint32_t> no_keys(nullptr, nullptr);
    cub::DoubleBuffer<int32_t> no_ids(nullptr, nullptr);
    CLEAVE_CUDA_RETURN_IF_ERROR(SortSegments(nullptr, temp_bytes, no_keys, no_ids, items, static_cast<int>(slots),
                                             nullptr, nullptr, s));
  }
  const Layout lay = MakeLayout(rows, num_entries, penalized_rows, slots, vocab, temp_bytes);
  StreamScratch ws(s);
  CLEAVE_RETURN_IF_ERROR(ws.Allocate(lay.total));

  const float* base = logits.data_as<const float>();
  float* work = ws.At<float>(lay.work);
  int64_t next_work = 0;
  for (int64_t r = 0; r < rows; ++r) {
    sampling::RowParams& p = params[r];
    p.raw = base + r * ld;
    p.penalized = p.raw;
    p.work = nullptr;
    if (p.spec.active && p.spec.penalty_count > 0) {
      p.work = work + next_work++ * vocab;
      p.penalized = p.work;
    }
  }
  // Segments start empty: a top-p row that fails in stage 1 leaves its segment so.
  std::vector<int32_t> seg_begin(slots);
  for (int64_t i = 0; i < slots; ++i) seg_begin[i] = static_cast<int32_t>(i * vocab);
  std::vector<unsigned char> upload(lay.outcomes);
  std::memcpy(upload.data() + lay.params, params.data(), sizeof(sampling::RowParams) * rows);
  if (num_entries > 0) std::memcpy(upload.data() + lay.entries, entries, sizeof(PenaltyEntry) * num_entries);
  if (slots > 0) {
    std::memcpy(upload.data() + lay.seg_begin, seg_begin.data(), sizeof(int32_t) * slots);
    std::memcpy(upload.data() + lay.seg_end, seg_begin.data(), sizeof(int32_t) * slots);
  }
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(ws.At<void>(0), upload.data(), upload.size(), cudaMemcpyHostToDevice, s));
  // All-ones outcomes read as kRowNotWritten with token -1 until a kernel writes them.
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws.At<void>(lay.outcomes), 0xff, sizeof(SampleRowOutcome) * rows, s));
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ws.At<void>(lay.states), 0, sizeof(sampling::RowState) * rows, s));

  sampling::Launch l{};
  l.rows = ws.At<const sampling::RowParams>(lay.params);
  l.num_rows = static_cast<int32_t>(rows);
  l.vocab = static_cast<int32_t>(vocab);
  l.entries = ws.At<const PenaltyEntry>(lay.entries);
  l.states = ws.At<sampling::RowState>(lay.states);
  l.outcomes = ws.At<SampleRowOutcome>(lay.outcomes);
  l.sort_keys = ws.At<uint32_t>(lay.keys0);
  l.sort_ids = ws.At<int32_t>(lay.ids0);
  l.seg_end = ws.At<int32_t>(lay.seg_end);

  if (penalized_rows > 0) CLEAVE_CUDA_RETURN_IF_ERROR(sampling::LaunchPenalize(l, s));
  CLEAVE_CUDA_RETURN_IF_ERROR(sampling::LaunchStage1(l, s));
  if (slots > 0) {
    cub::DoubleBuffer<uint32_t> keys(ws.At<uint32_t>(lay.keys0), ws.At<uint32_t>(lay.keys1));
    cub::DoubleBuffer<int32_t> ids(ws.At<int32_t>(lay.ids0), ws.At<int32_t>(lay.ids1));
    CLEAVE_CUDA_RETURN_IF_ERROR(SortSegments(ws.At<void>(lay.temp), temp_bytes, keys, ids, items,
                                             static_cast<int>(slots), ws.At<const int32_t>(lay.seg_begin),
                                             ws.At<const int32_t>(lay.seg_end), s));
    l.sorted_keys = keys.Current();
    l.sorted_ids = ids.Current();
    CLEAVE_CUDA_RETURN_IF_ERROR(sampling::LaunchStage2(l, s));
  }
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(outcomes, ws.At<const void>(lay.outcomes),
                                              sizeof(SampleRowOutcome) * rows, cudaMemcpyDeviceToHost, s));
  CLEAVE_RETURN_IF_ERROR(ws.Free());
  // The one synchronisation of the call: the outcomes are needed on the host.
  CLEAVE_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(s));
  return absl::OkStatus();
}

}  // namespace cleave::kernels::cuda
