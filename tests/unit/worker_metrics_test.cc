// Worker metrics: after driving the engine synchronously with known requests, every series
// counts exactly what ran (steps, tokens, chunks, layer samples, expert routing, KV transfers),
// and the registry's exposition passes `promtool check metrics`.
#include "cleave/v1/worker_role.h"
#include "cleave/worker/worker_metrics.h"

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "cleave/common/metrics.h"
#include "cleave/model/decoder.h"
#include "cleave/transport/kv_transport.h"
#include "cleave/worker/engine.h"
#include "engine_test_util.h"
#include "gtest/gtest.h"

namespace cleave::worker {
namespace {

constexpr int kBs = 16;

// The value on the line starting with `prefix` ("name{labels} "), or NaN when absent.
double Sample(const std::string& text, const std::string& prefix) {
  const std::string padded = "\n" + text;
  const size_t pos = padded.find("\n" + prefix);
  if (pos == std::string::npos) return std::numeric_limits<double>::quiet_NaN();
  return std::strtod(padded.c_str() + pos + 1 + prefix.size(), nullptr);
}

std::vector<int32_t> Prompt(int n, uint32_t seed, int vocab) {
  std::mt19937 rng(seed);
  std::vector<int32_t> p = {1};
  for (int i = 1; i < n; ++i) p.push_back(3 + static_cast<int32_t>(rng() % (vocab - 3)));
  return p;
}

std::vector<int32_t> Range(int begin, int n) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = begin + i;
  return v;
}

std::pair<int, std::string> RunShell(const std::string& cmd) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return {-1, "popen failed"};
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

class WorkerMetricsTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto m = model::DecoderModel::Load("models/stories260K");
    ASSERT_TRUE(m.ok()) << m.status() << " (run scripts/setup-model.sh)";
    model_ = m->release();
  }
  static void TearDownTestSuite() { delete model_; }

  std::unique_ptr<WorkerMetrics> Metrics(metrics::Registry& r, v1::WorkerRole role,
                                         const model::DecoderModel& m, int blocks, int slots = 0) {
    auto wm = WorkerMetrics::Create(r, {role, "w0", "stories260K", blocks, slots}, m.config());
    EXPECT_TRUE(wm.ok()) << wm.status();
    return wm.ok() ? *std::move(wm) : nullptr;
  }

  static model::DecoderModel* model_;
};
model::DecoderModel* WorkerMetricsTest::model_ = nullptr;

