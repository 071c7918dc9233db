// The OpenAI-compatible HTTP API on loopback (a real HttpServer, a raw-socket client, a scripted
// engine): routes, both generation APIs streamed and not, n / seed fan-out, logprobs, stop
// strings, every error status, tokenize/detokenize and the KV debug dump.
#include <chrono>
#include <map>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cleave/frontend/http_protocol.h"
#include "cleave/frontend/testing/http_test_client.h"
#include "nlohmann/json.hpp"

namespace cleave::frontend {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using testing::Client;
using testing::Get;
using testing::HttpHarness;
using testing::Post;
using testing::Response;
using testing::ScriptedEngine;
using testing::SseData;

class HttpTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(h_.Start().ok()); }
  HttpHarness h_;
};

void ExpectError(const Response& r, int status, const std::string& type, const std::string& text) {
  EXPECT_EQ(r.status, status) << r.body;
  json j = json::parse(r.body, nullptr, false);
  ASSERT_TRUE(j.is_object()) << r.body;
  ASSERT_TRUE(j.contains("error")) << r.body;
  EXPECT_EQ(j["error"]["type"], type) << r.body;
  EXPECT_THAT(j["error"]["message"].get<std::string>(), HasSubstr(text));
  EXPECT_TRUE(j["error"].contains("param"));
  EXPECT_TRUE(j["error"].contains("code"));
}

TEST_F(HttpTest, HealthReadyModels) {
  EXPECT_EQ(h_.Call(Get("/health")).status, 200);
  EXPECT_EQ(h_.Call(Get("/ready")).status, 200);
  h_.engine->set_ready(false);
  ExpectError(h_.Call(Get("/ready")), 503, "server_error", "not ready");
  h_.engine->set_ready(true);

  Response models = h_.Call(Get("/v1/models"));
  ASSERT_EQ(models.status, 200);
  json m = json::parse(models.body);
  EXPECT_EQ(m["object"], "list");
  EXPECT_EQ(m["data"][0]["id"], "tiny");
  EXPECT_EQ(m["data"][0]["object"], "model");
  EXPECT_EQ(m["data"][0]["max_model_len"], 512);
  EXPECT_EQ(h_.Call(Get("/v1/models/tiny")).status, 200);
  ExpectError(h_.Call(Get("/v1/models/other")), 404, "invalid_request_error", "does not exist");
}

TEST_F(HttpTest, NotFoundAndMethodNotAllowed) {
  ExpectError(h_.Call(Get("/v2/nothing")), 404, "invalid_request_error", "Not found");
  Response r = h_.Call(Get("/v1/completions"));
  ExpectError(r, 405, "invalid_request_error", "Method Not Allowed");
  EXPECT_EQ(r.headers["allow"], "POST");
  EXPECT_EQ(h_.Call(Post("/health", "{}")).status, 405);
}

TEST_F(HttpTest, CompletionNonStreaming) {
  h_.SetScript(h_.Tokens("there was a cat."));
  Response r = h_.Call(Post("/v1/completions", R"({"model": "tiny", "prompt": "Once upon a time",
                                                "max_tokens": 20, "echo": true})"));
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(r.headers["content-type"], "application/json");
  json j = json::parse(r.body);
  EXPECT_EQ(j["id"].get<std::string>().substr(0, 5), "cmpl-");
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["model"], "tiny");
  EXPECT_GT(j["created"].get<int64_t>(), 1600000000);
  ASSERT_EQ(j["choices"].size(), 1u);
  EXPECT_EQ(j["choices"][0]["text"], "Once upon a time there was a cat.");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["choices"][0]["logprobs"], nullptr);
  const int prompt = static_cast<int>(h_.model->tokenizer->Encode("Once upon a time", true)->size());
  EXPECT_EQ(j["usage"]["prompt_tokens"], prompt);
  EXPECT_EQ(j["usage"]["completion_tokens"], static_cast<int>(h_.script.tokens.size()));
  EXPECT_EQ(j["usage"]["total_tokens"], prompt + static_cast<int>(h_.script.tokens.size()));
  EXPECT_EQ(h_.engine->submitted()[0].max_tokens(), 20);
}

