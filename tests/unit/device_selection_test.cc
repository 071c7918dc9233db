// Run-time backend selection on a machine without a GPU (CI): device names parse, a CUDA device
// asked for is refused with Unavailable (not a crash) by the backend, the model loader and the
// KV cache, and the CPU path is untouched. tests/gpu/model_device_test.cc covers the GPU side.
#include <vector>

#include "cleave/kernels/backend.h"
#include "cleave/model/decoder.h"
#include "cleave/model/kv_cache.h"
#include "gtest/gtest.h"

namespace cleave {
namespace {

using kernels::Device;

TEST(ParseDevice, AcceptsCpuCudaAndIndexedCuda) {
  EXPECT_EQ(*kernels::ParseDevice("cpu"), Device::Cpu());
  EXPECT_EQ(*kernels::ParseDevice("cuda"), Device::Cuda(0));
  EXPECT_EQ(*kernels::ParseDevice("cuda:3"), Device::Cuda(3));
  for (const char* bad : {"", "gpu", "cuda:", "cuda:-1", "cuda:x", "CPU", "cuda:1:2"}) {
    const auto d = kernels::ParseDevice(bad);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
}

TEST(DeviceSelection, MissingGpuIsUnavailableEverywhere) {
  const auto backend = kernels::GetBackend(Device::Cuda(0));
  // The one case this test cannot check: a developer machine with a GPU.
  if (backend.ok()) GTEST_SKIP() << "this machine has a GPU (tests/gpu covers it)";
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable) << backend.status();

  model::LoadOptions load;
  load.device = Device::Cuda(0);
  const auto m = model::DecoderModel::Load("tests/data/golden/llama_gqa_tied", load);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable) << m.status();

  // The same checkpoint on the CPU loads and holds nothing on a device.
  const auto cpu = model::DecoderModel::Load("tests/data/golden/llama_gqa_tied");
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_EQ((*cpu)->device(), Device::Cpu());
  EXPECT_EQ((*cpu)->device_weight_bytes(), 0u);
}

TEST(DeviceSelection, PartialModelsStayOnTheCpu) {
  // Attention-FFN disaggregation runs on the CPU backend: a partial model on a device is refused
  // before any device is touched (so the message is the same with or without a GPU).
  model::LoadOptions load;
  load.device = Device::Cuda(0);
  load.part = model::LoadOptions::Part::kAttention;
  const auto m = model::DecoderModel::Load("tests/data/golden/mixtral", load);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
  EXPECT_NE(m.status().message().find("runs on the CPU backend only"), std::string::npos) << m.status();
}

TEST(DeviceSelection, KvCacheRemembersItsDevice) {
  const auto m = model::DecoderModel::Load("tests/data/golden/llama_gqa_tied");
  ASSERT_TRUE(m.ok()) << m.status();
  const auto cache = model::KvCache::Create((*m)->config(), 4, 16, kernels::CpuBackend());
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ((*cache)->device(), Device::Cpu());
  // Zeroed through the backend (Backend::Zero), as device caches are.
  const float* k = (*cache)->k(0).data_as<const float>();
  for (int64_t i = 0; i < (*cache)->k(0).numel(); ++i) ASSERT_EQ(k[i], 0.0f);
}

}  // namespace
}  // namespace cleave
