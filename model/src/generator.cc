#include "cleave/model/generator.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"

namespace cleave::model {
namespace {

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int CeilDiv(int a, int b) { return (a + b - 1) / b; }

// The generator runs one request at a time, so it always uses state slot 0 (ignored by models
// without Mamba layers).
constexpr int kStateSlot = 0;

}  // namespace

Generator::Generator(const DecoderModel& model, GeneratorOptions options, int max_context,
                     std::unique_ptr<KvCache> cache)
    : model_(model),
      options_(options),
      max_context_(max_context),
      cache_(std::move(cache)),
      pool_(cache_->num_blocks()) {}

absl::StatusOr<std::unique_ptr<Generator>> Generator::Create(const DecoderModel& model,
                                                             const GeneratorOptions& options) {
  CLEAVE_CHECK_ARG(options.kv_block_size > 0, "kv_block_size must be positive");
  CLEAVE_CHECK_ARG(options.prefill_chunk > 0, "prefill_chunk must be positive");
  const int model_max = model.config().max_position_embeddings;
  const int max_context = options.max_context > 0 ? std::min(options.max_context, model_max) : model_max;
  // One request at a time: exactly enough blocks for a full context.
  const int blocks = CeilDiv(max_context, options.kv_block_size);
  // One state slot (slot 0) for the one request, when the model has Mamba layers. The cache
  // lives where the model runs.
  CLEAVE_ASSIGN_OR_RETURN(kernels::Backend* backend, kernels::GetBackend(model.device()));
  CLEAVE_ASSIGN_OR_RETURN(auto cache, KvCache::Create(model.config(), blocks, options.kv_block_size,
                                                      *backend, /*num_state_slots=*/1));
  return std::unique_ptr<Generator>(new Generator(model, options, max_context, std::move(cache)));
}

absl::StatusOr<GenerateResult> Generator::Generate(const GenerateRequest& request,
                                                   const TokenCallback& on_token) {
  const int prompt_len = static_cast<int>(request.prompt_ids.size());
  if (prompt_len == 0) return absl::InvalidArgumentError("prompt is empty (no tokens, not even BOS)");
  if (prompt_len >= max_context_) {
    return absl::InvalidArgumentError(absl::StrCat("prompt has ", prompt_len,
                                                   " tokens; the context holds ", max_context_,
                                                   " (prompt plus at least one generated token)"));
  }
  CLEAVE_CHECK_ARG(request.max_tokens > 0, "max_tokens must be positive");
  CLEAVE_RETURN_IF_ERROR(kernels::ValidateSamplingParams(request.sampling));
  const int vocab = model_.config().vocab_size;
  for (int32_t id : request.prompt_ids) {
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token id ", id, " outside vocabulary [0, ", vocab, ")"));
    }
  }
  const int max_new = std::min(request.max_tokens, max_context_ - prompt_len);

  CLEAVE_ASSIGN_OR_RETURN(std::vector<int32_t> blocks,
                          pool_.Allocate(CeilDiv(prompt_len + max_new, options_.kv_block_size)));
  // Blocks return to the pool on every exit path.
  struct Release {
    BlockPool& pool;
    std::vector<int32_t>& blocks;
    ~Release() { pool.Free(blocks); }
  } release{pool_, blocks};

  kernels::SamplerState sampler(request.sampling, vocab, seed_counter_++);
  sampler.ObservePrompt(request.prompt_ids);

  GenerateResult result;
  const auto start = std::chrono::steady_clock::now();
  auto first_token_time = start;
  const int bs = options_.kv_block_size;

  // Chunked prefill: each chunk attends to the cached prefix plus itself.
  for (int done = 0; done < prompt_len;) {
    const int n = std::min(options_.prefill_chunk, prompt_len - done);
    ForwardBatch batch;
    const bool last = done + n == prompt_len;
    batch.AddSequence(std::span(request.prompt_ids).subspan(done, n), done, blocks, bs, last,
                      kStateSlot);
    CLEAVE_RETURN_IF_ERROR(batch.Finalize());
    CLEAVE_RETURN_IF_ERROR(model_.Forward(batch, *cache_, ws_, logits_));
    done += n;
  }

  int context = prompt_len;
  for (int step = 0; step < max_new; ++step) {
    if (step == 0) result.first_logits = logits_;
    CLEAVE_ASSIGN_OR_RETURN(kernels::SampleResult sample,
                            kernels::Sample(std::span(logits_.data(), vocab), sampler));
    const int32_t token = sample.token;
    sampler.ObserveOutput(token);
    result.tokens.push_back(token);
    if (request.sampling.logprobs || request.sampling.top_logprobs > 0) result.samples.push_back(std::move(sample));
    if (step == 0) first_token_time = std::chrono::steady_clock::now();
    const bool keep_going = !on_token || on_token(token);
    const bool is_eos = !request.ignore_eos && model_.config().IsEos(token);
    const bool is_stop = std::find(request.stop_token_ids.begin(), request.stop_token_ids.end(), token) !=
                         request.stop_token_ids.end();
    if (is_eos || is_stop || !keep_going) {
      result.finish_reason = FinishReason::kStop;
      break;
    }
    if (step + 1 == max_new) break;
    ForwardBatch batch;
    batch.AddSequence(std::span(&token, 1), context, blocks, bs, true, kStateSlot);
    CLEAVE_RETURN_IF_ERROR(batch.Finalize());
    CLEAVE_RETURN_IF_ERROR(model_.Forward(batch, *cache_, ws_, logits_));
    ++context;
  }
  const auto end = std::chrono::steady_clock::now();
  result.time_to_first_token_s = Seconds(start, first_token_time);
  result.total_s = Seconds(start, end);
  const double decode_s = Seconds(first_token_time, end);
  if (result.tokens.size() > 1 && decode_s > 0) {
    result.decode_tokens_per_s = static_cast<double>(result.tokens.size() - 1) / decode_s;
  }
  return result;
}

}  // namespace cleave::model
