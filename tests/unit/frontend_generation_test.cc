// The generation pipeline: stop strings (StopMatcher alone and inside GenerationStream), EOS and
// length endings, cancellation, engine errors, logprob token texts and the engine request the
// stream builds. Uses a Llama-2-style tokenizer and a scripted engine.
#include <condition_variable>
#include <filesystem>
#include <mutex>

#include <unistd.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cleave/frontend/chat_template.h"
#include "cleave/frontend/generation.h"
#include "cleave/frontend/stop_matcher.h"
#include "cleave/frontend/testing/scripted_engine.h"
#include "cleave/frontend/testing/tiny_model.h"

namespace cleave::frontend {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using testing::ScriptedEngine;

// ---- StopMatcher -------------------------------------------------------------------------

std::string Feed(StopMatcher& m, const std::vector<std::string>& pieces, bool* stopped) {
  std::string out;
  for (const std::string& p : pieces) {
    StopMatcher::Result r = m.Push(p);
    out += r.text;
    if (r.stopped) {
      *stopped = true;
      return out;
    }
  }
  *stopped = false;
  return out + m.Flush();
}

TEST(FrontendStopMatcher, NoStopsPassesThrough) {
  StopMatcher m({});
  EXPECT_EQ(m.Push("abc").text, "abc");
  EXPECT_EQ(m.Flush(), "");
}

TEST(FrontendStopMatcher, StopInsideOnePiece) {
  StopMatcher m({"END"});
  StopMatcher::Result r = m.Push("fooENDbar");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.text, "foo");
  EXPECT_TRUE(m.Push("more").stopped);
  EXPECT_EQ(m.Push("more").text, "");
}

TEST(FrontendStopMatcher, StopSplitAcrossPiecesIsHeldBack) {
  StopMatcher m({"\n\nUser:"});
  EXPECT_EQ(m.Push("Hello").text, "Hello");
  EXPECT_EQ(m.Push("!\n").text, "!");  // "\n" may start the stop string
  EXPECT_EQ(m.Push("\nUs").text, "");
  StopMatcher::Result r = m.Push("er: hi");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.text, "");
}

TEST(FrontendStopMatcher, FalseStartIsReleased) {
  StopMatcher m({"abc"});
  EXPECT_EQ(m.Push("xab").text, "x");
  EXPECT_EQ(m.Push("d").text, "abd");
  EXPECT_EQ(m.Push("a").text, "");
  EXPECT_EQ(m.Flush(), "a");  // end of generation: held-back text is emitted
}

TEST(FrontendStopMatcher, EarliestOfSeveralStopsWins) {
  bool stopped = false;
  StopMatcher m({"cd", "b"});
  EXPECT_EQ(Feed(m, {"a", "bcd"}, &stopped), "a");
  EXPECT_TRUE(stopped);
  StopMatcher m2({"xyz", "yz!"});
  EXPECT_EQ(Feed(m2, {"ax", "y", "z!"}, &stopped), "a");
}

TEST(FrontendStopMatcher, MultibyteStopNeverSplitsCharacters) {
  // "你好" and "你们": the shared first character is held until the second decides.
  StopMatcher m({"\xe4\xbd\xa0\xe5\xa5\xbd"});
  EXPECT_EQ(m.Push("a\xe4\xbd\xa0").text, "a");
  EXPECT_EQ(m.Push("\xe4\xbb\xac").text, "\xe4\xbd\xa0\xe4\xbb\xac");
  EXPECT_EQ(m.Push("\xe4\xbd\xa0").text, "");
  StopMatcher::Result r = m.Push("\xe5\xa5\xbd!");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(r.text, "");
}

// ---- GenerationStream ----------------------------------------------------------------------

class GenerationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // A tokenizer.json model (testing/tiny_model.h): these tests exercise the Hugging Face
    // tokenizer path; frontend_model_test covers the bundled SentencePiece tokenizer.model.
    absl::StatusOr<std::filesystem::path> dir = testing::MakeTinyModelDir("generation");
    ASSERT_TRUE(dir.ok()) << dir.status();
    dir_ = *dir;
    absl::StatusOr<std::unique_ptr<FrontendModel>> m = LoadFrontendModel(dir_);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = *std::move(m);
    engine_ = std::make_unique<ScriptedEngine>([this](const v1::SubmitRequest&) {
      std::lock_guard<std::mutex> lock(mu_);
      return script_;
    });
    ctx_ = model_->MakeContext(engine_.get());
  }

  // Ids a model would generate for " " + text: SentencePiece's dummy prefix supplies the space.
  std::vector<EngineToken> Tokens(const std::string& text) {
    std::vector<EngineToken> out;
    absl::StatusOr<std::vector<int32_t>> ids = model_->tokenizer->Encode(text, false);
    EXPECT_TRUE(ids.ok()) << ids.status();
    for (int32_t id : ids.value_or(std::vector<int32_t>{})) out.push_back({id, -0.5f, {}});
    return out;
  }
  EngineToken Eos() { return {model_->tokenizer->eos_id(), -0.1f, {}}; }

  GenerationParams Params() {
    GenerationParams p;
    p.prompt = "Once upon a time";
    p.max_tokens = 50;
    return p;
  }

  // Runs one stream to its last update (or until `cancel_after` updates, then Cancel).
  std::vector<GenerationUpdate> Run(const GenerationParams& params, int choice = 0) {
    absl::StatusOr<PreparedRequest> prepared = PrepareRequest(ctx_, params);
    EXPECT_TRUE(prepared.ok()) << prepared.status();
    stream_ = GenerationStream::Start(ctx_, params, *prepared, choice, [this](GenerationUpdate u) {
      std::lock_guard<std::mutex> lock(mu_);
      updates_.push_back(std::move(u));
      cv_.notify_all();
    });
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(5), [&] {
      return !updates_.empty() &&
             (!updates_.back().status.ok() || updates_.back().finish != FinishReason::kNone);
    });
    return updates_;
  }

  static std::string TextOf(const std::vector<GenerationUpdate>& updates) {
    std::string text;
    for (const GenerationUpdate& u : updates) text += u.text;
    return text;
  }

  void TearDown() override {
    stream_.reset();
    engine_.reset();
    std::filesystem::remove_all(dir_);
  }

  std::filesystem::path dir_;
  std::unique_ptr<FrontendModel> model_;
  std::unique_ptr<ScriptedEngine> engine_;
  FrontendContext ctx_;
  std::mutex mu_;
  std::condition_variable cv_;
  ScriptedEngine::Script script_;
  std::vector<GenerationUpdate> updates_;
  std::shared_ptr<GenerationStream> stream_;
};

TEST_F(GenerationTest, EosEndsWithStopAndAddsNoText) {
  script_.tokens = Tokens("there was a cat.");
  script_.tokens.push_back(Eos());
  std::vector<GenerationUpdate> u = Run(Params());
  ASSERT_FALSE(u.empty());
  EXPECT_EQ(TextOf(u), " there was a cat.");
  EXPECT_EQ(u.back().finish, FinishReason::kStop);
  EXPECT_EQ(u.back().usage.completion_tokens, static_cast<int>(script_.tokens.size()));
  EXPECT_EQ(u.back().usage.prompt_tokens,
            static_cast<int>(model_->tokenizer->Encode("Once upon a time", true)->size()));
  EXPECT_TRUE(engine_->cancels().empty());  // the engine ended it itself
}

