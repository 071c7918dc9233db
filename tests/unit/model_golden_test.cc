// Every model family (Llama, Mistral, Qwen2, Mixtral, Qwen2-MoE, Mamba, Jamba) against golden data
// from Hugging Face transformers (tools/make_goldens.py): greedy tokens must match exactly,
// last-position logits to rtol 1e-4, whatever the prefill chunking (Mamba state carried across
// chunks), KV block size or batching.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cleave/model/generator.h"
#include "cleave/model/decoder.h"
#include "golden_data.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

namespace fs = std::filesystem;
using namespace golden;  // NOLINT: the golden-data vocabulary

class GoldenModelTest : public ::testing::TestWithParam<fs::path> {};

TEST_P(GoldenModelTest, GreedyTokensAndLogitsMatchTransformers) {
  const fs::path dir = GetParam();
  auto model = DecoderModel::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  const auto prompts = ReadGolden(dir / "golden.json");
  ASSERT_FALSE(prompts.empty());
  // Chunk sizes and block sizes chosen so long prompts cross chunk and block boundaries.
  for (int chunk : {512, 16, 7}) {
    for (int block : {16, 1, 32}) {
      GeneratorOptions opts;
      opts.prefill_chunk = chunk;
      opts.kv_block_size = block;
      auto gen = Generator::Create(**model, opts);
      ASSERT_TRUE(gen.ok()) << gen.status();
      for (size_t i = 0; i < prompts.size(); ++i) {
        const GoldenPrompt& g = prompts[i];
        GenerateRequest req;
        req.prompt_ids = g.prompt_ids;
        req.max_tokens = static_cast<int>(g.greedy_tokens.size());
        req.ignore_eos = true;
        req.sampling.temperature = 0.0f;
        auto res = (*gen)->Generate(req);
        ASSERT_TRUE(res.ok()) << res.status();
        const std::string what = dir.filename().string() + " prompt " + std::to_string(i) +
                                 " chunk " + std::to_string(chunk) + " block " + std::to_string(block);
        EXPECT_EQ(res->tokens, g.greedy_tokens) << what;
        ExpectLogitsClose(res->first_logits, g.last_logits, 1e-4, 1e-5, what);
      }
    }
  }
}

// Several sequences in one forward pass give the same logits as each alone: the batched path
// (packed tokens, per-sequence block tables) is what serving uses.
TEST_P(GoldenModelTest, BatchedPrefillMatchesGolden) {
  const fs::path dir = GetParam();
  auto model = DecoderModel::Load(dir);
  ASSERT_TRUE(model.ok()) << model.status();
  const auto prompts = ReadGolden(dir / "golden.json");
  const ModelConfig& c = (*model)->config();
  const int block = 16;
  // One state slot per sequence (used by Mamba layers), in reverse order so slot != index.
  const int slots = static_cast<int>(prompts.size());
  auto cache = KvCache::Create(c, 64, block, kernels::CpuBackend(), slots);
  ASSERT_TRUE(cache.ok());
  BlockPool pool(64);
  ForwardBatch batch;
  std::vector<std::vector<int32_t>> tables;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& g = prompts[i];
    auto blocks = pool.Allocate((static_cast<int>(g.prompt_ids.size()) + block - 1) / block);
    ASSERT_TRUE(blocks.ok());
    tables.push_back(*blocks);
    batch.AddSequence(g.prompt_ids, 0, tables.back(), block, true, slots - 1 - static_cast<int>(i));
  }
  ASSERT_TRUE(batch.Finalize().ok());
  Workspace ws;
  std::vector<float> logits;
  ASSERT_TRUE((*model)->Forward(batch, **cache, ws, logits).ok());
  for (size_t i = 0; i < prompts.size(); ++i) {
    std::vector<float> row(logits.begin() + i * c.vocab_size, logits.begin() + (i + 1) * c.vocab_size);
    ExpectLogitsClose(row, prompts[i].last_logits, 1e-4, 1e-5,
                      dir.filename().string() + " batched prompt " + std::to_string(i));
  }

  // One batched decode step for every sequence equals the golden second greedy token.
  ForwardBatch step;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const int len = static_cast<int>(prompts[i].prompt_ids.size());
    if ((len + 1 + block - 1) / block > static_cast<int>(tables[i].size())) {
      auto more = pool.Allocate(1);
      ASSERT_TRUE(more.ok());
      tables[i].push_back((*more)[0]);
    }
    const int32_t first = prompts[i].greedy_tokens[0];
    step.AddSequence(std::span(&first, 1), len, tables[i], block, true, slots - 1 - static_cast<int>(i));
  }
  ASSERT_TRUE(step.Finalize().ok());
  ASSERT_TRUE(step.is_decode());
  ASSERT_TRUE((*model)->Forward(step, **cache, ws, logits).ok());
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto row = logits.begin() + i * c.vocab_size;
    const int32_t argmax = static_cast<int32_t>(std::max_element(row, row + c.vocab_size) - row);
    EXPECT_EQ(argmax, prompts[i].greedy_tokens[1]) << "sequence " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Goldens, GoldenModelTest, ::testing::ValuesIn(GoldenModelDirs()),
                         [](const auto& info) { return info.param.filename().string(); });

