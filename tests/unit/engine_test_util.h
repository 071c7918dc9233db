// Shared by the worker engine tests: the AddRequest the scheduler would send.
#pragma once

#include <cstdint>
#include <vector>

#include "cleave/model/decoder.h"
#include "cleave/model/generator.h"
#include "cleave/v1/control.pb.h"
#include "gtest/gtest.h"

namespace cleave::worker::testing_util {

// Request `id` (attempt 1), greedy: tokens = prompt (+ generated so far), of which the first
// num_prompt are the prompt and the first `computed` already have KV in `blocks`.
inline v1::SchedulerMessage MakeAdd(uint64_t id, const std::vector<int32_t>& tokens, int num_prompt,
                                    int computed, const std::vector<int32_t>& blocks, int max_new,
                                    int state_slot = -1) {
  v1::SchedulerMessage m;
  v1::AddRequest* a = m.mutable_add();
  a->set_request_id(id);
  a->set_attempt(1);
  for (int32_t t : tokens) a->add_token_ids(t);
  a->set_num_prompt_tokens(num_prompt);
  a->set_num_computed_tokens(computed);
  for (int32_t b : blocks) a->add_blocks(b);
  a->mutable_sampling()->set_temperature(0);
  a->mutable_sampling()->set_seed(1);
  a->set_max_new_tokens(max_new);
  a->set_state_slot(state_slot);
  return m;
}

// Greedy tokens from offline generation (the reference every engine path must reproduce).
inline std::vector<int32_t> OfflineGreedy(const model::DecoderModel& m, const std::vector<int32_t>& prompt,
                                          int max_tokens) {
  auto gen = model::Generator::Create(m, model::GeneratorOptions{});
  EXPECT_TRUE(gen.ok()) << gen.status();
  if (!gen.ok()) return {};
  model::GenerateRequest req;
  req.prompt_ids = prompt;
  req.max_tokens = max_tokens;
  req.sampling.temperature = 0;
  req.ignore_eos = true;
  auto r = (*gen)->Generate(req);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->tokens : std::vector<int32_t>();
}

}  // namespace cleave::worker::testing_util
