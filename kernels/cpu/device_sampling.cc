// SampleRows (device_sampling.h): the host half. Turns each SamplerState into the plain row spec
// the CUDA sampler takes (validated params, the row's uniform, its penalty entries) and the
// device's per-row outcomes back into SampleResults with the CPU sampler's messages. Builds
// without CUDA return FailedPrecondition.
#include "cleave/kernels/device_sampling.h"

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"

#if CLEAVE_WITH_CUDA
#include "../cuda/sampling/sampling_cuda.h"
#endif

namespace cleave::kernels {

#if CLEAVE_WITH_CUDA
namespace {

bool PenaltiesActive(const SamplingParams& p) {
  return p.repetition_penalty != 1.0f || p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f;
}

// Fills `spec` (and `entries`) for one row, or returns the row's error.
absl::Status MakeSpec(SamplerState& state, int64_t vocab, cuda::SampleRowSpec& spec,
                      std::vector<cuda::PenaltyEntry>& entries) {
  const SamplingParams& p = state.params();
  CLEAVE_RETURN_IF_ERROR(ValidateSamplingParams(p));
  if (state.vocab_size() <= 0 || state.vocab_size() != vocab) {
    return absl::InvalidArgumentError(
        absl::StrCat("logits row has ", vocab, " entries, vocab_size is ", state.vocab_size()));
  }
  spec.active = 1;
  spec.temperature = p.temperature;
  spec.top_k = p.top_k;
  spec.top_p = p.top_p;
  spec.min_p = p.min_p;
  spec.repetition_penalty = p.repetition_penalty;
  spec.presence_penalty = p.presence_penalty;
  spec.frequency_penalty = p.frequency_penalty;
  spec.want_logprobs = p.logprobs || p.top_logprobs > 0 ? 1 : 0;
  spec.top_logprobs = p.top_logprobs;
  spec.penalty_begin = static_cast<int32_t>(entries.size());
  if (PenaltiesActive(p)) {
    for (int32_t t : state.seen_tokens()) entries.push_back({t, state.output_count(t)});
  }
  spec.penalty_count = static_cast<int32_t>(entries.size() - spec.penalty_begin);
  if (p.temperature != 0.0f) spec.uniform = state.NextUniform();
  return absl::OkStatus();
}

absl::StatusOr<SampleResult> ToResult(const cuda::SampleRowOutcome& o, const SamplingParams& p) {
  switch (o.error) {
    case cuda::kRowOk:
      break;
    case cuda::kRowNaN:
    case cuda::kRowPosInf:
      return absl::InvalidArgumentError(absl::StrCat("logits row holds ", o.error == cuda::kRowNaN ? "NaN" : "+inf",
                                                     " at token ", o.bad_index, "; refusing to sample from it"));
    case cuda::kRowAllMasked:
      return absl::InvalidArgumentError("every logit in the row is -inf; no token can be sampled");
    default:
      return absl::InternalError(absl::StrCat("SampleRows: the device left a row unsampled (code ", o.error, ")"));
  }
  if (o.token < 0) return absl::InternalError("SampleRows: the device returned no token for a row");
  SampleResult r;
  r.token = o.token;
  if (p.logprobs || p.top_logprobs > 0) {
    r.logprob = o.logprob;
    const int n = std::clamp(o.num_top, 0, cuda::kMaxDeviceTopLogprobs);
    for (int i = 0; i < n; ++i) r.top.push_back({o.top_ids[i], o.top_logprobs[i]});
  }
  return r;
}

}  // namespace
#endif

absl::Status SampleRows(const Tensor& logits, std::span<SamplerState* const> states,
                        std::span<absl::StatusOr<SampleResult>> results, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (logits.ndim() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("SampleRows: logits ", logits.DebugString(), " must have shape [B, vocab]"));
  }
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  if (static_cast<int64_t>(states.size()) != rows || static_cast<int64_t>(results.size()) != rows) {
    return absl::InvalidArgumentError(absl::StrCat("SampleRows: logits ", logits.DebugString(), " has ", rows,
                                                   " rows but ", states.size(), " states and ", results.size(),
                                                   " results"));
  }
  for (size_t r = 0; r < states.size(); ++r) {
    if (states[r] == nullptr) return absl::InvalidArgumentError(absl::StrCat("SampleRows: states[", r, "] is null"));
  }
  // Every call-level check runs before any row's RNG advances.
  CLEAVE_RETURN_IF_ERROR(cuda::CheckSampleRowsArgs(logits, rows, stream));
  std::vector<cuda::SampleRowSpec> specs(rows);
  std::vector<cuda::PenaltyEntry> entries;
  std::vector<absl::Status> row_errors(rows);
  for (int64_t r = 0; r < rows; ++r) row_errors[r] = MakeSpec(*states[r], vocab, specs[r], entries);
  std::vector<cuda::SampleRowOutcome> outcomes(rows);
  CLEAVE_RETURN_IF_ERROR(cuda::SampleRowsOnDevice(logits, specs.data(), rows, entries.data(),
                                                  static_cast<int64_t>(entries.size()), outcomes.data(), stream));
  for (int64_t r = 0; r < rows; ++r) {
    if (!row_errors[r].ok()) {
      results[r] = row_errors[r];
    } else {
      results[r] = ToResult(outcomes[r], states[r]->params());
    }
  }
  return absl::OkStatus();
#else
  (void)logits;
  (void)states;
  (void)results;
  (void)stream;
  return absl::FailedPreconditionError("SampleRows: built without CUDA");
#endif
}

}  // namespace cleave::kernels