TEST_F(GenerationTest, SubmitRequestCarriesEverything) {
  script_.tokens = {Eos()};
  GenerationParams p = Params();
  p.temperature = 0.5;
  p.top_p = 0.9;
  p.top_k = 7;
  p.min_p = 0.05;
  p.repetition_penalty = 1.1;
  p.presence_penalty = 0.3;
  p.frequency_penalty = -0.2;
  p.seed = 42;
  p.logprobs = true;
  p.top_logprobs = 3;
  p.stop_token_ids = {13};
  p.priority = -2;
  Run(p, /*choice=*/3);
  ASSERT_EQ(engine_->submitted().size(), 1u);
  const v1::SubmitRequest r = engine_->submitted()[0];
  EXPECT_EQ(r.max_tokens(), 50);
  EXPECT_FLOAT_EQ(r.sampling().temperature(), 0.5f);
  EXPECT_FLOAT_EQ(r.sampling().top_p(), 0.9f);
  EXPECT_EQ(r.sampling().top_k(), 7);
  EXPECT_FLOAT_EQ(r.sampling().min_p(), 0.05f);
  EXPECT_FLOAT_EQ(r.sampling().repetition_penalty(), 1.1f);
  EXPECT_FLOAT_EQ(r.sampling().presence_penalty(), 0.3f);
  EXPECT_FLOAT_EQ(r.sampling().frequency_penalty(), -0.2f);
  EXPECT_TRUE(r.has_seed());
  EXPECT_EQ(r.sampling().seed(), 45u);  // seed + choice index
  EXPECT_TRUE(r.sampling().logprobs());
  EXPECT_EQ(r.sampling().top_logprobs(), 3);
  EXPECT_THAT(r.stop_token_ids(), ElementsAre(13, model_->tokenizer->eos_id()));
  EXPECT_FALSE(r.ignore_eos());
  EXPECT_EQ(r.priority(), -2);
  std::vector<int32_t> prompt(r.token_ids().begin(), r.token_ids().end());
  EXPECT_EQ(prompt, *model_->tokenizer->Encode("Once upon a time", true));
}

TEST_F(GenerationTest, IgnoreEosLeavesEosOutOfStopIds) {
  script_.tokens = Tokens("a");
  script_.finished_by_length = true;
  GenerationParams p = Params();
  p.ignore_eos = true;
  std::vector<GenerationUpdate> u = Run(p);
  EXPECT_EQ(engine_->submitted()[0].stop_token_ids_size(), 0);
  EXPECT_TRUE(engine_->submitted()[0].ignore_eos());
  EXPECT_FALSE(engine_->submitted()[0].has_seed());
  EXPECT_EQ(u.back().finish, FinishReason::kLength);
}

TEST_F(GenerationTest, StopStringSplitAcrossTokensCancelsAsFinished) {
  script_.tokens = Tokens("there was a big dog. The end.");
  script_.tokens.push_back(Eos());
  script_.interval = std::chrono::milliseconds(1);
  GenerationParams p = Params();
  p.stop = {"big dog"};
  std::vector<GenerationUpdate> u = Run(p);
  EXPECT_EQ(TextOf(u), " there was a ");
  EXPECT_EQ(u.back().finish, FinishReason::kStop);
  ASSERT_TRUE(engine_->WaitFor([](size_t, size_t cancels, size_t) { return cancels == 1; }));
  EXPECT_TRUE(engine_->cancels()[0].second);  // finished = true: a stop string, not the client
  EXPECT_LT(u.back().usage.completion_tokens, static_cast<int>(script_.tokens.size()));
}

TEST_F(GenerationTest, StopStringInsideOneEventDropsLaterTokens) {
  script_.tokens = Tokens("one two three four");
  script_.tokens_per_event = 100;
  script_.hang = true;  // only the stop string can end it
  GenerationParams p = Params();
  p.stop = {"two"};
  std::vector<GenerationUpdate> u = Run(p);
  EXPECT_EQ(TextOf(u), " one ");
  EXPECT_EQ(u.back().finish, FinishReason::kStop);
  // Tokens after the one completing "two" are not counted.
  int through_two = static_cast<int>(Tokens("one two").size());
  EXPECT_EQ(u.back().usage.completion_tokens, through_two);
  ASSERT_TRUE(engine_->WaitFor([](size_t active, size_t, size_t) { return active == 0; }));
}

TEST_F(GenerationTest, StopMatchedInsideSubmitIsCancelledAfterIt) {
  script_.tokens = Tokens("stop here");
  script_.tokens_per_event = 100;
  script_.hang = true;
  script_.first_event_in_submit = true;
  GenerationParams p = Params();
  p.stop = {"here"};
  std::vector<GenerationUpdate> u = Run(p);
  EXPECT_EQ(u.back().finish, FinishReason::kStop);
  ASSERT_TRUE(engine_->WaitFor([](size_t, size_t cancels, size_t) { return cancels == 1; }));
  EXPECT_EQ(engine_->active(), 0u);
}

