// Token sampling with the knobs of the OpenAI / vLLM APIs.
//
// Order of operations on one row of logits (as vLLM and HF apply them):
//   1. penalties: repetition (HF/CTRL: positive logits / p, negative * p, for every token seen in
//      prompt or output), then frequency (-= f * count_in_output) and presence (-= p if seen in
//      output), OpenAI-style;
//   2. temperature == 0 -> greedy argmax (ties -> lowest id) and stop;
//   3. logits / temperature;
//   4. top-k, then top-p (smallest set whose mass >= p, always at least one token), then min-p
//      (drop tokens whose prob < min_p * max prob);
//   5. draw from the remaining distribution with the request's own RNG.
// Logprobs are log-softmax of the raw model logits (before steps 1-4), as vLLM reports them.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cleave::kernels {

struct SamplingParams {
  float temperature = 1.0f;  // [0, 100]; 0 = greedy
  int top_k = 0;             // -1 or 0: off; >= vocab: off
  float top_p = 1.0f;        // (0, 1]
  float min_p = 0.0f;        // [0, 1]
  float repetition_penalty = 1.0f;  // > 0, finite; 1 = off
  float presence_penalty = 0.0f;    // [-2, 2]
  float frequency_penalty = 0.0f;   // [-2, 2]
  bool has_seed = false;
  uint64_t seed = 0;
  bool logprobs = false;  // report the chosen token's logprob
  int top_logprobs = 0;   // [0, 20] alternatives to report
};

// InvalidArgument naming the first field out of range.
[[nodiscard]] absl::Status ValidateSamplingParams(const SamplingParams& params);

// Per-request sampler state: the RNG stream and token counts for the penalties. Owned by the
// request; not thread-safe (one request is sampled by one thread at a time).
class SamplerState {
 public:
  // `fallback_seed` seeds the RNG when params.has_seed is false (e.g. from a global counter).
  SamplerState(const SamplingParams& params, int vocab_size, uint64_t fallback_seed);

  void ObservePrompt(std::span<const int32_t> prompt_ids);
  void ObserveOutput(int32_t token);

  const SamplingParams& params() const { return params_; }
  int vocab_size() const { return vocab_size_; }
  // Uniform in [0, 1), from the request's own stream (xoshiro256**, seeded via splitmix64).
  double NextUniform();
  // Both return 0 / false for ids outside [0, vocab_size), like ids never observed.
  uint32_t output_count(int32_t token) const { return InVocab(token) ? output_counts_[token] : 0; }
  bool seen_in_prompt(int32_t token) const { return InVocab(token) && prompt_seen_[token] != 0; }
  // Tokens that appeared anywhere, for sparse penalty application.
  const std::vector<int32_t>& seen_tokens() const { return seen_tokens_; }

 private:
  bool InVocab(int32_t token) const { return token >= 0 && token < vocab_size_; }

  SamplingParams params_;
  int vocab_size_;
  uint64_t rng_[4];
  std::vector<uint32_t> output_counts_;
  std::vector<uint8_t> prompt_seen_;
  std::vector<uint8_t> any_seen_;
  std::vector<int32_t> seen_tokens_;
};

struct TokenLogprob {
  int32_t token;
  float logprob;
};

struct SampleResult {
  int32_t token = -1;
  float logprob = 0.0f;              // filled when params.logprobs or top_logprobs > 0
  std::vector<TokenLogprob> top;     // top_logprobs alternatives, highest first
};

// Step 1 alone, in place: applies the repetition, frequency and presence penalties recorded in
// `state` to `logits` (f32 [vocab_size]). O(#distinct tokens seen), not O(vocab). Exposed so a
// device sampler can reuse the host bookkeeping and so tests can check it exactly.
// InvalidArgument if logits.size() != vocab_size.
[[nodiscard]] absl::Status ApplyPenalties(std::span<float> logits, const SamplerState& state);

// Samples one token from `logits` (f32 [vocab_size]); `logits` is used as scratch and is
// clobbered. Does not call state.ObserveOutput (the caller does, once the token is accepted).
[[nodiscard]] absl::StatusOr<SampleResult> Sample(std::span<float> logits, SamplerState& state);

}  // namespace cleave::kernels
