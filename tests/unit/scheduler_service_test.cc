// The scheduler process's HTTP port over real loopback: /metrics (promtool-clean, per-worker series
// that come and go with the worker), /health, /ready (503 once draining), and the Prometheus HTTP
// service discovery of the workers' own ports.
#include <gtest/gtest.h>
#include <grpcpp/grpcpp.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "cleave/scheduler/service.h"
#include "cleave/scheduler/testing/fake_messages.h"
#include "cleave/v1/control.grpc.pb.h"
#include "http_test_client.h"
#include "nlohmann/json.hpp"

namespace cleave::scheduler {
namespace {

using cleave::testing::HttpGet;

// promtool's complaints about `text` ("" when clean), or why it could not run.
std::string PromtoolComplaints(const std::string& text) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("cleave_sched_" + std::to_string(::getpid()) + ".prom")).string();
  std::ofstream(path) << text;
  std::string output;
  FILE* pipe = ::popen(("promtool check metrics < '" + path + "' 2>&1").c_str(), "r");
  if (pipe == nullptr) return "popen failed";
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof(buf), pipe)) > 0;) output.append(buf, n);
  const int status = ::pclose(pipe);
  std::filesystem::remove(path);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return "promtool failed: " + output;
  return output;
}

class SchedulerServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SchedulerServerOptions options;
    options.listen = "127.0.0.1:0";
    options.http = "127.0.0.1:0";
    auto server = SchedulerServer::Start(options);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_GT(server_->http_port(), 0);
    stub_ = v1::Scheduler::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(server_->port()), grpc::InsecureChannelCredentials()));
  }
  uint64_t Register(const std::string& name, v1::WorkerRole role, const std::string& http_address) {
    testing::WorkerSpec spec;
    spec.role = role;
    spec.name = name;
    v1::RegisterWorkerRequest reg = testing::Registration(spec);
    reg.set_http_address(http_address);
    v1::RegisterWorkerResponse reply;
    grpc::ClientContext ctx;
    EXPECT_TRUE(stub_->RegisterWorker(&ctx, reg, &reply).ok());
    return reply.worker_id();
  }
  int http() const { return server_->http_port(); }

  std::unique_ptr<SchedulerServer> server_;
  std::unique_ptr<v1::Scheduler::Stub> stub_;
};

TEST_F(SchedulerServiceTest, MetricsArePromtoolCleanAndFollowTheWorkers) {
  auto metrics = HttpGet(http(), "/metrics");
  ASSERT_EQ(metrics.status, 200);
  EXPECT_EQ(metrics.content_type, "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_NE(metrics.body.find("cleave_scheduler_requests_admitted_total 0\n"), std::string::npos);
  EXPECT_NE(metrics.body.find("cleave_scheduler_workers{role=\"decode\"} 0\n"), std::string::npos);
  EXPECT_EQ(metrics.body.find("cleave_scheduler_worker_kv_blocks{"), std::string::npos);

  Register("prefill-0", v1::WORKER_ROLE_PREFILL, "127.0.0.1:9101");
  Register("decode-0", v1::WORKER_ROLE_DECODE, "127.0.0.1:9102");
  metrics = HttpGet(http(), "/metrics");
  EXPECT_EQ(PromtoolComplaints(metrics.body), "") << metrics.body;
  EXPECT_NE(metrics.body.find("cleave_scheduler_workers{role=\"decode\"} 1\n"), std::string::npos);
  EXPECT_NE(metrics.body.find("cleave_scheduler_worker_kv_blocks{worker=\"decode-0\",role=\"decode\"} 64\n"),
            std::string::npos)
      << metrics.body;
  EXPECT_NE(metrics.body.find("cleave_scheduler_worker_kv_blocks_used{worker=\"prefill-0\",role=\"prefill\"} 0\n"),
            std::string::npos);

  // Workers' own ports, for Prometheus http_sd_configs.
  auto sd = HttpGet(http(), "/discovery/prometheus");
  ASSERT_EQ(sd.status, 200);
  EXPECT_EQ(sd.content_type, "application/json");
  const nlohmann::json groups = nlohmann::json::parse(sd.body);
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_EQ(groups[0]["targets"], nlohmann::json::array({"127.0.0.1:9101"}));
  EXPECT_EQ(groups[0]["labels"]["role"], "prefill");
  EXPECT_EQ(groups[0]["labels"]["worker"], "prefill-0");
  EXPECT_EQ(groups[1]["labels"]["worker"], "decode-0");

  // A worker listening on every interface is listed at the address it connected from.
  Register("decode-1", v1::WORKER_ROLE_DECODE, "0.0.0.0:9103");
  const nlohmann::json again = nlohmann::json::parse(HttpGet(http(), "/discovery/prometheus").body);
  ASSERT_EQ(again.size(), 3u);
  EXPECT_EQ(again[2]["targets"], nlohmann::json::array({"127.0.0.1:9103"}));
}

TEST_F(SchedulerServiceTest, HealthAndReadinessUntilDrained) {
  EXPECT_EQ(HttpGet(http(), "/health").status, 200);
  EXPECT_EQ(HttpGet(http(), "/ready").status, 200);
  EXPECT_NE(HttpGet(http(), "/metrics").body.find("cleave_scheduler_draining 0\n"), std::string::npos);
  server_->Drain();
  const auto ready = HttpGet(http(), "/ready");
  EXPECT_EQ(ready.status, 503);
  EXPECT_NE(ready.body.find("draining"), std::string::npos);
  EXPECT_EQ(HttpGet(http(), "/health").status, 200);  // alive all the same
  EXPECT_NE(HttpGet(http(), "/metrics").body.find("cleave_scheduler_draining 1\n"), std::string::npos);
  // The control plane keeps answering until Shutdown().
  Register("late-0", v1::WORKER_ROLE_COLOCATED, "");
  const auto sd = nlohmann::json::parse(HttpGet(http(), "/discovery/prometheus").body);
  EXPECT_TRUE(sd.empty());  // a worker without an HTTP port is not a scrape target
}

}  // namespace
}  // namespace cleave::scheduler