TEST_F(GenerationTest, HeldBackTextIsReleasedAtTheEnd) {
  script_.tokens = Tokens("the end");
  script_.tokens.push_back(Eos());
  GenerationParams p = Params();
  p.stop = {"end of it"};
  std::vector<GenerationUpdate> u = Run(p);
  EXPECT_EQ(TextOf(u), " the end");
  EXPECT_EQ(u.back().finish, FinishReason::kStop);
}

TEST_F(GenerationTest, MultibyteTextAndStop) {
  // The 512-piece vocabulary has no CJK pieces: these characters arrive as byte tokens.
  const std::string text = " Tom said \xe4\xbd\xa0\xe5\xa5\xbd to the \xe7\x8c\xab.";
  script_.tokens = Tokens(text.substr(1));
  ASSERT_GT(script_.tokens.size(), 10u);
  script_.tokens.push_back(Eos());
  std::vector<GenerationUpdate> u = Run(Params());
  EXPECT_EQ(TextOf(u), text);
  for (const GenerationUpdate& x : u) {  // no update carries half a character
    for (unsigned char c : x.text.substr(0, 1)) EXPECT_NE(c & 0xC0, 0x80) << x.text;
  }

  updates_.clear();
  GenerationParams p = Params();
  p.stop = {"\xe5\xa5\xbd"};
  u = Run(p);
  EXPECT_EQ(TextOf(u), " Tom said \xe4\xbd\xa0");
  EXPECT_EQ(u.back().finish, FinishReason::kStop);
}

TEST_F(GenerationTest, CancelStopsUpdatesAndTellsTheEngine) {
  script_.tokens = Tokens("a");
  script_.hang = true;
  absl::StatusOr<PreparedRequest> prepared = PrepareRequest(ctx_, Params());
  ASSERT_TRUE(prepared.ok());
  std::atomic<int> calls{0};
  auto stream = GenerationStream::Start(ctx_, Params(), *prepared, 0,
                                        [&](GenerationUpdate) { calls++; });
  ASSERT_TRUE(engine_->WaitFor([](size_t, size_t, size_t submitted) { return submitted == 1; }));
  stream->Cancel();
  stream->Cancel();  // idempotent
  EXPECT_TRUE(stream->done());
  ASSERT_EQ(engine_->cancels().size(), 1u);
  EXPECT_FALSE(engine_->cancels()[0].second);
  const int seen = calls.load();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(calls.load(), seen);
}

TEST_F(GenerationTest, EngineErrorCarriesRetryAfter) {
  script_.error = absl::ResourceExhaustedError("over capacity");
  script_.retry_after_s = 7;
  std::vector<GenerationUpdate> u = Run(Params());
  ASSERT_EQ(u.size(), 1u);
  EXPECT_EQ(u[0].status.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(u[0].retry_after_s, 7);
}

TEST_F(GenerationTest, LogprobTokenTextsKeepLeadingSpace) {
  std::vector<EngineToken> toks = Tokens("cat dog");
  ASSERT_GE(toks.size(), 2u);
  const int32_t dog = Tokens("dog")[0].id;  // "▁d..." : a piece with SentencePiece's space
  toks[0].top = {{toks[0].id, -0.5f}, {dog, -1.5f}};
  script_.tokens = toks;
  script_.tokens.push_back(Eos());
  GenerationParams p = Params();
  p.logprobs = true;
  p.top_logprobs = 2;
  std::vector<GenerationUpdate> u = Run(p);
  std::vector<GeneratedToken> all;
  for (const GenerationUpdate& x : u) all.insert(all.end(), x.tokens.begin(), x.tokens.end());
  ASSERT_EQ(all.size(), toks.size() + 1);
  std::string joined;
  for (size_t i = 0; i + 1 < all.size(); ++i) joined += all[i].token;
  EXPECT_EQ(joined, " cat dog");
  ASSERT_EQ(all[0].top.size(), 2u);
  EXPECT_EQ(all[0].top[0].text, all[0].token);
  EXPECT_EQ(all[0].top[1].text.substr(0, 1), " ");
  EXPECT_FLOAT_EQ(all[0].top[1].logprob, -1.5f);
  EXPECT_EQ(all.back().token, "</s>");  // EOS: in the logprobs, not in the text
}

}  // namespace
}  // namespace cleave::frontend
