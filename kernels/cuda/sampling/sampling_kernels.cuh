// Internal to kernels/cuda/sampling: the device sampler's kernels and their plain launch structs.
// One block per row; the stages are
//   PenalizeKernel   rows with penalties: copy the raw row to a workspace row, then rewrite the
//                    seen tokens with the CPU's penalty arithmetic;
//   SampleStage1     NaN/+inf check, logprobs and top_logprobs (raw row), greedy argmax, top-k
//                    cut (radix select), weights, min-p; draws every row without top-p, and
//                    writes the top-p rows' surviving candidates (key, id) into a sort segment;
//   (CUB segmented radix sort of those segments, descending, stable)
//   SampleStage2     top-p rows: the cut on the sorted weights, then the draw.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "sampling_cuda.h"

namespace cleave::kernels::cuda::sampling {

// One row, as the kernels see it (filled by the host wrapper).
struct RowParams {
  const float* raw;        // [vocab] the model's logits
  const float* penalized;  // raw, or `work` once PenalizeKernel ran
  float* work;             // [vocab] workspace row for a row with penalties; null otherwise
  int32_t sort_slot;       // >= 0 for a top-p row: its segment of the sort buffers
  SampleRowSpec spec;
};

// Stage 1 -> stage 2 (top-p rows). Zeroed by the host before stage 1.
struct RowState {
  int32_t pending;  // 1: stage 1 filled a sort segment, stage 2 finishes the row
  int32_t count;    // candidates in the segment
  float max_logit;  // of the penalised row
  uint32_t cutk_key;
  int32_t cutk_id;  // the top-k cut (see Cut in sampling_block.cuh)
  double min_weight;
  double topp_target;  // top_p * (weight of the top-k set)
  double log_z;
};

struct Launch {
  const RowParams* rows;  // [num_rows]
  int32_t num_rows;
  int32_t vocab;
  const PenaltyEntry* entries;
  RowState* states;             // [num_rows]
  SampleRowOutcome* outcomes;   // [num_rows]
  uint32_t* sort_keys;          // [slots * vocab] stage 1 writes candidates here
  int32_t* sort_ids;
  int32_t* seg_end;             // [slots] stage 1 writes slot * vocab + count
  const uint32_t* sorted_keys;  // [slots * vocab] CUB's output, read by stage 2
  const int32_t* sorted_ids;
};

// Each returns the launch's error (cudaGetLastError).
cudaError_t LaunchPenalize(const Launch& l, cudaStream_t stream);
cudaError_t LaunchStage1(const Launch& l, cudaStream_t stream);
cudaError_t LaunchStage2(const Launch& l, cudaStream_t stream);

}  // namespace cleave::kernels::cuda::sampling
