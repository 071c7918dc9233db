// The OpenAI wire format: request parsing (types, unknown and unsupported fields, batches,
// content parts), response/chunk shapes, SSE and chunked framing, and the error body.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "cleave/frontend/http_protocol.h"
#include "cleave/frontend/openai_api.h"
#include "nlohmann/json.hpp"

namespace cleave::frontend {
namespace {

using nlohmann::json;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

GenerationParams Completion(const std::string& body) {
  absl::StatusOr<std::vector<GenerationParams>> p = ParseCompletionRequest(body);
  EXPECT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p.value_or(std::vector<GenerationParams>{}).size(), 1u);
  return p.ok() && !p->empty() ? (*p)[0] : GenerationParams{};
}

void ExpectCompletionError(const std::string& body, const std::string& param,
                           const std::string& text) {
  absl::StatusOr<std::vector<GenerationParams>> p = ParseCompletionRequest(body);
  ASSERT_FALSE(p.ok()) << body;
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr(text)) << body;
  EXPECT_EQ(ErrorParam(p.status()), param) << body;
}

void ExpectChatError(const std::string& body, const std::string& param, const std::string& text) {
  absl::StatusOr<GenerationParams> p = ParseChatCompletionRequest(body);
  ASSERT_FALSE(p.ok()) << body;
  EXPECT_THAT(std::string(p.status().message()), HasSubstr(text)) << body;
  EXPECT_EQ(ErrorParam(p.status()), param) << body;
}

TEST(FrontendOpenAiParse, CompletionAllFields) {
  GenerationParams p = Completion(R"({
    "model": "m", "prompt": "hi", "max_tokens": 7, "n": 2, "temperature": 0.5, "top_p": 0.9,
    "top_k": 40, "min_p": 0.1, "repetition_penalty": 1.2, "presence_penalty": 0.5,
    "frequency_penalty": -0.5, "seed": 11, "logprobs": 3, "stop": ["\n", "END"],
    "stop_token_ids": [5], "ignore_eos": true, "priority": 3, "stream": true,
    "stream_options": {"include_usage": true}, "echo": false, "skip_special_tokens": false,
    "user": "u1", "best_of": 1, "suffix": "", "logit_bias": {}, "add_special_tokens": false})");
  EXPECT_EQ(p.api, ApiKind::kCompletions);
  EXPECT_EQ(p.model, "m");
  EXPECT_EQ(*p.prompt, "hi");
  EXPECT_EQ(*p.max_tokens, 7);
  EXPECT_EQ(p.n, 2);
  EXPECT_DOUBLE_EQ(p.temperature, 0.5);
  EXPECT_DOUBLE_EQ(p.top_p, 0.9);
  EXPECT_EQ(p.top_k, 40);
  EXPECT_DOUBLE_EQ(p.min_p, 0.1);
  EXPECT_DOUBLE_EQ(p.repetition_penalty, 1.2);
  EXPECT_DOUBLE_EQ(p.presence_penalty, 0.5);
  EXPECT_DOUBLE_EQ(p.frequency_penalty, -0.5);
  EXPECT_EQ(*p.seed, 11u);
  EXPECT_TRUE(p.logprobs);
  EXPECT_EQ(p.top_logprobs, 3);
  EXPECT_THAT(p.stop, ElementsAre("\n", "END"));
  EXPECT_THAT(p.stop_token_ids, ElementsAre(5));
  EXPECT_TRUE(p.ignore_eos);
  EXPECT_EQ(p.priority, 3);
  EXPECT_TRUE(p.stream);
  EXPECT_TRUE(p.include_usage);
  EXPECT_FALSE(p.skip_special_tokens);
  EXPECT_FALSE(p.add_special_tokens);
  EXPECT_EQ(p.user, "u1");
}