TEST_F(WorkerMetricsTest, CountsStepsTokensAndChunks) {
  metrics::Registry registry;
  auto wm = Metrics(registry, v1::WORKER_ROLE_COLOCATED, *model_, 64);
  auto cache = model::KvCache::Create(model_->config(), 64, kBs, kernels::CpuBackend());
  ASSERT_TRUE(cache.ok());
  EngineOptions opts;
  opts.max_batch_tokens = 16;
  opts.metrics = wm.get();
  int emitted_steps = 0;
  Engine engine(*model_, **cache, opts, nullptr, [&](v1::WorkerMessage m) {
    ASSERT_EQ(m.step().failures_size(), 0) << m.step().failures(0).message();
    ++emitted_steps;
  });
  // One request alone: chunks of 16, 16 and 8 (the last samples token 1), then 5 decode steps.
  const int vocab = model_->config().vocab_size;
  engine.Post(testing_util::MakeAdd(1, Prompt(40, 1, vocab), 40, 0, Range(0, 4), 6));
  int steps = 0;
  while (engine.Step()) ++steps;
  ASSERT_EQ(steps, 8);
  std::string text = registry.Render();
  const std::string role = "{role=\"colocated\"}";
  EXPECT_EQ(Sample(text, "cleave_worker_steps_total" + role + " "), 8);
  EXPECT_EQ(Sample(text, "cleave_worker_step_seconds_count" + role + " "), 8);
  EXPECT_EQ(Sample(text, "cleave_worker_step_batch_requests_sum" + role + " "), 8);
  EXPECT_EQ(Sample(text, "cleave_worker_step_tokens_sum" + role + " "), 40 + 5);
  EXPECT_EQ(Sample(text, "cleave_worker_prefill_chunk_tokens_count" + role + " "), 3);
  EXPECT_EQ(Sample(text, "cleave_worker_prefill_chunk_tokens_sum" + role + " "), 40);
  EXPECT_EQ(Sample(text, "cleave_worker_prefill_chunk_tokens_bucket{role=\"colocated\",le=\"8\"} "), 1);
  EXPECT_EQ(Sample(text, "cleave_worker_prefill_chunk_tokens_bucket{role=\"colocated\",le=\"16\"} "), 3);
  EXPECT_EQ(Sample(text, "cleave_worker_running_requests" + role + " "), 0);
  EXPECT_EQ(Sample(text, "cleave_worker_kv_blocks" + role + " "), 64);
  EXPECT_EQ(Sample(text, "cleave_worker_state_slots" + role + " "), 0);
  EXPECT_EQ(Sample(text, "cleave_worker_state_slots_used" + role + " "), 0);
  EXPECT_EQ(Sample(text, "cleave_worker_info{role=\"colocated\",name=\"w0\",model=\"stories260K\"} "), 1);
  // Layer halves are timed on step 0 only of these 8 (one in kLayerSampleEvery).
  const int layers = model_->config().num_hidden_layers;
  for (int l = 0; l < layers; ++l) {
    for (const char* part : {"mixer", "ffn"}) {
      EXPECT_EQ(Sample(text, "cleave_worker_layer_seconds_count{role=\"colocated\",layer=\"" +
                                 std::to_string(l) + "\",part=\"" + part + "\"} "),
                1)
          << "layer " << l << " " << part;
    }
  }
  // A dense model exports no expert series.
  EXPECT_EQ(text.find("cleave_worker_moe_expert_tokens_total{"), std::string::npos);

  // Mixed batches: three requests at once, chunked under the budget, plus the sampled steps.
  const std::vector<int> lens = {5, 33, 21};
  const int max_new = 60;  // past step 64: a second sampled step
  int next_block = 4;
  for (size_t i = 0; i < lens.size(); ++i) {
    const int nblocks = (lens[i] + max_new + kBs - 1) / kBs;
    engine.Post(testing_util::MakeAdd(10 + i, Prompt(lens[i], 10 + i, vocab), lens[i], 0,
                                      Range(next_block, nblocks), max_new));
    next_block += nblocks;
  }
  while (engine.Step()) ++steps;
  text = registry.Render();
  EXPECT_EQ(steps, emitted_steps);
  EXPECT_EQ(Sample(text, "cleave_worker_steps_total" + role + " "), steps);
  EXPECT_EQ(Sample(text, "cleave_worker_step_batch_requests_count" + role + " "), steps);
  // A request is in one step per chunk and one per decode token.
  const double chunks = Sample(text, "cleave_worker_prefill_chunk_tokens_count" + role + " ");
  EXPECT_GE(chunks, 3 + 3);
  EXPECT_EQ(Sample(text, "cleave_worker_step_batch_requests_sum" + role + " "),
            8 + (chunks - 3) + 3 * (max_new - 1));
  EXPECT_EQ(Sample(text, "cleave_worker_step_tokens_sum" + role + " "),
            45 + (5 + 33 + 21) + 3 * (max_new - 1));
  EXPECT_EQ(Sample(text, "cleave_worker_prefill_chunk_tokens_sum" + role + " "), 40 + 5 + 33 + 21);
  ASSERT_GT(steps, 64);
  ASSERT_LE(steps, 128);
  const double sampled = 2;  // steps 0 and 64
  EXPECT_EQ(Sample(text, "cleave_worker_layer_seconds_count{role=\"colocated\",layer=\"0\",part=\"ffn\"} "),
            sampled);
}

