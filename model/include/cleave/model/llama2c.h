// Converter from a llama2.c "legacy" checkpoint (karpathy/llama2.c run.c format) to a Hugging
// Face-style model directory that DecoderModel loads.
#pragma once

#include <filesystem>

#include "absl/status/status.h"
#include "cleave/kernels/dtype.h"

namespace cleave::model {

struct Llama2cConvertOptions {
  std::filesystem::path checkpoint;  // stories260K.bin
  std::filesystem::path tokenizer;   // SentencePiece .model, copied to <out>/tokenizer.model (optional)
  std::filesystem::path out_dir;
  kernels::DType dtype = kernels::DType::kF32;  // f32, bf16 or f16 weights in the output
  float rope_theta = 10000.0f;                  // not stored in the legacy header
  float rms_norm_eps = 1e-5f;
};

// Writes config.json, model.safetensors (and tokenizer.model) into out_dir, creating it.
// The checkpoint is untrusted: its header and size are checked before anything is read.
// Query/key rows are permuted per head from llama2.c's interleaved RoPE pairs to Hugging Face's
// halves convention, so the output runs with RopeStyle::kHalves like every HF Llama.
[[nodiscard]] absl::Status ConvertLlama2c(const Llama2cConvertOptions& options);

}  // namespace cleave::model