TEST(FrontendOpenAiParse, NullMeansNotGivenAndIntegralFloatsAreIntegers) {
  GenerationParams p = Completion(R"({"prompt": "x", "max_tokens": null, "temperature": null,
                                      "stop": "one", "n": 2.0, "seed": -1})");
  EXPECT_FALSE(p.max_tokens.has_value());
  EXPECT_DOUBLE_EQ(p.temperature, 1.0);
  EXPECT_THAT(p.stop, ElementsAre("one"));
  EXPECT_EQ(p.n, 2);
  EXPECT_EQ(*p.seed, ~uint64_t{0});
}

TEST(FrontendOpenAiParse, PromptShapes) {
  EXPECT_THAT(*Completion(R"({"prompt": [1, 2, 3]})").prompt_token_ids, ElementsAre(1, 2, 3));
  absl::StatusOr<std::vector<GenerationParams>> batch =
      ParseCompletionRequest(R"({"prompt": ["a", [4, 5], "c"], "n": 2})");
  ASSERT_TRUE(batch.ok());
  ASSERT_EQ(batch->size(), 3u);
  EXPECT_EQ(*(*batch)[0].prompt, "a");
  EXPECT_THAT(*(*batch)[1].prompt_token_ids, ElementsAre(4, 5));
  EXPECT_EQ((*batch)[2].n, 2);
  ExpectCompletionError(R"({"prompt": []})", "prompt", "prompt must not be empty");
  ExpectCompletionError(R"({"prompt": 5})", "prompt", "prompt must be a string");
  ExpectCompletionError(R"({"prompt": [1, "a"]})", "prompt", "an array of integers");
  ExpectCompletionError(R"({"prompt": [{"a": 1}]})", "prompt", "prompt must be");
  ExpectCompletionError(R"({"max_tokens": 5})", "prompt", "prompt is required");
}

TEST(FrontendOpenAiParse, WrongTypes) {
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      {R"({"prompt": "x", "temperature": "hot"})", "temperature",
       "temperature must be a number, got string"},
      {R"({"prompt": "x", "max_tokens": 1.5})", "max_tokens", "max_tokens must be an integer, got number"},
      {R"({"prompt": "x", "max_tokens": "10"})", "max_tokens", "got string"},
      {R"({"prompt": "x", "n": true})", "n", "n must be an integer, got boolean"},
      {R"({"prompt": "x", "stream": "yes"})", "stream", "stream must be a boolean, got string"},
      {R"({"prompt": "x", "stop": 3})", "stop", "stop must be a string or an array of strings"},
      {R"({"prompt": "x", "stop": ["a", 1]})", "stop", "array of strings"},
      {R"({"prompt": "x", "model": 7})", "model", "model must be a string, got integer"},
      {R"({"prompt": "x", "logprobs": true})", "logprobs", "logprobs must be an integer"},
      {R"({"prompt": "x", "stream": true, "stream_options": []})", "stream_options", "an object"},
      {R"({"prompt": "x", "seed": 1e300})", "seed", "seed must be an integer"},
      {R"({"prompt": "x", "top_k": 99999999999999999999})", "top_k", "integer"},
  };
  for (const auto& [body, param, text] : cases) ExpectCompletionError(body, param, text);
}

TEST(FrontendOpenAiParse, UnknownAndUnsupportedFields) {
  ExpectCompletionError(R"({"prompt": "x", "frobnicate": 1})", "frobnicate",
                        "Unrecognized request argument supplied: frobnicate");
  ExpectCompletionError(R"({"prompt": "x", "suffix": "tail"})", "suffix", "suffix is not supported");
  ExpectCompletionError(R"({"prompt": "x", "best_of": 3})", "best_of", "best_of is not supported");
  ExpectCompletionError(R"({"prompt": "x", "logit_bias": {"5": 10}})", "logit_bias", "not supported");
  ExpectCompletionError(R"({"prompt": "x", "echo": true, "logprobs": 1})", "echo", "not supported");
  ExpectCompletionError(R"({"prompt": "x", "stream_options": {"include_usage": true}})",
                        "stream_options", "only allowed when stream is true");
  ExpectCompletionError(R"({"prompt": "x", "stream": true, "stream_options": {"foo": 1}})",
                        "stream_options", "stream_options.foo is not supported");
  ExpectChatError(R"({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})",
                  "tools", "tools is not supported");
  ExpectChatError(R"({"messages": [{"role": "user", "content": "x"}],
                      "response_format": {"type": "json_object"}})",
                  "response_format", "not supported");
  ExpectChatError(R"({"messages": [{"role": "user", "content": "x"}], "echo": true})", "echo",
                  "Unrecognized request argument supplied: echo");
}

