// Single-stream decode throughput of `cleave generate`'s engine on a model directory (default
// models/stories260K): greedy, EOS ignored, for each thread count; prints tokens/s per run and the
// median. Usage: decode_bench [MODEL_DIR] [TOKENS] [RUNS] [THREADS...]
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cleave/kernels/gemm.h"
#include "cleave/model/generator.h"
#include "cleave/model/decoder.h"

int main(int argc, char** argv) {
  using namespace cleave;
  const std::string dir = argc > 1 ? argv[1] : "models/stories260K";
  const int tokens = argc > 2 ? std::atoi(argv[2]) : 256;
  const int runs = argc > 3 ? std::atoi(argv[3]) : 5;
  std::vector<int> threads;
  for (int i = 4; i < argc; ++i) threads.push_back(std::atoi(argv[i]));
  if (threads.empty()) threads = {1, 2};

  auto model = model::DecoderModel::Load(dir);
  if (!model.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  model::GeneratorOptions opts;
  auto gen = model::Generator::Create(**model, opts);
  if (!gen.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(gen.status().message()).c_str());
    return 1;
  }
  model::GenerateRequest req;
  req.prompt_ids = {(*model)->config().bos_token_id >= 0 ? (*model)->config().bos_token_id : 0};
  req.max_tokens = std::min(tokens, (*gen)->max_context() - 1);
  req.ignore_eos = true;
  req.sampling.temperature = 0.0f;
  std::printf("model %s, %d tokens per run, %d runs\n", dir.c_str(), req.max_tokens, runs);
  for (int t : threads) {
    kernels::SetCpuThreads(t);
    (void)(*gen)->Generate(req);  // warm-up: page in weights, grow the workspace
    std::vector<double> tps;
    for (int r = 0; r < runs; ++r) {
      auto res = (*gen)->Generate(req);
      if (!res.ok()) {
        std::fprintf(stderr, "error: %s\n", std::string(res.status().message()).c_str());
        return 1;
      }
      tps.push_back(res->tokens.size() / res->total_s);
    }
    std::sort(tps.begin(), tps.end());
    std::printf("threads=%d  tokens/s median %.0f  (min %.0f, max %.0f)\n", t, tps[tps.size() / 2],
                tps.front(), tps.back());
  }
  return 0;
}
