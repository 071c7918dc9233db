// Internal seam between the public device sampler (kernels/cpu/device_sampling.cc, plain C++,
// always compiled) and its CUDA implementation (sampling.cu). Plain data only, no CUDA types and
// no C++20, so both g++ and nvcc (C++17) read it. The host side turns each SamplerState into a
// SampleRowSpec (validated params, the row's uniform, its penalty entries); the CUDA side never
// touches SamplerState, so kernels/cuda does not link against the CPU sampler.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cuda {

inline constexpr int kMaxDeviceTopLogprobs = 20;  // ValidateSamplingParams' limit

// One row's knobs, already validated (ValidateSamplingParams) by the host.
struct SampleRowSpec {
  int32_t active = 0;  // 0: skip the row (its params or state were rejected on the host)
  float temperature = 1.0f;
  int32_t top_k = 0;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  // [penalty_begin, penalty_begin + penalty_count) in the entries array; count 0 = no penalties.
  int32_t penalty_begin = 0;
  int32_t penalty_count = 0;
  int32_t want_logprobs = 0;  // params.logprobs || params.top_logprobs > 0
  int32_t top_logprobs = 0;   // [0, 20]
  double uniform = 0.0;       // SamplerState::NextUniform(), drawn when temperature > 0
};

// A token seen in the prompt or output (SamplerState::seen_tokens()) and its output count.
struct PenaltyEntry {
  int32_t token;
  uint32_t output_count;
};

enum SampleRowError : int32_t {
  kRowOk = 0,
  kRowNaN = 1,        // `bad_index` holds the first NaN logit
  kRowPosInf = 2,     // `bad_index` holds the first +inf logit
  kRowAllMasked = 3,  // every (penalised) logit is -inf
  kRowSkipped = 4,    // spec.active == 0
  kRowNotWritten = -1,  // the kernels never reached the row: an internal error
};

struct SampleRowOutcome {
  int32_t error;      // SampleRowError
  int32_t bad_index;  // for kRowNaN / kRowPosInf
  int32_t token;
  float logprob;      // valid when want_logprobs
  int32_t num_top;    // min(top_logprobs, vocab) when want_logprobs
  int32_t top_ids[kMaxDeviceTopLogprobs];
  float top_logprobs[kMaxDeviceTopLogprobs];
};

// SampleRowsOnDevice's call-level checks alone (device, dtype, shape, stream, sizes), so the
// host can run them before it draws any row's uniform.
[[nodiscard]] absl::Status CheckSampleRowsArgs(const Tensor& logits, int64_t rows, Stream* stream);

// Samples row r of `logits` (f32 [rows, vocab] on a CUDA device, unit inner stride) with
// specs[r] into outcomes[r] (host memory), r < rows. `entries` holds every row's penalties.
// Enqueues the work on `stream` (null: the device's legacy default stream) and synchronises it
// once, after copying the outcomes back. InvalidArgument for a bad tensor or sizes, Internal for
// a CUDA failure; per-row data errors come back in the outcomes.
[[nodiscard]] absl::Status SampleRowsOnDevice(const Tensor& logits, const SampleRowSpec* specs, int64_t rows,
                                              const PenaltyEntry* entries, int64_t num_entries,
                                              SampleRowOutcome* outcomes, Stream* stream);

}  // namespace cleave::kernels::cuda
