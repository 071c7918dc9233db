// EmbeddingLookup for f32/bf16/f16 tables (exact: widening is lossless), out-of-range ids and
// argument errors.
#include "cleave/kernels/embedding.h"

#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "unit/kernel_test_util.h"

namespace cleave::kernels {
namespace {

using testing_util::AllClose;
using testing_util::kSeed;
using testing_util::RandomFloats;

TEST(EmbeddingTest, GathersRowsForEveryDtype) {
  const int64_t shapes[][3] = {
      {1, 1, 1}, {7, 5, 7}, {63, 100, 63}, {129, 33, 129}, {3, 1000, 4096}};
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF16}) {
    for (const auto& s : shapes) {
      const int64_t t = s[0], v = s[1], d = s[2];
      std::mt19937 rng(kSeed + static_cast<uint32_t>(t + v + d));
      std::vector<float> table = RandomFloats(static_cast<size_t>(v * d), rng, -2.0f, 2.0f);
      std::vector<uint16_t> bits;
      std::vector<float> effective = table;
      if (dt == DType::kBF16) {
        bits = testing_util::ToBf16(table);
        effective = testing_util::FromBf16(bits);
      } else if (dt == DType::kF16) {
        bits = testing_util::ToF16(table);
        effective = testing_util::FromF16(bits);
      }
      std::vector<int32_t> ids(static_cast<size_t>(t));
      std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(v - 1));
      for (int32_t& id : ids) id = pick(rng);
      ids.back() = static_cast<int32_t>(v - 1);  // the last row must be reachable
      std::vector<float> out(static_cast<size_t>(t * d));
      void* tp =
          dt == DType::kF32 ? static_cast<void*>(table.data()) : static_cast<void*>(bits.data());
      Tensor idt(ids.data(), DType::kI32, {t}), tt(tp, dt, {v, d}),
          ot(out.data(), DType::kF32, {t, d});
      ASSERT_TRUE(EmbeddingLookup(idt, tt, ot).ok());
      std::vector<double> want;
      for (int64_t i = 0; i < t; ++i)
        for (int64_t j = 0; j < d; ++j) want.push_back(effective[ids[i] * d + j]);
      EXPECT_TRUE(AllClose(
          absl::StrCat("embedding_", std::string(DTypeName(dt)), "_t", t, "_v", v, "_d", d), out,
          want, 0.0, 0.0));
    }
  }
}

TEST(EmbeddingTest, OutOfRangeIdIsInvalidAndWritesNothing) {
  std::vector<float> table(4 * 3, 1.0f);
  Tensor tt(table.data(), DType::kF32, {4, 3});
  for (int32_t bad : {4, -1, 1 << 30}) {
    std::vector<int32_t> ids = {0, 1, bad, 2};
    std::vector<float> out(4 * 3, -5.0f);
    Tensor idt(ids.data(), DType::kI32, {4}), ot(out.data(), DType::kF32, {4, 3});
    const absl::Status s = EmbeddingLookup(idt, tt, ot);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
    EXPECT_NE(std::string(s.message()).find(absl::StrCat("ids[2] = ", bad)), std::string::npos)
        << s;
    EXPECT_EQ(out, std::vector<float>(4 * 3, -5.0f));
  }
}

TEST(EmbeddingTest, RejectsBadArguments) {
  std::vector<float> table(4 * 3), out(2 * 3);
  std::vector<int32_t> ids = {0, 1};
  Tensor idt(ids.data(), DType::kI32, {2}), tt(table.data(), DType::kF32, {4, 3});
  Tensor ot(out.data(), DType::kF32, {2, 3});
  EXPECT_TRUE(EmbeddingLookup(idt, tt, ot).ok());
  EXPECT_TRUE(
      absl::IsInvalidArgument(EmbeddingLookup(Tensor(ids.data(), DType::kI64, {1}), tt, ot)));
  EXPECT_TRUE(
      absl::IsInvalidArgument(EmbeddingLookup(idt, Tensor(table.data(), DType::kI32, {4, 3}), ot)));
  Tensor narrow_out(out.data(), DType::kF32, {2, 2});
  Tensor wrong_rows(out.data(), DType::kF32, {3, 2});
  Tensor bf16_out(out.data(), DType::kBF16, {2, 3});
  EXPECT_TRUE(absl::IsInvalidArgument(EmbeddingLookup(idt, tt, narrow_out)));
  EXPECT_TRUE(absl::IsInvalidArgument(EmbeddingLookup(idt, tt, wrong_rows)));
  EXPECT_TRUE(absl::IsInvalidArgument(EmbeddingLookup(idt, tt, bf16_out)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      EmbeddingLookup(idt, Tensor(table.data(), DType::kF32, {4, 3}, Device::Cuda(0)), ot)));
}

}  // namespace
}  // namespace cleave::kernels
