// `cleave convert llama2c`: llama2.c checkpoint -> Hugging Face-style directory.
#include <cstdio>
#include <memory>
#include <string>

#include "cleave/model/llama2c.h"
#include "commands.h"

namespace cleave::cli {
namespace {

struct ConvertArgs {
  std::string checkpoint, tokenizer, out, dtype = "f32";
};

}  // namespace

void RegisterConvert(CLI::App& app) {
  auto* convert = app.add_subcommand("convert", "convert a checkpoint to a Hugging Face-style directory");
  convert->require_subcommand(1);
  auto args = std::make_shared<ConvertArgs>();
  auto* l2c = convert->add_subcommand("llama2c", "llama2.c legacy checkpoint (e.g. stories260K.bin)");
  l2c->add_option("--checkpoint", args->checkpoint, "llama2.c .bin checkpoint")->required();
  l2c->add_option("--tokenizer", args->tokenizer, "SentencePiece .model to copy as tokenizer.model");
  l2c->add_option("--out", args->out, "output directory")->required();
  l2c->add_option("--dtype", args->dtype, "weight dtype of the output")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  l2c->callback([args] {
    model::Llama2cConvertOptions options;
    options.checkpoint = args->checkpoint;
    options.tokenizer = args->tokenizer;
    options.out_dir = args->out;
    options.dtype = args->dtype == "bf16"  ? kernels::DType::kBF16
                    : args->dtype == "f16" ? kernels::DType::kF16
                                           : kernels::DType::kF32;
    if (absl::Status s = model::ConvertLlama2c(options); !s.ok()) return Fail(s);
    std::fprintf(stderr, "converted %s -> %s\n", args->checkpoint.c_str(), args->out.c_str());
  });
}

}  // namespace cleave::cli
