// The bundled real model end to end: llama2.c checkpoint -> `ConvertLlama2c` -> DecoderModel, greedy
// from BOS, against 200 tokens that transformers produced on independently converted weights
// (tests/data/golden/stories260k.json, tools/make_goldens.py).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "cleave/model/generator.h"
#include "cleave/model/decoder.h"
#include "cleave/model/llama2c.h"
#include "cleave/model/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

namespace fs = std::filesystem;
const fs::path kShared = "../shared/models/stories260K";

class Stories260kTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(fs::temp_directory_path() / ("cleave_stories260k_" + std::to_string(::getpid())));
    Llama2cConvertOptions opts;
    opts.checkpoint = kShared / "stories260K.bin";
    opts.tokenizer = kShared / "tok512.model";
    opts.out_dir = *dir_;
    status_ = new absl::Status(ConvertLlama2c(opts));
  }
  static void TearDownTestSuite() {
    fs::remove_all(*dir_);
    delete dir_;
    delete status_;
  }
  static fs::path* dir_;
  static absl::Status* status_;
};
fs::path* Stories260kTest::dir_ = nullptr;
absl::Status* Stories260kTest::status_ = nullptr;

TEST_F(Stories260kTest, GreedyFromBosMatchesTransformers) {
  ASSERT_TRUE(status_->ok()) << *status_;
  std::ifstream in("tests/data/golden/stories260k.json");
  ASSERT_TRUE(in) << "missing golden";
  const nlohmann::json golden = nlohmann::json::parse(in);
  const auto want = golden.at("greedy_tokens").get<std::vector<int32_t>>();
  ASSERT_EQ(want.size(), 200u);

  auto model = DecoderModel::Load(*dir_);
  ASSERT_TRUE(model.ok()) << model.status();
  auto gen = Generator::Create(**model, GeneratorOptions{});
  ASSERT_TRUE(gen.ok());
  GenerateRequest req;
  req.prompt_ids = {1};
  req.max_tokens = 200;
  req.ignore_eos = true;
  req.sampling.temperature = 0.0f;
  auto res = (*gen)->Generate(req);
  ASSERT_TRUE(res.ok()) << res.status();
  EXPECT_EQ(res->tokens, want);

  auto tok = LoadTokenizer(*dir_);
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto text = (*tok)->Decode(res->tokens, /*skip_special_tokens=*/true);
  ASSERT_TRUE(text.ok());
  std::printf("%s\n", text->c_str());
  EXPECT_EQ(text->rfind("Once upon a time, there was a little girl named Lily. She loved to play "
                        "outside in the park.", 0),
            0u);
}

TEST_F(Stories260kTest, PromptLogitsMatchTransformers) {
  ASSERT_TRUE(status_->ok()) << *status_;
  std::ifstream in("tests/data/golden/stories260k.json");
  const nlohmann::json golden = nlohmann::json::parse(in);
  auto model = DecoderModel::Load(*dir_);
  ASSERT_TRUE(model.ok()) << model.status();
  auto gen = Generator::Create(**model, GeneratorOptions{});
  ASSERT_TRUE(gen.ok());
  for (const auto& p : golden.at("prompts")) {
    GenerateRequest req;
    req.prompt_ids = p.at("prompt_ids").get<std::vector<int32_t>>();
    const auto want_logits = p.at("last_logits").get<std::vector<float>>();
    req.max_tokens = 1;
    req.sampling.temperature = 0.0f;
    auto res = (*gen)->Generate(req);
    ASSERT_TRUE(res.ok()) << res.status();
    ASSERT_EQ(res->first_logits.size(), want_logits.size());
    double max_abs = 0;
    for (size_t i = 0; i < want_logits.size(); ++i) {
      const double diff = std::fabs(res->first_logits[i] - want_logits[i]);
      max_abs = std::max(max_abs, diff);
      EXPECT_LE(diff, 1e-4 * std::fabs(want_logits[i]) + 1e-5) << "logit " << i;
    }
    std::printf("prompt of %zu tokens: max abs logit err %.3g\n", req.prompt_ids.size(), max_abs);
  }
}

// bf16 weights: the same model narrowed to bf16 still tells the same story start.
TEST_F(Stories260kTest, Bf16ConversionGenerates) {
  const fs::path bf16_dir = *dir_ / "bf16";
  Llama2cConvertOptions opts;
  opts.checkpoint = kShared / "stories260K.bin";
  opts.tokenizer = kShared / "tok512.model";
  opts.out_dir = bf16_dir;
  opts.dtype = kernels::DType::kBF16;
  ASSERT_TRUE(ConvertLlama2c(opts).ok());
  auto model = DecoderModel::Load(bf16_dir);
  ASSERT_TRUE(model.ok()) << model.status();
  auto gen = Generator::Create(**model, GeneratorOptions{});
  ASSERT_TRUE(gen.ok());
  GenerateRequest req;
  req.prompt_ids = {1};
  req.max_tokens = 8;
  req.sampling.temperature = 0.0f;
  auto res = (*gen)->Generate(req);
  ASSERT_TRUE(res.ok()) << res.status();
  auto tok = LoadTokenizer(bf16_dir);
  ASSERT_TRUE(tok.ok());
  auto text = (*tok)->Decode(res->tokens, true);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(text->rfind("Once upon a time", 0), 0u) << *text;
}

TEST(Llama2cConvert, RejectsBadCheckpoints) {
  const fs::path tmp = fs::temp_directory_path() / ("cleave_l2c_bad_" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  Llama2cConvertOptions opts;
  opts.out_dir = tmp / "out";
  opts.checkpoint = tmp / "missing.bin";
  EXPECT_EQ(ConvertLlama2c(opts).code(), absl::StatusCode::kNotFound);

  // Truncated: the real header followed by too few weights.
  std::ifstream src(kShared / "stories260K.bin", std::ios::binary);
  std::vector<char> bytes(1000);
  src.read(bytes.data(), bytes.size());
  {
    std::ofstream f(tmp / "trunc.bin", std::ios::binary);
    f.write(bytes.data(), bytes.size());
  }
  opts.checkpoint = tmp / "trunc.bin";
  auto s = ConvertLlama2c(opts);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(std::string(s.message()).find("header implies"), std::string::npos) << s;

  // Nonsense header.
  {
    std::ofstream f(tmp / "junk.bin", std::ios::binary);
    const int32_t header[7] = {-5, 3, 1000000, 0, 0, 7, 1};
    f.write(reinterpret_cast<const char*>(header), sizeof(header));
  }
  opts.checkpoint = tmp / "junk.bin";
  EXPECT_EQ(ConvertLlama2c(opts).code(), absl::StatusCode::kInvalidArgument);
  fs::remove_all(tmp);
}

}  // namespace
}  // namespace cleave::model