TEST(GoldenData, Present) {
  // The parameterised suite above must not silently run zero cases, nor lose a family.
  EXPECT_GE(GoldenModelDirs().size(), 12u);
  for (const char* name : {"mixtral", "qwen2_moe", "mamba", "jamba"}) {
    EXPECT_TRUE(fs::exists(kGoldenDir / name / "golden.json")) << name;
  }
}

// What the loader makes of each family's layout: per-layer mixer and FFN kinds.
TEST(GoldenData, LayerKinds) {
  auto jamba = LoadModelConfig(kGoldenDir / "jamba");
  ASSERT_TRUE(jamba.ok()) << jamba.status();
  EXPECT_EQ(jamba->layer_mixer, (std::vector<MixerKind>{MixerKind::kMamba, MixerKind::kAttention,
                                                         MixerKind::kMamba, MixerKind::kAttention}));
  EXPECT_EQ(jamba->layer_ffn, (std::vector<FfnKind>{FfnKind::kDense, FfnKind::kMoe, FfnKind::kDense,
                                                     FfnKind::kMoe}));
  EXPECT_FALSE(jamba->use_rope);
  EXPECT_TRUE(jamba->mamba.bcdt_norms);
  auto qwen = LoadModelConfig(kGoldenDir / "qwen2_moe");
  ASSERT_TRUE(qwen.ok()) << qwen.status();
  EXPECT_EQ(qwen->layer_ffn, (std::vector<FfnKind>{FfnKind::kMoe, FfnKind::kDense, FfnKind::kMoe}));
  EXPECT_EQ(qwen->moe.shared_expert_intermediate_size, 96);
  EXPECT_FALSE(qwen->moe.renormalize);
  auto mamba = LoadModelConfig(kGoldenDir / "mamba");
  ASSERT_TRUE(mamba.ok()) << mamba.status();
  EXPECT_EQ(mamba->num_layers_of(MixerKind::kAttention), 0);
  EXPECT_EQ(mamba->mamba.dt_rank, 4);
  EXPECT_EQ(mamba->mamba.d_inner, 128);
  EXPECT_TRUE(mamba->tie_word_embeddings);
  EXPECT_EQ(KvBytesPerBlock(*mamba, 16), 0u);
  EXPECT_GT(StateBytesPerSlot(*mamba), 0u);
  auto mixtral = LoadModelConfig(kGoldenDir / "mixtral");
  ASSERT_TRUE(mixtral.ok()) << mixtral.status();
  EXPECT_TRUE(mixtral->moe.renormalize);
  EXPECT_EQ(mixtral->moe.num_experts, 8);
  EXPECT_EQ(mixtral->moe.top_k, 2);
}

}  // namespace
}  // namespace cleave::model