TEST_F(WorkerMetricsTest, ExpertTokensSumToTokensTimesTopK) {
  auto m = model::DecoderModel::Load("tests/data/golden/mixtral");
  ASSERT_TRUE(m.ok()) << m.status();
  const model::ModelConfig& config = (*m)->config();
  ASSERT_GT(config.moe.num_experts, 0);
  metrics::Registry registry;
  auto wm = Metrics(registry, v1::WORKER_ROLE_COLOCATED, **m, 32);
  auto cache = model::KvCache::Create(config, 32, kBs, kernels::CpuBackend());
  ASSERT_TRUE(cache.ok());
  EngineOptions opts;
  opts.max_batch_tokens = 24;
  opts.metrics = wm.get();
  Engine engine(**m, **cache, opts, nullptr, [](v1::WorkerMessage msg) {
    ASSERT_EQ(msg.step().failures_size(), 0) << msg.step().failures(0).message();
  });
  const int max_new = 7;
  engine.Post(testing_util::MakeAdd(1, Prompt(30, 3, config.vocab_size), 30, 0, Range(0, 3), max_new));
  engine.Post(testing_util::MakeAdd(2, Prompt(9, 4, config.vocab_size), 9, 0, Range(3, 2), max_new));
  while (engine.Step()) {
  }
  const int tokens = 30 + 9 + 2 * (max_new - 1);  // every computed token passes every layer
  const std::string text = registry.Render();
  int moe_layers = 0;
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    if (config.layer_ffn[l] != model::FfnKind::kMoe) continue;
    ++moe_layers;
    double sum = 0;
    for (int x = 0; x < config.moe.num_experts; ++x) {
      const double v = Sample(text, "cleave_worker_moe_expert_tokens_total{role=\"colocated\",layer=\"" +
                                        std::to_string(l) + "\",expert=\"" + std::to_string(x) + "\"} ");
      ASSERT_FALSE(std::isnan(v)) << "layer " << l << " expert " << x;
      sum += v;
    }
    EXPECT_EQ(sum, static_cast<double>(tokens) * config.moe.top_k) << "layer " << l;
  }
  EXPECT_GT(moe_layers, 0);
  EXPECT_EQ(Sample(text, "cleave_worker_step_tokens_sum{role=\"colocated\"} "), tokens);
}