TEST_F(HttpTest, CompletionStreamingWithUsageAndKeepAlive) {
  h_.SetScript(h_.Tokens("the end"));
  Client c(h_.server->port());
  for (int round = 0; round < 2; ++round) {  // the same connection serves both
    ASSERT_TRUE(c.Send(Post("/v1/completions", R"({"prompt": "Hi", "stream": true,
                                                    "stream_options": {"include_usage": true}})")));
    Response r = c.Read();
    ASSERT_EQ(r.status, 200);
    EXPECT_EQ(r.headers["content-type"], "text/event-stream; charset=utf-8");
    std::vector<std::string> data = SseData(r.body);
    ASSERT_GE(data.size(), 3u);
    EXPECT_EQ(data.back(), "[DONE]");
    std::string text;
    std::string id;
    for (size_t i = 0; i + 2 < data.size(); ++i) {
      json chunk = json::parse(data[i]);
      EXPECT_EQ(chunk["object"], "text_completion");
      EXPECT_EQ(chunk["usage"], nullptr);
      if (id.empty()) id = chunk["id"];
      EXPECT_EQ(chunk["id"], id);  // one id for the whole stream
      text += chunk["choices"][0]["text"].get<std::string>();
    }
    EXPECT_EQ(text, " the end");
    json last = json::parse(data[data.size() - 3]);
    EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
    json usage = json::parse(data[data.size() - 2]);
    EXPECT_EQ(usage["choices"], json::array());
    EXPECT_EQ(usage["usage"]["completion_tokens"], h_.script.tokens.size());
  }
}

TEST_F(HttpTest, ChatStreamingWithNAndSeed) {
  h_.SetScript(h_.Tokens("Hello there"));
  Response r = h_.Call(Post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "Hi"}],
      "stream": true, "n": 3, "seed": 100, "temperature": 0.7, "top_k": 5})"));
  ASSERT_EQ(r.status, 200);
  std::vector<std::string> data = SseData(r.body);
  ASSERT_EQ(data.back(), "[DONE]");
  std::map<int, std::string> text;
  std::map<int, int> roles;
  std::map<int, std::string> finish;
  for (size_t i = 0; i + 1 < data.size(); ++i) {
    json chunk = json::parse(data[i]);
    EXPECT_EQ(chunk["object"], "chat.completion.chunk");
    EXPECT_EQ(chunk["id"].get<std::string>().substr(0, 9), "chatcmpl-");
    const json& choice = chunk["choices"][0];
    int index = choice["index"];
    if (choice["delta"].contains("role")) roles[index]++;
    if (choice["delta"].contains("content")) text[index] += choice["delta"]["content"].get<std::string>();
    if (!choice["finish_reason"].is_null()) finish[index] = choice["finish_reason"];
  }
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(roles[i], 1) << i;  // the role comes once, first
    EXPECT_EQ(text[i], " Hello there") << i;
    EXPECT_EQ(finish[i], "stop") << i;
  }
  std::vector<uint64_t> seeds;
  for (const v1::SubmitRequest& s : h_.engine->submitted()) {
    EXPECT_TRUE(s.has_seed());
    EXPECT_EQ(s.sampling().top_k(), 5);
    seeds.push_back(s.sampling().seed());
  }
  std::sort(seeds.begin(), seeds.end());
  EXPECT_EQ(seeds, (std::vector<uint64_t>{100, 101, 102}));
  // The plain template (no chat_template in this model dir) with BOS.
  const v1::SubmitRequest s = h_.engine->submitted()[0];
  std::vector<int32_t> prompt(s.token_ids().begin(), s.token_ids().end());
  EXPECT_EQ(prompt, *h_.model->tokenizer->Encode("User: Hi\nAssistant:", true));
}

TEST_F(HttpTest, ChatNonStreamingWithLogprobs) {
  std::vector<EngineToken> toks = h_.Tokens("Yes");
  for (EngineToken& t : toks) t.top = {{t.id, -0.5f}, {2, -3.0f}};
  h_.SetScript(toks);
  Response r = h_.Call(Post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "Ok?"}],
      "logprobs": true, "top_logprobs": 2, "max_completion_tokens": 10})"));
  ASSERT_EQ(r.status, 200) << r.body;
  json j = json::parse(r.body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], " Yes");
  const json& content = j["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), toks.size() + 1);  // + EOS
  EXPECT_FLOAT_EQ(content[0]["logprob"].get<float>(), -0.5f);
  ASSERT_EQ(content[0]["top_logprobs"].size(), 2u);
  EXPECT_EQ(content[0]["top_logprobs"][1]["token"], "</s>");
  EXPECT_TRUE(content[0]["bytes"].is_array());
  EXPECT_EQ(h_.engine->submitted()[0].max_tokens(), 10);
}

