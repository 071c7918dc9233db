// `cleave generate`: offline generation in one process, streaming the completion to stdout and a
// summary line to stderr.
#include <cstdio>
#include <memory>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "absl/strings/str_format.h"
#include "cleave/common/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/gemm.h"
#include "cleave/model/generator.h"
#include "cleave/model/decoder.h"
#include "cleave/model/tokenizer.h"
#include "commands.h"

namespace cleave::cli {
namespace {

int g_exit_code = 0;

struct GenerateArgs {
  std::string model_dir;
  std::string prompt;
  int max_tokens = 256;
  float temperature = 1.0f;
  float top_p = 1.0f;
  int top_k = 0;
  float min_p = 0.0f;
  float repetition_penalty = 1.0f;
  int64_t seed = -1;
  int threads = 0;
  bool ignore_eos = false;
  int prefill_chunk = 512;
  bool json = false;  // one JSON line with token ids instead of streamed text
  std::string device = "cpu";
  std::string weight_dtype = "bf16";
};

absl::Status RunGenerate(const GenerateArgs& a) {
  kernels::SetCpuThreads(a.threads);
  std::error_code ec;
  if (!std::filesystem::is_directory(a.model_dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model directory ", a.model_dir, " does not exist"));
  }
  model::LoadOptions load;
  CLEAVE_ASSIGN_OR_RETURN(load.device, kernels::ParseDevice(a.device));
  CLEAVE_CHECK_ARG(a.weight_dtype == "bf16" || a.weight_dtype == "as_stored",
                   absl::StrCat("--weight-dtype must be bf16 or as_stored, not '", a.weight_dtype, "'"));
  load.device_weights = a.weight_dtype == "bf16" ? model::LoadOptions::DeviceWeights::kBF16
                                                 : model::LoadOptions::DeviceWeights::kAsStored;
  auto model_or = model::DecoderModel::Load(a.model_dir, load);
  if (!model_or.ok()) {
    return absl::Status(model_or.status().code(),
                        absl::StrCat("cannot load model from ", a.model_dir, ": ", model_or.status().message()));
  }
  const model::DecoderModel& llm = **model_or;
  auto tok_or = model::LoadTokenizer(a.model_dir);
  if (!tok_or.ok()) return tok_or.status();
  const model::Tokenizer& tok = **tok_or;

  auto ids_or = tok.Encode(a.prompt, /*add_bos=*/true);
  if (!ids_or.ok()) return ids_or.status();
  model::GenerateRequest req;
  req.prompt_ids = std::move(*ids_or);
  if (req.prompt_ids.empty()) return absl::InvalidArgumentError("the tokenizer has no BOS and the prompt is empty");
  req.max_tokens = a.max_tokens;
  req.ignore_eos = a.ignore_eos;
  // The tokenizer's EOS can differ from config.json's (chat models end turns with their own).
  if (!a.ignore_eos && tok.eos_id() >= 0) req.stop_token_ids.push_back(tok.eos_id());
  req.sampling.temperature = a.temperature;
  req.sampling.top_p = a.top_p;
  req.sampling.top_k = a.top_k;
  req.sampling.min_p = a.min_p;
  req.sampling.repetition_penalty = a.repetition_penalty;
  // Without --seed every run draws a fresh seed, like the OpenAI API without `seed`.
  req.sampling.has_seed = true;
  req.sampling.seed = a.seed >= 0 ? static_cast<uint64_t>(a.seed)
                                  : (static_cast<uint64_t>(std::random_device{}()) << 32) | std::random_device{}();

  model::GeneratorOptions gopts;
  gopts.prefill_chunk = a.prefill_chunk;
  gopts.kv_block_size = llm.config().kv_block_size;
  auto gen_or = model::Generator::Create(llm, gopts);
  if (!gen_or.ok()) return gen_or.status();

  if (!a.json) {
    std::fputs(a.prompt.c_str(), stdout);
    std::fflush(stdout);
  }
  std::string text;
  model::IncrementalDetokenizer detok(tok, req.prompt_ids, /*skip_special_tokens=*/true);
  absl::Status stream_status;
  auto on_token = [&](int32_t token) {
    auto piece = detok.Push(token);
    if (!piece.ok()) {
      stream_status = piece.status();
      return false;
    }
    if (a.json) {
      text += *piece;
    } else {
      std::fwrite(piece->data(), 1, piece->size(), stdout);
      std::fflush(stdout);
    }
    return true;
  };
  auto result = (*gen_or)->Generate(req, on_token);
  if (!result.ok()) return result.status();
  if (!stream_status.ok()) return stream_status;
  const std::string tail = detok.Flush();
  const char* finish = result->finish_reason == model::FinishReason::kStop ? "stop" : "length";
  if (a.json) {
    // For tests comparing serving modes with offline generation token for token.
    nlohmann::json out = {{"prompt_token_ids", req.prompt_ids},
                          {"token_ids", result->tokens},
                          {"text", text + tail},
                          {"finish_reason", finish}};
    std::printf("%s\n", out.dump().c_str());
  } else {
    std::fwrite(tail.data(), 1, tail.size(), stdout);
    std::fputs("\n", stdout);
  }
  std::fflush(stdout);
  std::fprintf(stderr,
               "%s\n",
               absl::StrFormat("[cleave generate] prompt_tokens=%d generated_tokens=%d "
                               "time_to_first_token_ms=%.2f decode_tokens_per_s=%.1f total_s=%.3f "
                               "finish_reason=%s threads=%d",
                               req.prompt_ids.size(), result->tokens.size(),
                               result->time_to_first_token_s * 1e3, result->decode_tokens_per_s,
                               result->total_s,
                               finish,
                               kernels::CpuThreads())
                   .c_str());
  return absl::OkStatus();
}

}  // namespace

int ExitCode() { return g_exit_code; }

void Fail(const absl::Status& status) {
  std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
  g_exit_code = status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

void RegisterGenerate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  auto* cmd = app.add_subcommand("generate", "generate text offline in one process");
  cmd->add_option("--model", args->model_dir, "Hugging Face-style model directory")->required();
  cmd->add_option("--prompt", args->prompt, "prompt text (empty: start from BOS)");
  cmd->add_option("--device", args->device, "where the model runs: cpu (default), cuda or cuda:N");
  cmd->add_option("--weight-dtype", args->weight_dtype,
                  "on a GPU: weight matrices as bf16 (default, converted at load) or as_stored");
  cmd->add_option("--max-tokens", args->max_tokens, "tokens to generate")->check(CLI::PositiveNumber);
  cmd->add_option("--temperature", args->temperature, "0 = greedy");
  cmd->add_option("--top-p", args->top_p, "nucleus sampling mass");
  cmd->add_option("--top-k", args->top_k, "keep the k most likely tokens (0 = off)");
  cmd->add_option("--min-p", args->min_p, "drop tokens below min_p * max prob");
  cmd->add_option("--repetition-penalty", args->repetition_penalty, "HF-style repetition penalty");
  cmd->add_option("--seed", args->seed, "RNG seed (default: nondeterministic per run)");
  cmd->add_option("--threads", args->threads, "CPU threads (0 = all cores)");
  cmd->add_option("--prefill-chunk", args->prefill_chunk, "prompt tokens per forward pass")
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--json", args->json, "print one JSON line (token ids, text, finish reason) instead of text");
  cmd->add_flag("--ignore-eos", args->ignore_eos, "keep generating past the end-of-sequence token");
  cmd->callback([args] {
    if (absl::Status s = RunGenerate(*args); !s.ok()) Fail(s);
  });
}

}  // namespace cleave::cli
