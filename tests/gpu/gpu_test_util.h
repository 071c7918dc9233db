// Shared by the GPU op tests (tests/gpu/*_test.cc): the per-run random seed, random inputs,
// device arrays with poisoning, and the closeness check. Every test binary prints its seed;
// CLEAVE_GPU_TEST_SEED=N repeats a run.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cleave/kernels/backend.h"
#include "cleave/kernels/cuda_backend.h"
#include "cleave/kernels/dtype.h"
#include "cleave/kernels/tensor.h"
#include "gtest/gtest.h"

namespace cleave::kernels::gputest {

inline uint32_t Seed() {
  static const uint32_t seed = [] {
    const char* env = std::getenv("CLEAVE_GPU_TEST_SEED");
    const uint32_t s = env != nullptr ? static_cast<uint32_t>(std::strtoul(env, nullptr, 10)) : std::random_device{}();
    std::printf("gpu test seed %u (CLEAVE_GPU_TEST_SEED=%u repeats this run)\n", s, s);
    return s;
  }();
  return seed;
}

inline std::vector<float> Random(size_t n, float scale, uint32_t salt) {
  std::mt19937 rng(Seed() ^ (salt * 0x9e3779b9u));
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Device memory holding a copy of host bytes, viewed as a tensor on cuda:0.
class DeviceArray {
 public:
  DeviceArray(Backend& backend, const void* host, size_t bytes) : backend_(backend), bytes_(bytes) {
    auto buf = backend.Allocate(std::max<size_t>(bytes, 1));
    EXPECT_TRUE(buf.ok()) << buf.status();
    buf_ = std::move(*buf);
    if (bytes > 0) {
      EXPECT_TRUE(backend.CopyFromHost(host, buf_->data(), bytes, nullptr).ok());
    }
  }
  // All-ones bytes: NaN as f32, so an unwritten element fails the comparison.
  static std::unique_ptr<DeviceArray> Poisoned(Backend& backend, size_t bytes) {
    std::vector<unsigned char> ones(bytes, 0xff);
    return std::make_unique<DeviceArray>(backend, ones.data(), bytes);
  }
  void* data() { return buf_->data(); }
  Tensor View(DType dtype, std::initializer_list<int64_t> shape) {
    return Tensor(buf_->data(), dtype, shape, Device::Cuda(0));
  }
  template <typename T>
  std::vector<T> Download() {
    std::vector<T> out(bytes_ / sizeof(T));
    EXPECT_TRUE(backend_.CopyToHost(buf_->data(), out.data(), bytes_, nullptr).ok());
    return out;
  }

 private:
  Backend& backend_;
  size_t bytes_;
  std::unique_ptr<Buffer> buf_;
};

template <typename T>
std::unique_ptr<DeviceArray> Upload(Backend& backend, const std::vector<T>& v) {
  return std::make_unique<DeviceArray>(backend, v.data(), v.size() * sizeof(T));
}

// |got - want| <= atol + rtol * |want| for every element, and no NaN/Inf in `got`.
inline void ExpectClose(const std::vector<float>& got, const std::vector<float>& want, float atol, float rtol,
                 const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t bad = 0;
  double worst = 0;
  size_t worst_at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - want[i]);
    const bool ok = std::isfinite(got[i]) && err <= atol + rtol * std::fabs(want[i]);
    if (!ok) ++bad;
    if (!std::isfinite(got[i]) || err > worst) {
      worst = std::isfinite(got[i]) ? err : INFINITY;
      worst_at = i;
    }
  }
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements off; worst at " << worst_at
                     << ": got " << got[worst_at] << " want " << want[worst_at] << " (seed " << Seed() << ")";
}

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(CudaCompiledIn());
    auto b = CudaBackendFor(0);
    ASSERT_TRUE(b.ok()) << "this suite needs a CUDA device: " << b.status();
    backend_ = *b;
  }
  Backend& backend() { return *backend_; }
  Backend* backend_ = nullptr;
};

}  // namespace cleave::kernels::gputest
