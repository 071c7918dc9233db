// The per-request log line and request-id rules (services/frontend/src/request_log.cc): which ids
// a client may set, and that the line holds exactly the phases reached, in milliseconds.
#include "cleave/frontend/request_log.h"

#include <gtest/gtest.h>

#include <string>

#include "nlohmann/json.hpp"

namespace cleave::frontend {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::microseconds;

TEST(RequestLogTest, RequestIdsClientsMaySet) {
  EXPECT_TRUE(IsAcceptableRequestId("req-123"));
  EXPECT_TRUE(IsAcceptableRequestId("a/b:c.d_e~f"));
  EXPECT_TRUE(IsAcceptableRequestId(std::string(128, 'x')));
  EXPECT_FALSE(IsAcceptableRequestId(""));
  EXPECT_FALSE(IsAcceptableRequestId(std::string(129, 'x')));
  EXPECT_FALSE(IsAcceptableRequestId("two words"));
  EXPECT_FALSE(IsAcceptableRequestId("quo\"te"));
  EXPECT_FALSE(IsAcceptableRequestId("it's"));
  EXPECT_FALSE(IsAcceptableRequestId("line\nbreak"));
  EXPECT_FALSE(IsAcceptableRequestId("caf\xc3\xa9"));  // non-ASCII
}

TEST(RequestLogTest, LineHoldsEveryPhaseReached) {
  const Clock::time_point t0 = Clock::now();
  RequestRecord r;
  r.request_id = "req-1";
  r.api = "completions";
  r.outcome = "length";
  r.status = 200;
  r.prompt_tokens = 5;
  r.completion_tokens = 7;
  r.received = t0;
  r.trace.submitted = t0 + microseconds(1500);
  r.trace.queue_us = 250;
  r.trace.prefill_us = 4000;
  r.trace.first_token_received = t0 + microseconds(6000);
  r.first_token_written = t0 + microseconds(6300);
  r.done = t0 + microseconds(20000);
  const nlohmann::json j = nlohmann::json::parse(RequestDoneJson(r));
  EXPECT_EQ(j["request_id"], "req-1");
  EXPECT_EQ(j["api"], "completions");
  EXPECT_EQ(j["outcome"], "length");
  EXPECT_EQ(j["status"], 200);
  EXPECT_EQ(j["prompt_tokens"], 5);
  EXPECT_EQ(j["completion_tokens"], 7);
  EXPECT_DOUBLE_EQ(j["ttft_ms"].get<double>(), 6.3);
  EXPECT_DOUBLE_EQ(j["e2e_ms"].get<double>(), 20.0);
  EXPECT_DOUBLE_EQ(j["frontend_in_ms"].get<double>(), 1.5);
  EXPECT_DOUBLE_EQ(j["frontend_out_ms"].get<double>(), 0.3);
  EXPECT_DOUBLE_EQ(j["queue_ms"].get<double>(), 0.25);
  EXPECT_DOUBLE_EQ(j["prefill_ms"].get<double>(), 4.0);
  // Not reached: absent, not zero.
  EXPECT_FALSE(j.contains("kv_transfer_ms"));
  EXPECT_FALSE(j.contains("first_decode_step_ms"));
  EXPECT_FALSE(j.contains("error"));
  EXPECT_FALSE(j.contains("cancelled_by"));
}

TEST(RequestLogTest, ErrorsAndCancellationsSayWhy) {
  RequestRecord r;
  r.request_id = "req-2";
  r.api = "chat";
  r.outcome = "error";
  r.status = 400;
  r.error = "bad \xff utf-8";  // client text: replaced, never a throw
  r.received = Clock::now();
  nlohmann::json j = nlohmann::json::parse(RequestDoneJson(r));
  EXPECT_EQ(j["outcome"], "error");
  EXPECT_NE(j["error"].get<std::string>().find("bad "), std::string::npos);
  EXPECT_FALSE(j.contains("ttft_ms"));
  r.outcome = "cancelled";
  r.error.clear();
  r.cancelled_by = "client";
  j = nlohmann::json::parse(RequestDoneJson(r));
  EXPECT_EQ(j["cancelled_by"], "client");
}

}  // namespace
}  // namespace cleave::frontend
