// Tensor view basics: strides, numel/nbytes, contiguity, Slice0 / Narrow / Reshape and the
// DebugString the kernels put in their error messages.
#include "cleave/kernels/tensor.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace cleave::kernels {
namespace {

TEST(TensorTest, DefaultIsEmpty) {
  Tensor t;
  EXPECT_TRUE(t.empty());
  EXPECT_EQ(t.ndim(), 0);
  EXPECT_EQ(t.numel(), 1);  // a 0-d tensor is a scalar
  EXPECT_TRUE(t.device().is_cpu());
}

TEST(TensorTest, ContiguousStridesAndSizes) {
  std::vector<float> buf(2 * 3 * 4);
  Tensor t(buf.data(), DType::kF32, {2, 3, 4});
  EXPECT_EQ(t.ndim(), 3);
  EXPECT_EQ(t.dim(0), 2);
  EXPECT_EQ(t.dim(-1), 4);
  EXPECT_EQ(t.stride(0), 12);
  EXPECT_EQ(t.stride(1), 4);
  EXPECT_EQ(t.stride(-1), 1);
  EXPECT_EQ(t.numel(), 24);
  EXPECT_EQ(t.nbytes(), 96u);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.data_as<float>(), buf.data());

  std::vector<uint16_t> half(10);
  Tensor h(half.data(), DType::kBF16, {10});
  EXPECT_EQ(h.nbytes(), 20u);

  const int64_t shape[] = {5, 2};
  Tensor p(buf.data(), DType::kI32, shape, 2, Device::Cuda(1));
  EXPECT_EQ(p.stride(0), 2);
  EXPECT_EQ(p.device(), Device::Cuda(1));
  EXPECT_FALSE(p.device().is_cpu());
}

TEST(TensorTest, Slice0KeepsStridesAndOffsetsData) {
  std::vector<float> buf(6 * 4);
  Tensor t(buf.data(), DType::kF32, {6, 4});
  Tensor s = t.Slice0(2, 5);
  EXPECT_EQ(s.dim(0), 3);
  EXPECT_EQ(s.dim(1), 4);
  EXPECT_EQ(s.data_as<float>(), buf.data() + 8);
  EXPECT_TRUE(s.is_contiguous());
  Tensor none = t.Slice0(3, 3);
  EXPECT_EQ(none.numel(), 0);
}

TEST(TensorTest, NarrowMakesRowsNonContiguous) {
  std::vector<float> buf(4 * 10);
  Tensor t(buf.data(), DType::kF32, {4, 10});
  Tensor n = t.Narrow(1, 3, 5);
  EXPECT_EQ(n.dim(0), 4);
  EXPECT_EQ(n.dim(1), 5);
  EXPECT_EQ(n.stride(0), 10);
  EXPECT_EQ(n.stride(1), 1);
  EXPECT_EQ(n.data_as<float>(), buf.data() + 3);
  EXPECT_FALSE(n.is_contiguous());
  // Narrowing dim 0 is a row slice and stays contiguous; a negative dim counts from the end.
  EXPECT_TRUE(t.Narrow(0, 1, 2).is_contiguous());
  EXPECT_EQ(t.Narrow(-1, 2, 3).data_as<float>(), buf.data() + 2);
  // A single remaining row is contiguous whatever its stride.
  EXPECT_TRUE(n.Slice0(1, 2).is_contiguous());

  std::vector<float> qkv(2 * 6 * 8);
  Tensor heads(qkv.data(), DType::kF32, {2, 6, 8});
  Tensor k = heads.Narrow(1, 4, 1);
  EXPECT_EQ(k.dim(1), 1);
  EXPECT_EQ(k.stride(0), 48);
  EXPECT_EQ(k.data_as<float>(), qkv.data() + 32);
}

TEST(TensorTest, ReshapeKeepsData) {
  std::vector<float> buf(24);
  Tensor t(buf.data(), DType::kF32, {2, 12});
  Tensor r = t.Reshape({2, 3, 4});
  EXPECT_EQ(r.ndim(), 3);
  EXPECT_EQ(r.stride(0), 12);
  EXPECT_EQ(r.data(), t.data());
  EXPECT_EQ(r.numel(), t.numel());
}

TEST(TensorTest, DebugString) {
  std::vector<uint16_t> buf(32);
  EXPECT_EQ(Tensor(buf.data(), DType::kBF16, {4, 8}).DebugString(), "bf16[4, 8]");
  EXPECT_EQ(Tensor(buf.data(), DType::kI32, {7}).DebugString(), "i32[7]");
  EXPECT_EQ(Tensor().DebugString(), "f32[]");
}

}  // namespace
}  // namespace cleave::kernels