// Every field of both endpoints set to a value of every JSON type: never an exception or a crash,
// always OK or InvalidArgument.
TEST(FrontendOpenAiParse, EveryFieldWithEveryTypeNeverThrows) {
  const std::vector<json> values = {
      nullptr, true, false, 0, -1, 7, int64_t{-9223372036854775807} - 1, ~uint64_t{0}, 0.5, -2.5,
      1e308, "", "text", json::array(), json::array({1, 2}), json::array({"a", 3}),
      json::array({json::object()}), json::object(), json{{"type", 5}}, json{{"type", "text"}},
      json{{"include_usage", "yes"}}, json::array({json{{"type", "text"}, {"text", 1}}})};
  const std::vector<std::string> fields = {
      "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "n", "temperature",
      "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
      "seed", "logprobs", "top_logprobs", "stop", "stop_token_ids", "ignore_eos", "priority",
      "stream", "stream_options", "echo", "skip_special_tokens", "user", "best_of", "suffix",
      "logit_bias", "min_tokens", "response_format", "tools", "tool_choice",
      "add_generation_prompt", "add_special_tokens", "include_stop_str_in_output",
      "prompt_logprobs", "unknown_field"};
  const json completion = {{"prompt", "hi"}, {"stream", true}};
  const json chat = {{"messages", json::array({{{"role", "user"}, {"content", "hi"}}})},
                     {"stream", true}};
  int checked = 0;
  for (const std::string& field : fields) {
    for (const json& value : values) {
      for (const json* base : {&completion, &chat}) {
        json body = *base;
        body[field] = value;
        const std::string text = body.dump(-1, ' ', false, json::error_handler_t::replace);
        absl::Status s1 = ParseCompletionRequest(text).status();
        absl::Status s2 = ParseChatCompletionRequest(text).status();
        absl::Status s3 = ParseTokenizeRequest(text).status();
        for (const absl::Status& s : {s1, s2, s3}) {
          EXPECT_TRUE(s.ok() || s.code() == absl::StatusCode::kInvalidArgument) << text << ": " << s;
        }
        ++checked;
      }
    }
    // A message with the field's values in place of role / content / name too.
    for (const json& value : values) {
      for (const char* key : {"role", "content", "name", "tool_calls"}) {
        json body = chat;
        body["messages"][0][key] = value;
        absl::Status s = ParseChatCompletionRequest(body.dump()).status();
        EXPECT_TRUE(s.ok() || s.code() == absl::StatusCode::kInvalidArgument) << body << ": " << s;
      }
    }
  }
  EXPECT_GT(checked, 1000);
}

// Random byte-level damage to valid bodies: the parsers only ever return a status.
TEST(FrontendOpenAiParse, MutatedBodiesNeverThrow) {
  const std::vector<std::string> seeds = {
      R"({"model": "m", "prompt": ["a", [1, 2]], "max_tokens": 5, "stop": ["x"], "logprobs": 2})",
      R"({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
          "stream": true, "stream_options": {"include_usage": true}, "n": 2, "seed": 3})"};
  uint64_t state = 12345;  // fixed seed: deterministic
  auto next = [&state] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<uint32_t>(state >> 33);
  };
  for (int i = 0; i < 20000; ++i) {
    std::string body = seeds[i % seeds.size()];
    const int edits = 1 + next() % 4;
    for (int e = 0; e < edits; ++e) {
      const size_t pos = next() % body.size();
      switch (next() % 3) {
        case 0: body[pos] = static_cast<char>(next() & 0xff); break;
        case 1: body.erase(pos, 1 + next() % 8); break;
        default: body.insert(pos, 1, "{}[]\",:0e-"[next() % 11]); break;
      }
      if (body.empty()) body.push_back('{');
    }
    (void)ParseCompletionRequest(body);
    (void)ParseChatCompletionRequest(body);
    (void)ParseTokenizeRequest(body);
    (void)ParseDetokenizeRequest(body);
  }
}