TEST_F(HttpTest, CompletionLogprobsAndBatch) {
  h_.SetScript(h_.Tokens("ok"));
  Response r = h_.Call(Post("/v1/completions", R"({"prompt": ["a", "b"], "n": 2, "logprobs": 0})"));
  ASSERT_EQ(r.status, 200) << r.body;
  json j = json::parse(r.body);
  ASSERT_EQ(j["choices"].size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(j["choices"][i]["index"], i);
    EXPECT_EQ(j["choices"][i]["text"], " ok");
    EXPECT_TRUE(j["choices"][i]["logprobs"]["tokens"].is_array());
    EXPECT_TRUE(j["choices"][i]["logprobs"]["text_offset"].is_array());
  }
  EXPECT_EQ(h_.engine->submitted().size(), 4u);
}

TEST_F(HttpTest, StopStringEndsTheRequest) {
  h_.SetScript(h_.Tokens("one two three"), false);
  h_.script.hang = true;
  h_.script.interval = std::chrono::milliseconds(2);
  Response r = h_.Call(Post("/v1/completions", R"({"prompt": "x", "stop": ["two"], "max_tokens": 50})"));
  ASSERT_EQ(r.status, 200);
  json j = json::parse(r.body);
  EXPECT_EQ(j["choices"][0]["text"], " one ");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  ASSERT_TRUE(h_.NoRequestsLeft());
  ASSERT_EQ(h_.engine->cancels().size(), 1u);
  EXPECT_TRUE(h_.engine->cancels()[0].second);
}

TEST_F(HttpTest, LengthFinish) {
  h_.SetScript(h_.Tokens("a b"), false);
  h_.script.finished_by_length = true;
  Response r = h_.Call(Post("/v1/completions", R"({"prompt": "x", "max_tokens": 2})"));
  EXPECT_EQ(json::parse(r.body)["choices"][0]["finish_reason"], "length");
}

TEST_F(HttpTest, BadRequests) {
  ExpectError(h_.Call(Post("/v1/completions", "{nope")), 400, "invalid_request_error", "Invalid JSON");
  ExpectError(h_.Call(Post("/v1/completions", R"({"prompt": "x", "temperature": "hot"})")), 400,
              "invalid_request_error", "temperature must be a number");
  ExpectError(h_.Call(Post("/v1/completions", R"({"prompt": "x", "temperature": 3})")), 400,
              "invalid_request_error", "temperature must be between 0 and 2, got 3");
  ExpectError(h_.Call(Post("/v1/completions", R"({"prompt": "x", "max_tokens": -5})")), 400,
              "invalid_request_error", "max_tokens must be at least 1, got -5");
  ExpectError(h_.Call(Post("/v1/completions", R"({"prompt": "x", "suffix": "y"})")), 400,
              "invalid_request_error", "suffix is not supported");
  ExpectError(h_.Call(Post("/v1/completions", R"({"prompt": "x", "best_of": 2})")), 400,
              "invalid_request_error", "best_of is not supported");
  ExpectError(h_.Call(Post("/v1/chat/completions", R"({"messages": []})")), 400,
              "invalid_request_error", "at least one message");
  ExpectError(h_.Call(Post("/v1/completions", R"({"prompt": "x", "max_tokens": 100000})")), 400,
              "invalid_request_error", "maximum context length is 512 tokens");
  Response nf = h_.Call(Post("/v1/completions", R"({"model": "gpt-4", "prompt": "x"})"));
  ExpectError(nf, 404, "invalid_request_error", "The model `gpt-4` does not exist.");
  EXPECT_EQ(json::parse(nf.body)["error"]["code"], "model_not_found");
  EXPECT_EQ(json::parse(nf.body)["error"]["param"], "model");
  EXPECT_TRUE(h_.engine->submitted().empty());
}

TEST_F(HttpTest, EngineErrors) {
  {
    std::lock_guard<std::mutex> lock(h_.mu);
    h_.script = {};
    h_.script.error = absl::ResourceExhaustedError("the scheduler queue is full");
    h_.script.retry_after_s = 3;
  }
  Response r = h_.Call(Post("/v1/completions", R"({"prompt": "x", "stream": true})"));
  ExpectError(r, 429, "rate_limit_error", "queue is full");
  EXPECT_EQ(r.headers["retry-after"], "3");
  {
    std::lock_guard<std::mutex> lock(h_.mu);
    h_.script.error = absl::UnavailableError("no workers");
  }
  ExpectError(h_.Call(Post("/v1/chat/completions", R"({"messages": [{"role": "user", "content": "x"}]})")),
              503, "server_error", "no workers");
  {
    std::lock_guard<std::mutex> lock(h_.mu);
    h_.script.error = absl::InternalError("boom");
  }
  ExpectError(h_.Call(Post("/v1/completions", R"({"prompt": "x"})")), 500, "server_error", "boom");
}

