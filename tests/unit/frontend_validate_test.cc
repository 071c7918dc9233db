// ValidateGenerationParams / ValidatePromptFits: every bound, at and just past its edge, and the
// OpenAI-style messages naming the field.
#include <cmath>
#include <limits>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cleave/frontend/generation_params.h"

namespace cleave::frontend {
namespace {

using ::testing::HasSubstr;

ModelInfo Model() { return {"tiny", 512, 1000}; }

GenerationParams Completion() {
  GenerationParams p;
  p.api = ApiKind::kCompletions;
  p.prompt = "Once upon a time";
  return p;
}

GenerationParams Chat() {
  GenerationParams p;
  p.api = ApiKind::kChat;
  p.messages = {{"user", "hi"}};
  return p;
}

absl::Status Check(const GenerationParams& p) { return ValidateGenerationParams(p, Model()); }

void ExpectInvalid(const GenerationParams& p, const std::string& field, const std::string& text) {
  absl::Status s = Check(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(text));
  EXPECT_EQ(ErrorParam(s), field);
}

TEST(FrontendValidate, DefaultsAreValid) {
  EXPECT_TRUE(Check(Completion()).ok());
  EXPECT_TRUE(Check(Chat()).ok());
}

TEST(FrontendValidate, ModelName) {
  GenerationParams p = Completion();
  p.model = "tiny";
  EXPECT_TRUE(Check(p).ok());
  p.model = "gpt-4";
  absl::Status s = Check(p);
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(s.message(), "The model `gpt-4` does not exist.");
  EXPECT_EQ(ErrorParam(s), "model");
}

TEST(FrontendValidate, MaxTokens) {
  GenerationParams p = Completion();
  p.max_tokens = 1;
  EXPECT_TRUE(Check(p).ok());
  p.max_tokens = 0;
  ExpectInvalid(p, "max_tokens", "max_tokens must be at least 1, got 0");
  p.max_tokens = -5;
  ExpectInvalid(p, "max_tokens", "max_tokens must be at least 1, got -5");
  p.max_tokens_field = "max_completion_tokens";
  ExpectInvalid(p, "max_completion_tokens", "max_completion_tokens must be at least 1, got -5");
}

TEST(FrontendValidate, N) {
  GenerationParams p = Completion();
  for (int64_t ok : {1, 128}) {
    p.n = ok;
    EXPECT_TRUE(Check(p).ok()) << ok;
  }
  p.n = 0;
  ExpectInvalid(p, "n", "n must be between 1 and 128, got 0");
  p.n = 129;
  ExpectInvalid(p, "n", "got 129");
}

struct FloatBound {
  const char* field;
  double GenerationParams::*member;
  std::vector<double> ok;
  std::vector<double> bad;
};

TEST(FrontendValidate, FloatBounds) {
  const double nan = std::nan("");
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<FloatBound> bounds = {
      {"temperature", &GenerationParams::temperature, {0, 0.7, 2}, {-0.01, 2.01, nan, inf}},
      {"top_p", &GenerationParams::top_p, {0.01, 1}, {0, -0.1, 1.01, nan}},
      {"min_p", &GenerationParams::min_p, {0, 0.5, 1}, {-0.1, 1.1, nan}},
      {"repetition_penalty", &GenerationParams::repetition_penalty, {0.01, 1, 2}, {0, -1, 2.01, nan}},
      {"presence_penalty", &GenerationParams::presence_penalty, {-2, 0, 2}, {-2.01, 2.01, nan}},
      {"frequency_penalty", &GenerationParams::frequency_penalty, {-2, 0, 2}, {-2.01, 2.01, nan}},
  };
  for (const FloatBound& b : bounds) {
    for (double v : b.ok) {
      GenerationParams p = Completion();
      p.*b.member = v;
      EXPECT_TRUE(Check(p).ok()) << b.field << "=" << v;
    }
    for (double v : b.bad) {
      GenerationParams p = Completion();
      p.*b.member = v;
      ExpectInvalid(p, b.field, std::string(b.field) + " must be");
    }
  }
  GenerationParams p = Completion();
  p.temperature = 2.5;
  ExpectInvalid(p, "temperature", "temperature must be between 0 and 2, got 2.5");
  p = Completion();
  p.top_p = 0;
  ExpectInvalid(p, "top_p", "top_p must be greater than 0 and at most 1, got 0");
}

TEST(FrontendValidate, TopK) {
  GenerationParams p = Completion();
  for (int64_t ok : {-1, 0, 1, 50, 100000}) {
    p.top_k = ok;
    EXPECT_TRUE(Check(p).ok()) << ok;
  }
  p.top_k = -2;
  ExpectInvalid(p, "top_k", "top_k must be -1 (disabled), 0 (disabled) or at least 1, got -2");
  p.top_k = int64_t{1} << 40;
  ExpectInvalid(p, "top_k", "too large");
}

TEST(FrontendValidate, LogprobsChat) {
  GenerationParams p = Chat();
  p.logprobs = true;
  for (int64_t ok : {0, 5, 20}) {
    p.top_logprobs = ok;
    EXPECT_TRUE(Check(p).ok()) << ok;
  }
  p.top_logprobs = 21;
  ExpectInvalid(p, "top_logprobs", "top_logprobs must be between 0 and 20, got 21");
  p.top_logprobs = -1;
  ExpectInvalid(p, "top_logprobs", "got -1");
  p.logprobs = false;
  p.top_logprobs = 3;
  ExpectInvalid(p, "top_logprobs", "top_logprobs requires logprobs to be true");
}

TEST(FrontendValidate, LogprobsCompletionsIsZeroToFive) {
  GenerationParams p = Completion();
  p.logprobs = true;
  p.top_logprobs = 5;
  EXPECT_TRUE(Check(p).ok());
  p.top_logprobs = 6;
  ExpectInvalid(p, "logprobs", "logprobs must be between 0 and 5, got 6");
  GenerationParams g = Completion();
  g.api = ApiKind::kGrpc;
  g.logprobs = true;
  g.top_logprobs = 20;
  EXPECT_TRUE(Check(g).ok());
}

TEST(FrontendValidate, Stop) {
  GenerationParams p = Completion();
  p.stop = {"a", "b", "c", "d"};
  EXPECT_TRUE(Check(p).ok());
  p.stop.push_back("e");
  ExpectInvalid(p, "stop", "stop must contain at most 4 strings, got 5");
  p.stop = {"a", ""};
  ExpectInvalid(p, "stop", "stop[1] must not be empty");
  p.stop = {std::string(1024, 'x')};
  EXPECT_TRUE(Check(p).ok());
  p.stop = {std::string(1025, 'x')};
  ExpectInvalid(p, "stop", "stop[0] must be at most 1024 bytes, got 1025");
}

TEST(FrontendValidate, TokenIdsInVocabulary) {
  GenerationParams p = Completion();
  p.stop_token_ids = {0, 999};
  EXPECT_TRUE(Check(p).ok());
  p.stop_token_ids = {1000};
  ExpectInvalid(p, "stop_token_ids", "stop_token_ids[0] must be a token id in [0, 1000), got 1000");
  p = Completion();
  p.prompt.reset();
  p.prompt_token_ids = std::vector<int32_t>{1, 2, -1};
  ExpectInvalid(p, "prompt", "prompt[2] must be a token id in [0, 1000), got -1");
}

TEST(FrontendValidate, Inputs) {
  GenerationParams p = Completion();
  p.prompt = "";
  ExpectInvalid(p, "prompt", "prompt must not be empty");
  p.prompt.reset();
  ExpectInvalid(p, "prompt", "exactly one of prompt and prompt_token_ids");
  p.prompt_token_ids = std::vector<int32_t>{};
  ExpectInvalid(p, "prompt", "prompt must not be empty");

  GenerationParams c = Chat();
  c.messages.clear();
  ExpectInvalid(c, "messages", "messages must contain at least one message");
  c.messages = {{"user", "hi"}, {"tool", "x"}};
  ExpectInvalid(c, "messages",
                "messages[1].role must be one of system, user, assistant, got 'tool'");
  c = Chat();
  c.prompt = "x";
  ExpectInvalid(c, "prompt", "chat requests take messages");
}

TEST(FrontendValidate, Priority) {
  GenerationParams p = Completion();
  p.priority = -7;
  EXPECT_TRUE(Check(p).ok());
  p.priority = int64_t{1} << 33;
  ExpectInvalid(p, "priority", "priority must fit in 32 bits");
}

TEST(FrontendValidate, PromptFitsCompletions) {
  GenerationParams p = Completion();
  EXPECT_EQ(*ValidatePromptFits(10, p, Model()), 16);   // OpenAI's default
  EXPECT_EQ(*ValidatePromptFits(500, p, Model()), 12);  // clamped to the room left
  absl::StatusOr<int> full = ValidatePromptFits(512, p, Model());
  EXPECT_EQ(full.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(full.status().message()),
              HasSubstr("maximum context length is 512 tokens. However, your prompt resulted in "
                        "512 tokens"));
  p.max_tokens = 502;
  EXPECT_EQ(*ValidatePromptFits(10, p, Model()), 502);
  p.max_tokens = 503;
  absl::StatusOr<int> over = ValidatePromptFits(10, p, Model());
  EXPECT_EQ(over.status().message(),
            "This model's maximum context length is 512 tokens, however you requested 513 tokens "
            "(10 in your prompt; 503 for the completion). Please reduce your prompt; or "
            "completion length.");
  p.max_tokens = std::numeric_limits<int64_t>::max();
  EXPECT_FALSE(ValidatePromptFits(10, p, Model()).ok());  // no overflow
}

TEST(FrontendValidate, PromptFitsChat) {
  GenerationParams p = Chat();
  EXPECT_EQ(*ValidatePromptFits(12, p, Model()), 500);  // chat: the rest of the context
  p.max_tokens = 600;
  absl::StatusOr<int> over = ValidatePromptFits(12, p, Model());
  EXPECT_EQ(over.status().message(),
            "This model's maximum context length is 512 tokens. However, you requested 612 tokens "
            "(12 in the messages, 600 in the completion). Please reduce the length of the "
            "messages or completion.");
  EXPECT_EQ(ErrorParam(over.status()), "messages");
}

}  // namespace
}  // namespace cleave::frontend