TEST(FrontendOpenAiParse, InvalidJsonAndNonObjects) {
  for (const char* body : {"", "{", "[1, 2]", "\"str\"", "{\"prompt\": \"x\",}", "nul",
                           "{\"prompt\": \"\xff\"}"}) {
    absl::StatusOr<std::vector<GenerationParams>> p = ParseCompletionRequest(body);
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << body;
  }
  // Deep nesting does not overflow the stack.
  std::string deep = "{\"prompt\": \"x\", \"metadata\": " + std::string(100000, '[') +
                     std::string(100000, ']') + "}";
  EXPECT_TRUE(ParseCompletionRequest(deep).ok());
}

TEST(FrontendOpenAiParse, Chat) {
  absl::StatusOr<GenerationParams> p = ParseChatCompletionRequest(R"({
    "model": "m", "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}],
       "name": "bob"},
      {"role": "assistant", "content": "Hi", "tool_calls": []}],
    "max_tokens": 5, "max_completion_tokens": 9, "logprobs": true, "top_logprobs": 4,
    "add_generation_prompt": false, "response_format": {"type": "text"}, "tool_choice": "none"})");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->api, ApiKind::kChat);
  ASSERT_EQ(p->messages.size(), 3u);
  EXPECT_EQ(p->messages[1].role, "user");
  EXPECT_EQ(p->messages[1].content, "Hello there");
  EXPECT_EQ(*p->max_tokens, 9);  // max_completion_tokens wins
  EXPECT_EQ(p->max_tokens_field, "max_completion_tokens");
  EXPECT_TRUE(p->logprobs);
  EXPECT_EQ(p->top_logprobs, 4);
  EXPECT_FALSE(p->add_generation_prompt);

  ExpectChatError(R"({"model": "m"})", "messages", "messages is required");
  ExpectChatError(R"({"messages": "hi"})", "messages", "messages must be an array");
  ExpectChatError(R"({"messages": [3]})", "messages[0]", "messages[0] must be an object");
  ExpectChatError(R"({"messages": [{"role": "user"}]})", "messages[0]", "content is required");
  ExpectChatError(R"({"messages": [{"content": "x"}]})", "messages[0]", "role is required");
  ExpectChatError(R"({"messages": [{"role": 1, "content": "x"}]})", "messages[0].role",
                  "messages[0].role must be a string");
  ExpectChatError(R"({"messages": [{"role": "user", "content": 5}]})", "messages[0].content",
                  "a string or an array of text parts");
  ExpectChatError(R"({"messages": [{"role": "user", "content": [{"type": "image_url",
                      "image_url": {"url": "x"}}]}]})",
                  "messages[0].content", "only text is supported");
  ExpectChatError(R"({"messages": [{"role": "user", "content": "x", "tool_call_id": "7"}]})",
                  "messages[0]", "tool_call_id is not supported");
  ExpectChatError(R"({"messages": [{"role": "user", "content": "x"}], "logprobs": 2})",
                  "logprobs", "logprobs must be a boolean");
}

