// The bundled model as the frontend loads it (config.json + a SentencePiece tokenizer.model, no
// chat template), and PrepareRequest on it. The HF directory is made from ../shared/models/
// stories260K with `cleave convert llama2c`'s converter, as stories260k_test does (models/ is a
// build product, not in the repository).
#include <unistd.h>

#include <filesystem>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cleave/frontend/chat_template.h"
#include "cleave/frontend/generation.h"
#include "cleave/model/llama2c.h"

namespace cleave::frontend {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// A helper, not `p.prompt = ...` in the test body: GCC 12 at -O3 warns (falsely) that the
// optional<string> may be used uninitialized when the assignment is inlined there.
GenerationParams TextPrompt(std::string text) {
  GenerationParams p;
  p.prompt = std::move(text);
  return p;
}

namespace fs = std::filesystem;
const fs::path kShared = "../shared/models/stories260K";

class BundledModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new fs::path(fs::temp_directory_path() /
                        ("cleave_frontend_bundled_" + std::to_string(::getpid())) / "stories260K");
    model::Llama2cConvertOptions opts;
    opts.checkpoint = kShared / "stories260K.bin";
    opts.tokenizer = kShared / "tok512.model";
    opts.out_dir = *dir_;
    status_ = new absl::Status(model::ConvertLlama2c(opts));
  }
  static void TearDownTestSuite() {
    fs::remove_all(dir_->parent_path());
    delete dir_;
    delete status_;
  }
  void SetUp() override {
    ASSERT_TRUE(status_->ok()) << *status_;
    absl::StatusOr<std::unique_ptr<FrontendModel>> m = LoadFrontendModel(*dir_);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
    ctx_ = model_->MakeContext(nullptr);
  }
  static fs::path* dir_;
  static absl::Status* status_;
  std::unique_ptr<FrontendModel> model_;
  FrontendContext ctx_;
};
fs::path* BundledModelTest::dir_ = nullptr;
absl::Status* BundledModelTest::status_ = nullptr;

TEST_F(BundledModelTest, ModelInfo) {
  EXPECT_EQ(ctx_.model.id, "stories260K");
  EXPECT_EQ(ctx_.model.max_model_len, 512);
  EXPECT_EQ(ctx_.model.vocab_size, 512);
  EXPECT_THAT(ctx_.eos_token_ids, ElementsAre(2));
  EXPECT_EQ(ctx_.chat_template->family(), ChatTemplateFamily::kPlain);
}

TEST_F(BundledModelTest, Options) {
  LoadFrontendModelOptions o;
  o.served_model_name = "tiny";
  o.max_model_len = 256;
  absl::StatusOr<std::unique_ptr<FrontendModel>> m = LoadFrontendModel(dir_->string() + "/", o);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ((*m)->info.id, "tiny");
  EXPECT_EQ((*m)->info.max_model_len, 256);
  o.max_model_len = 100000;
  EXPECT_FALSE(LoadFrontendModel(*dir_, o).ok());
  EXPECT_EQ((*LoadFrontendModel(dir_->string() + "/"))->info.id, "stories260K");
  absl::StatusOr<std::unique_ptr<FrontendModel>> missing = LoadFrontendModel(dir_->parent_path() / "nope");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
}

TEST_F(BundledModelTest, PrepareChatUsesPlainTemplateWithBos) {
  GenerationParams chat;
  chat.api = ApiKind::kChat;
  chat.messages = {{"system", "Be kind."}, {"user", "Tell a story."}};
  absl::StatusOr<PreparedRequest> r = PrepareRequest(ctx_, chat);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->prompt_text, "System: Be kind.\nUser: Tell a story.\nAssistant:");
  EXPECT_EQ(r->prompt_ids.front(), model_->tokenizer->bos_id());
  EXPECT_EQ(r->max_tokens, 512 - static_cast<int>(r->prompt_ids.size()));
}

TEST_F(BundledModelTest, PrepareTextPrompt) {
  GenerationParams p = TextPrompt("Once upon a time");
  absl::StatusOr<PreparedRequest> r = PrepareRequest(ctx_, p);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->prompt_ids, *model_->tokenizer->Encode("Once upon a time", true));
  EXPECT_EQ(r->max_tokens, 16);
  p.add_special_tokens = false;
  EXPECT_EQ(PrepareRequest(ctx_, p)->prompt_ids,
            *model_->tokenizer->Encode("Once upon a time", false));

  p.max_tokens = 600;
  absl::StatusOr<PreparedRequest> too_long = PrepareRequest(ctx_, p);
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_long.status().message()), HasSubstr("maximum context length is 512"));

  p.model = "other";
  EXPECT_EQ(PrepareRequest(ctx_, p).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(BundledModelTest, PrepareTokenIdsWithEcho) {
  GenerationParams ids;
  ids.prompt_token_ids = std::vector<int32_t>{1, 400, 500};
  ids.echo = true;
  absl::StatusOr<PreparedRequest> r = PrepareRequest(ctx_, ids);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->prompt_ids, (std::vector<int32_t>{1, 400, 500}));
  EXPECT_EQ(r->prompt_text, *model_->tokenizer->Decode(std::vector<int32_t>{1, 400, 500}, false));
  ids.prompt_token_ids = std::vector<int32_t>{1, 512};
  EXPECT_EQ(PrepareRequest(ctx_, ids).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(BundledModelTest, InvalidUtf8PromptIsRefused) {
  GenerationParams p = TextPrompt("bad \xff byte");
  absl::StatusOr<PreparedRequest> r = PrepareRequest(ctx_, p);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ErrorParam(r.status()), "prompt");
}

}  // namespace
}  // namespace cleave::frontend