TEST_F(WorkerMetricsTest, CountsKvTransfersOnBothSides) {
  metrics::Registry p_registry, d_registry;
  auto p_metrics = Metrics(p_registry, v1::WORKER_ROLE_PREFILL, *model_, 32);
  auto d_metrics = Metrics(d_registry, v1::WORKER_ROLE_DECODE, *model_, 64);
  auto pcache = model::KvCache::Create(model_->config(), 32, kBs, kernels::CpuBackend());
  auto dcache = model::KvCache::Create(model_->config(), 64, kBs, kernels::CpuBackend());
  ASSERT_TRUE(pcache.ok() && dcache.ok());
  KvCacheStore dstore(**dcache, model_->config());
  std::atomic<int> ready = 0;
  transport::ReceiverCallbacks cb;
  cb.on_ready = [&](uint64_t, uint32_t) { ++ready; };
  cb.on_failed = [&](uint64_t, uint32_t, const std::string& why) { ADD_FAILURE() << why; };
  cb.metrics = d_metrics->received();
  auto receiver = transport::CreateKvReceiver("inproc://worker-metrics-decode", {}, dstore, cb);
  ASSERT_TRUE(receiver.ok()) << receiver.status();
  transport::TransportOptions sopts;
  sopts.geometry = dstore.geometry();
  sopts.sent_metrics = p_metrics->sent();
  auto sender = transport::CreateKvSender(sopts);

  const int len = 40;  // 3 blocks; budget 16 = three chunks, each shipping the blocks it touched
  const std::vector<int32_t> d_blocks = {30, 31, 20};
  (*receiver)->Expect(7, 1, d_blocks);
  std::atomic<bool> sent = false;
  EngineOptions popts;
  popts.role = v1::WORKER_ROLE_PREFILL;
  popts.max_batch_tokens = 16;
  popts.metrics = p_metrics.get();
  Engine prefill(*model_, **pcache, popts, sender.get(), [&](v1::WorkerMessage m) {
    if (m.has_kv_sent()) sent = true;
    for (const auto& f : m.step().failures()) {
      EXPECT_EQ(f.request_id(), 8u) << f.message();  // the one sent to nobody, below
    }
  });
  v1::SchedulerMessage add =
      testing_util::MakeAdd(7, Prompt(len, 7, model_->config().vocab_size), len, 0, {9, 3, 7}, 5);
  add.mutable_add()->set_trace_id("req-abc");
  auto* target = add.mutable_add()->mutable_kv_target();
  target->set_address("inproc://worker-metrics-decode");
  for (int32_t b : d_blocks) target->add_blocks(b);
  prefill.Post(add);
  while (prefill.Step()) {
  }
  for (int i = 0; i < 400 && !(sent && prefill.Idle()); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(sent);
  EXPECT_TRUE(prefill.Idle());  // nothing held, the transfer flushed
  ASSERT_EQ(ready.load(), 1);

  const std::string sent_text = p_registry.Render();
  const std::string recv_text = d_registry.Render();
  const double block_bytes = dstore.geometry().block_bytes();
  // Chunk i (16 tokens) completes block i and ships it: each block once, K and V, every layer.
  const double want = 3 * 2 * block_bytes * model_->config().num_hidden_layers;
  EXPECT_EQ(Sample(sent_text, "cleave_worker_kv_transfer_bytes_total{role=\"prefill\",direction=\"sent\"} "), want);
  EXPECT_EQ(Sample(recv_text, "cleave_worker_kv_transfer_bytes_total{role=\"decode\",direction=\"received\"} "), want);
  EXPECT_EQ(Sample(sent_text, "cleave_worker_kv_transfers_total{role=\"prefill\",direction=\"sent\",outcome=\"ok\"} "), 1);
  EXPECT_EQ(Sample(sent_text, "cleave_worker_kv_transfers_total{role=\"prefill\",direction=\"sent\",outcome=\"failed\"} "), 0);
  EXPECT_EQ(Sample(recv_text, "cleave_worker_kv_transfers_total{role=\"decode\",direction=\"received\",outcome=\"ok\"} "), 1);
  EXPECT_EQ(Sample(sent_text, "cleave_worker_kv_transfer_seconds_count{role=\"prefill\",direction=\"sent\"} "), 1);
  EXPECT_EQ(Sample(recv_text, "cleave_worker_kv_transfer_seconds_count{role=\"decode\",direction=\"received\"} "), 1);

  // A transfer to nobody fails on the sending side.
  v1::SchedulerMessage lost =
      testing_util::MakeAdd(8, Prompt(10, 8, model_->config().vocab_size), 10, 0, {1}, 5);
  lost.mutable_add()->mutable_kv_target()->set_address("inproc://nobody-listens");
  lost.mutable_add()->mutable_kv_target()->add_blocks(0);
  prefill.Post(lost);
  while (prefill.Step()) {
  }
  const std::string after = p_registry.Render();
  EXPECT_EQ(Sample(after, "cleave_worker_kv_transfers_total{role=\"prefill\",direction=\"sent\",outcome=\"failed\"} "), 1);
  EXPECT_EQ(Sample(after, "cleave_worker_kv_transfers_total{role=\"prefill\",direction=\"sent\",outcome=\"ok\"} "), 1);
}

TEST_F(WorkerMetricsTest, EngineLoopHeartbeatAndIdle) {
  auto cache = model::KvCache::Create(model_->config(), 16, kBs, kernels::CpuBackend());
  ASSERT_TRUE(cache.ok());
  Engine engine(*model_, **cache, EngineOptions{}, nullptr, [](v1::WorkerMessage) {});
  EXPECT_TRUE(engine.Idle());
  std::thread run([&] { engine.Run(); });
  // Idle, the loop still wakes every kIdleWake: the heartbeat keeps moving.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_LT(std::chrono::steady_clock::now() - engine.last_iteration(), std::chrono::milliseconds(200));
  engine.Post(testing_util::MakeAdd(1, Prompt(10, 9, model_->config().vocab_size), 10, 0, {4}, 30));
  engine.WaitForDeltas();
  EXPECT_FALSE(engine.Idle());  // stalls at 16 tokens: held
  v1::SchedulerMessage remove;
  remove.mutable_remove()->set_request_id(1);
  remove.mutable_remove()->set_attempt(1);
  engine.Post(remove);
  engine.WaitForDeltas();
  EXPECT_TRUE(engine.Idle());
  engine.Stop();
  run.join();
  const auto stopped_at = engine.last_iteration();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(engine.last_iteration(), stopped_at);  // a dead loop's heartbeat ages
}

TEST_F(WorkerMetricsTest, PromtoolAcceptsAWorkerRegistry) {
  const auto [found, where] = RunShell("command -v promtool");
  ASSERT_EQ(found, 0) << "promtool not found: run scripts/install-deps.sh (Debian package "
                         "'prometheus' provides /usr/bin/promtool)";
  auto m = model::DecoderModel::Load("tests/data/golden/mixtral");
  ASSERT_TRUE(m.ok()) << m.status();
  metrics::Registry registry;
  auto wm = Metrics(registry, v1::WORKER_ROLE_DECODE, **m, 32);
  auto cache = model::KvCache::Create((*m)->config(), 32, kBs, kernels::CpuBackend());
  ASSERT_TRUE(cache.ok());
  EngineOptions opts;
  opts.role = v1::WORKER_ROLE_DECODE;
  opts.metrics = wm.get();
  Engine engine(**m, **cache, opts, nullptr, [](v1::WorkerMessage) {});
  engine.Post(testing_util::MakeAdd(1, Prompt(12, 1, (*m)->config().vocab_size), 11, 11, {0}, 4));
  while (engine.Step()) {
  }
  const std::string path =
      (std::filesystem::temp_directory_path() / ("worker_metrics_" + std::to_string(getpid()) + ".prom"))
          .string();
  std::ofstream(path) << registry.Render();
  const auto [rc, output] = RunShell("promtool check metrics < '" + path + "'");
  std::filesystem::remove(path);
  EXPECT_EQ(rc, 0) << output;
  EXPECT_EQ(output, "") << "promtool complained:\n" << output << "\n--- input ---\n" << registry.Render();
}

TEST_F(WorkerMetricsTest, RoleLabels) {
  EXPECT_STREQ(v1::WorkerRoleName(v1::WORKER_ROLE_PREFILL), "prefill");
  EXPECT_STREQ(v1::WorkerRoleName(v1::WORKER_ROLE_DECODE), "decode");
  EXPECT_STREQ(v1::WorkerRoleName(v1::WORKER_ROLE_COLOCATED), "colocated");
  EXPECT_STREQ(v1::WorkerRoleName(v1::WORKER_ROLE_ATTENTION), "attention");
  EXPECT_STREQ(v1::WorkerRoleName(v1::WORKER_ROLE_FFN), "ffn");
  metrics::Registry registry;
  ASSERT_NE(Metrics(registry, v1::WORKER_ROLE_DECODE, *model_, 1), nullptr);
  // One worker per registry: a second set of the same families is refused, not duplicated.
  EXPECT_FALSE(WorkerMetrics::Create(registry, {}, model_->config()).ok());
}

}  // namespace
}  // namespace cleave::worker