TEST(FrontendOpenAiParse, TokenizeAndDetokenize) {
  absl::StatusOr<TokenizeBody> t = ParseTokenizeRequest(R"({"prompt": "hi"})");
  ASSERT_TRUE(t.ok());
  EXPECT_FALSE(t->is_chat);
  EXPECT_TRUE(t->add_special_tokens);
  t = ParseTokenizeRequest(R"({"messages": [{"role": "user", "content": "x"}]})");
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(t->is_chat);
  EXPECT_FALSE(t->add_special_tokens);  // vLLM's default for messages
  EXPECT_FALSE(ParseTokenizeRequest(R"({})").ok());
  EXPECT_FALSE(ParseTokenizeRequest(R"({"prompt": "a", "messages": []})").ok());
  EXPECT_FALSE(ParseTokenizeRequest(R"({"prompt": "a", "x": 1})").ok());

  absl::StatusOr<DetokenizeBody> d = ParseDetokenizeRequest(R"({"tokens": [1, 2]})");
  ASSERT_TRUE(d.ok());
  EXPECT_THAT(d->tokens, ElementsAre(1, 2));
  EXPECT_FALSE(ParseDetokenizeRequest(R"({"tokens": "12"})").ok());
  EXPECT_FALSE(ParseDetokenizeRequest(R"({})").ok());
}

TEST(FrontendOpenAiFormat, CompletionChunkAndResponse) {
  ResponseMeta meta{"cmpl-abc", 1700000000, "tiny"};
  json chunk = CompletionChunk(meta, 1, "hi", nullptr, FinishReason::kNone);
  EXPECT_EQ(chunk, json::parse(R"({"id": "cmpl-abc", "object": "text_completion",
      "created": 1700000000, "model": "tiny",
      "choices": [{"index": 1, "text": "hi", "logprobs": null, "finish_reason": null}]})"));
  json last = CompletionChunk(meta, 0, "", nullptr, FinishReason::kLength);
  EXPECT_EQ(last["choices"][0]["finish_reason"], "length");

  GenerationParams p;
  std::vector<ChoiceState> choices(2);
  choices[0].text = "a";
  choices[0].finish = FinishReason::kStop;
  choices[1].text = "b";
  choices[1].finish = FinishReason::kLength;
  json full = CompletionResponse(meta, choices, p, {5, 3});
  EXPECT_EQ(full["object"], "text_completion");
  EXPECT_EQ(full["choices"][1]["text"], "b");
  EXPECT_EQ(full["choices"][1]["index"], 1);
  EXPECT_EQ(full["usage"], json::parse(R"({"prompt_tokens": 5, "completion_tokens": 3,
                                           "total_tokens": 8})"));
}

TEST(FrontendOpenAiFormat, ChatChunksAndResponse) {
  ResponseMeta meta{"chatcmpl-x", 1, "tiny"};
  json first = ChatChunk(meta, 0, true, "", nullptr, FinishReason::kNone);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"], json::parse(R"({"role": "assistant", "content": ""})"));
  json mid = ChatChunk(meta, 0, false, "Hel", nullptr, FinishReason::kNone);
  EXPECT_EQ(mid["choices"][0]["delta"], json::parse(R"({"content": "Hel"})"));
  json end = ChatChunk(meta, 0, false, "", nullptr, FinishReason::kStop);
  EXPECT_EQ(end["choices"][0]["delta"], json::object());
  EXPECT_EQ(end["choices"][0]["finish_reason"], "stop");
  json usage = UsageChunk(meta, true, {2, 3});
  EXPECT_EQ(usage["choices"], json::array());
  EXPECT_EQ(usage["usage"]["total_tokens"], 5);

  GenerationParams p;
  p.logprobs = true;
  std::vector<ChoiceState> choices(1);
  choices[0].text = "Hi";
  choices[0].finish = FinishReason::kStop;
  choices[0].tokens = {{7, "Hi", "Hi", -0.25f, {{7, "Hi", -0.25f}, {8, " Yo", -2.0f}}}};
  json full = ChatResponse(meta, choices, p, {4, 1});
  EXPECT_EQ(full["object"], "chat.completion");
  EXPECT_EQ(full["choices"][0]["message"], json::parse(R"({"role": "assistant", "content": "Hi"})"));
  EXPECT_EQ(full["choices"][0]["logprobs"], json::parse(R"({"content": [{"token": "Hi",
      "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
        {"token": " Yo", "logprob": -2.0, "bytes": [32, 89, 111]}]}], "refusal": null})"));
}

