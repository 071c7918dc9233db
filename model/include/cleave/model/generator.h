// Offline generation in one process: chunked prefill then a decode loop for one request, with a
// private KV cache and block pool. The baseline every serving mode must match token for token.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/kernels/sampling.h"
#include "cleave/model/kv_cache.h"
#include "cleave/model/decoder.h"

namespace cleave::model {

struct GeneratorOptions {
  int kv_block_size = 16;
  int max_context = 0;       // 0 = the model's max_position_embeddings
  int prefill_chunk = 512;   // prompt tokens per forward pass
};

struct GenerateRequest {
  std::vector<int32_t> prompt_ids;
  int max_tokens = 256;
  kernels::SamplingParams sampling;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;  // in addition to the model's EOS
};

enum class FinishReason { kStop, kLength };

struct GenerateResult {
  std::vector<int32_t> tokens;
  std::vector<kernels::SampleResult> samples;  // logprobs per token when requested
  FinishReason finish_reason = FinishReason::kLength;
  double time_to_first_token_s = 0;
  double total_s = 0;
  double decode_tokens_per_s = 0;  // tokens after the first / time after the first
  std::vector<float> first_logits;  // raw logits that produced the first token (for tests)
};

// Called with each accepted token; return false to stop early (e.g. a client went away).
using TokenCallback = std::function<bool(int32_t token)>;

// Not thread-safe: one Generate() at a time per Generator (it owns one cache).
class Generator {
 public:
  static absl::StatusOr<std::unique_ptr<Generator>> Create(const DecoderModel& model,
                                                           const GeneratorOptions& options);

  // Prompt longer than the context (or empty) is InvalidArgument. max_tokens is clipped to the
  // context left after the prompt (finish reason "length").
  absl::StatusOr<GenerateResult> Generate(const GenerateRequest& request,
                                          const TokenCallback& on_token = nullptr);

  int max_context() const { return max_context_; }

 private:
  Generator(const DecoderModel& model, GeneratorOptions options, int max_context,
            std::unique_ptr<KvCache> cache);

  const DecoderModel& model_;
  GeneratorOptions options_;
  int max_context_;
  std::unique_ptr<KvCache> cache_;
  BlockPool pool_;
  Workspace ws_;
  std::vector<float> logits_;
  uint64_t seed_counter_ = 0x5eed;
};

}  // namespace cleave::model