TEST_F(HttpTest, ErrorMidStreamBecomesAnEvent) {
  {
    std::lock_guard<std::mutex> lock(h_.mu);
    h_.script = {};
    h_.script.tokens = h_.Tokens("fine so far");
    h_.script.error = absl::InternalError("worker died");
  }
  // The status line went out with the first token: the error arrives as an event, then [DONE].
  Response r = h_.Call(Post("/v1/completions", R"({"prompt": "x", "stream": true})"));
  ASSERT_TRUE(r.ok);
  EXPECT_EQ(r.status, 200);
  std::vector<std::string> data = SseData(r.body);
  ASSERT_GE(data.size(), 3u);
  EXPECT_EQ(data.back(), "[DONE]");
  json error = json::parse(data[data.size() - 2]);
  EXPECT_EQ(error["error"]["message"], "worker died");
  EXPECT_EQ(error["error"]["type"], "server_error");
  std::string text;
  for (size_t i = 0; i + 2 < data.size(); ++i) {
    text += json::parse(data[i])["choices"][0]["text"].get<std::string>();
  }
  EXPECT_EQ(text, " fine so far");

  // With n = 2, the failing choice cancels its sibling.
  int calls = 0;
  h_.scripter = [&](const v1::SubmitRequest&) {
    ScriptedEngine::Script s;
    s.tokens = h_.Tokens("a b c d e f");
    if (calls++ == 0) {
      s.error = absl::InternalError("worker died");
    } else {
      s.hang = true;
    }
    return s;
  };
  r = h_.Call(Post("/v1/completions", R"({"prompt": "x", "n": 2, "stream": true})"));
  EXPECT_THAT(r.body, HasSubstr("worker died"));
  EXPECT_TRUE(h_.NoRequestsLeft());
}

TEST_F(HttpTest, TokenizeDetokenize) {
  Response t = h_.Call(Post("/tokenize", R"({"prompt": "Hello world"})"));
  ASSERT_EQ(t.status, 200) << t.body;
  json j = json::parse(t.body);
  std::vector<int32_t> expected = *h_.model->tokenizer->Encode("Hello world", true);
  EXPECT_EQ(j["tokens"].get<std::vector<int32_t>>(), expected);
  EXPECT_EQ(j["count"], expected.size());
  EXPECT_EQ(j["max_model_len"], 512);
  Response chat = h_.Call(Post("/tokenize", R"({"messages": [{"role": "user", "content": "Hi"}]})"));
  EXPECT_EQ(json::parse(chat.body)["tokens"].get<std::vector<int32_t>>(),
            *h_.model->tokenizer->Encode("User: Hi\nAssistant:", false));

  Response d = h_.Call(Post("/detokenize", json{{"tokens", expected}}.dump()));
  ASSERT_EQ(d.status, 200);
  EXPECT_EQ(json::parse(d.body)["prompt"], *h_.model->tokenizer->Decode(expected, false));
  ExpectError(h_.Call(Post("/detokenize", R"({"tokens": [99999]})")), 400, "invalid_request_error",
              "tokens[0] must be a token id");
  ExpectError(h_.Call(Post("/tokenize", R"({"prompt": "x", "model": "nope"})")), 404,
              "invalid_request_error", "does not exist");
}

TEST_F(HttpTest, DebugKvShowsNoLeakAfterRequests) {
  h_.SetScript(h_.Tokens("a"));
  for (int i = 0; i < 3; ++i) h_.Call(Post("/v1/completions", R"({"prompt": "x", "stream": true})"));
  ASSERT_TRUE(h_.NoRequestsLeft());
  Response r = h_.Call(Get("/debug/kv"));
  ASSERT_EQ(r.status, 200);
  json j = json::parse(r.body);
  ASSERT_EQ(j["workers"].size(), 1u);
  EXPECT_EQ(j["workers"][0]["used_blocks"], 0);
  EXPECT_EQ(j["workers"][0]["free_blocks"], j["workers"][0]["num_kv_blocks"]);
  EXPECT_EQ(j["workers"][0]["role"], "colocated");
}

}  // namespace
}  // namespace cleave::frontend