TEST(FrontendOpenAiFormat, CompletionLogprobsShape) {
  std::vector<GeneratedToken> tokens = {{5, "\xc3\xa9t", "\xc3\xa9t", -0.5f, {{5, "\xc3\xa9t", -0.5f}, {6, "x", -1.0f}}},
                                        {6, "x", "x", -1.0f, {{6, "x", -1.0f}}}};
  int64_t offset = 10;
  json lp = CompletionLogprobs(tokens, 2, &offset);
  EXPECT_EQ(lp["tokens"], json::parse("[\"\xc3\xa9t\", \"x\"]"));
  EXPECT_EQ(lp["token_logprobs"], json::parse("[-0.5, -1.0]"));
  EXPECT_EQ(lp["top_logprobs"][0], json::parse("{\"\xc3\xa9t\": -0.5, \"x\": -1.0}"));
  EXPECT_EQ(lp["text_offset"], json::parse("[10, 12]"));  // code points, not bytes
  EXPECT_EQ(offset, 13);
}

TEST(FrontendOpenAiFormat, IdsAreUniqueAndPrefixed) {
  std::string a = NewResponseId("cmpl-"), b = NewResponseId("cmpl-");
  EXPECT_NE(a, b);
  EXPECT_EQ(a.substr(0, 5), "cmpl-");
  EXPECT_EQ(a.size(), 5u + 32u);
}

TEST(FrontendHttpProtocol, SseAndChunkFraming) {
  EXPECT_EQ(SseEvent(R"({"a":1})"), "data: {\"a\":1}\n\n");
  EXPECT_EQ(kSseDone, "data: [DONE]\n\n");
  EXPECT_EQ(HttpChunk("hello"), "5\r\nhello\r\n");
  EXPECT_EQ(HttpChunk(std::string(26, 'x')), "1a\r\n" + std::string(26, 'x') + "\r\n");
  EXPECT_EQ(HttpChunk(""), "0\r\n\r\n");
  // JSON text never contains a raw newline, so one event is one "data:" line.
  EXPECT_EQ(DumpJson({{"text", "a\nb"}}).find('\n'), std::string::npos);
}

TEST(FrontendHttpProtocol, StatusMappingAndErrorBody) {
  EXPECT_EQ(HttpStatusFor(absl::InvalidArgumentError("x")), 400);
  EXPECT_EQ(HttpStatusFor(absl::NotFoundError("x")), 404);
  EXPECT_EQ(HttpStatusFor(absl::ResourceExhaustedError("x")), 429);
  EXPECT_EQ(HttpStatusFor(absl::UnavailableError("x")), 503);
  EXPECT_EQ(HttpStatusFor(absl::InternalError("x")), 500);
  EXPECT_EQ(HttpStatusFor(absl::UnknownError("x")), 500);
  json e = json::parse(OpenAiErrorBody(InvalidParam("temperature", "temperature must be ...")));
  EXPECT_EQ(e, json::parse(R"({"error": {"message": "temperature must be ...",
      "type": "invalid_request_error", "param": "temperature", "code": null}})"));
  json nf = json::parse(OpenAiErrorBody(CheckModelName("x", {"m", 1, 1})));
  EXPECT_EQ(nf["error"]["code"], "model_not_found");
  EXPECT_EQ(nf["error"]["message"], "The model `x` does not exist.");
  json rl = json::parse(OpenAiErrorBody(429, "slow down", ""));
  EXPECT_EQ(rl["error"]["type"], "rate_limit_error");
  EXPECT_EQ(rl["error"]["param"], nullptr);
}

}  // namespace
}  // namespace cleave::frontend
