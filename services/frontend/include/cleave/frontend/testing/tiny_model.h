// A model directory for frontend tests: a stories260K-shaped config.json (512 positions, 512
// ids, EOS 2) and the tokenizer tests' Llama-2-style tokenizer.json (SentencePiece BPE with byte
// fallback, <s> = 1, </s> = 2), read by the Hugging Face reader. No weights: the frontend never
// reads them. Run from the source root (tests/data is read from there). Header-only: tests only.
#pragma once

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/status/statusor.h"

namespace cleave::frontend::testing {

inline constexpr char kTinyConfigJson[] = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama",
  "bos_token_id": 1, "eos_token_id": 2, "head_dim": 8, "hidden_act": "silu", "hidden_size": 64,
  "intermediate_size": 172, "max_position_embeddings": 512, "num_attention_heads": 8,
  "num_hidden_layers": 5, "num_key_value_heads": 4, "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0, "tie_word_embeddings": true, "torch_dtype": "float32", "vocab_size": 512
})";

// Creates (or refreshes) <tmp>/cleave_frontend_<tag>_<pid>; the caller removes it.
inline absl::StatusOr<std::filesystem::path> MakeTinyModelDir(const std::string& tag) {
  namespace fs = std::filesystem;
  const fs::path dir =
      fs::temp_directory_path() / ("cleave_frontend_" + tag + "_" + std::to_string(::getpid()));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError("cannot create " + dir.string() + ": " + ec.message());
  std::ofstream(dir / "config.json") << kTinyConfigJson;
  fs::copy_file("tests/data/tokenizers/llama2_sp/tokenizer.json", dir / "tokenizer.json",
                fs::copy_options::overwrite_existing, ec);
  if (ec) return absl::NotFoundError("tests/data/tokenizers/llama2_sp/tokenizer.json: " + ec.message());
  return dir;
}

}  // namespace cleave::frontend::testing
