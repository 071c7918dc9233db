// SafetensorsFile / WriteSafetensors / WeightStore: round trips for every dtype, the sharded
// layout, and malformed files. Weight files are untrusted input, so every malformed case must be
// an InvalidArgument (or NotFound) whose message names the problem, never a crash.
#include "cleave/model/safetensors.h"

#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "cleave/model/weight_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

using kernels::DType;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
namespace fs = std::filesystem;

// A file as the format lays it out, with whatever header the test wants.
std::string RawFile(const std::string& header, const std::string& data, uint64_t header_len) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header_len >> (8 * i)) & 0xff);
  return out + header + data;
}
std::string RawFile(const std::string& header, const std::string& data) {
  return RawFile(header, data, header.size());
}

std::vector<uint8_t> Bytes(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + 31 * i);
  return v;
}

void ExpectError(const absl::Status& s, absl::StatusCode code, const std::string& needle) {
  ASSERT_FALSE(s.ok()) << "expected an error mentioning '" << needle << "'";
  EXPECT_EQ(s.code(), code) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr(needle));
}

template <typename T>
void ExpectInvalid(const absl::StatusOr<T>& r, const std::string& needle) {
  ExpectError(r.status(), absl::StatusCode::kInvalidArgument, needle);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> Parse(const std::string& bytes) {
  return SafetensorsFile::FromBuffer(bytes, "test.safetensors");
}

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) /
           ("cleave_safetensors_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  void WriteRaw(const fs::path& path, const std::string& bytes) {
    std::ofstream(path, std::ios::binary) << bytes;
  }
  std::string ReadRaw(const fs::path& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }

  fs::path dir_;
};

TEST_F(SafetensorsTest, RoundTripEveryDtype) {
  // Odd element counts put a 1- and a 2-byte tensor before wider ones in name order; the
  // writer must still keep every tensor aligned.
  struct Spec {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  const std::vector<Spec> specs = {
      {"a.u8", DType::kU8, {3}},          {"b.f16", DType::kF16, {3, 1}},
      {"c.bf16", DType::kBF16, {2, 3}},   {"d.f32", DType::kF32, {2, 2, 2}},
      {"e.i32", DType::kI32, {5}},        {"f.i64", DType::kI64, {3}},
      {"g.scalar", DType::kF32, {}},      {"h.empty", DType::kBF16, {0, 4}},
  };
  std::vector<std::vector<uint8_t>> payloads;
  std::vector<TensorToWrite> tensors;
  for (size_t i = 0; i < specs.size(); ++i) {
    int64_t numel = 1;
    for (int64_t d : specs[i].shape) numel *= d;
    payloads.push_back(Bytes(numel * kernels::DTypeSize(specs[i].dtype), static_cast<uint8_t>(i + 1)));
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    tensors.push_back({specs[i].name, specs[i].dtype, specs[i].shape, payloads[i].data()});
  }
  const fs::path path = dir_ / "model.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());
  EXPECT_FALSE(fs::exists(dir_ / "model.safetensors.tmp"));

  const std::string raw = ReadRaw(path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(raw[i]);
  EXPECT_EQ(header_len % 8, 0u) << "header must be padded so the data section is 8-aligned";

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> opened = SafetensorsFile::Open(path);
  ASSERT_TRUE(opened.ok()) << opened.status();
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> buffered = SafetensorsFile::FromBuffer(raw);
  ASSERT_TRUE(buffered.ok()) << buffered.status();
  for (const SafetensorsFile* file : {opened->get(), buffered->get()}) {
    EXPECT_THAT(file->metadata(), ElementsAre(std::pair<const std::string, std::string>("format", "pt")));
    ASSERT_EQ(file->tensors().size(), specs.size());
    for (size_t i = 0; i < specs.size(); ++i) {
      SCOPED_TRACE(specs[i].name);
      const TensorEntry* e = file->Find(specs[i].name);
      ASSERT_NE(e, nullptr);
      EXPECT_EQ(&file->tensors()[i], e) << "tensors() is sorted by name";
      EXPECT_EQ(e->dtype, specs[i].dtype);
      EXPECT_EQ(e->shape, specs[i].shape);
      ASSERT_EQ(e->nbytes, payloads[i].size());
      if (e->nbytes > 0) {
        EXPECT_EQ(std::memcmp(e->data, payloads[i].data(), e->nbytes), 0);
      }
      EXPECT_EQ(reinterpret_cast<uintptr_t>(e->data) % kernels::DTypeSize(e->dtype), 0u);
    }
    EXPECT_EQ(file->Find("missing"), nullptr);
    EXPECT_EQ(file->Find(""), nullptr);
  }
}

TEST_F(SafetensorsTest, ReadsHandWrittenFileWithoutMetadata) {
  // 2 x f32 at [0, 8), 1 x i64 at [8, 16); the header is not padded, which the format allows.
  float f[2] = {1.5f, -2.0f};
  int64_t i = 42;
  std::string data(reinterpret_cast<const char*>(f), 8);
  data.append(reinterpret_cast<const char*>(&i), 8);
  auto file = Parse(RawFile(
      R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"I64","shape":[],"data_offsets":[8,16]}})",
      data));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_TRUE((*file)->metadata().empty());
  const TensorEntry* y = (*file)->Find("y");
  ASSERT_NE(y, nullptr);
  int64_t got;
  std::memcpy(&got, y->data, 8);
  EXPECT_EQ(got, 42);
}

TEST_F(SafetensorsTest, TruncatedAndBadHeaderLength) {
  ExpectInvalid(Parse(""), "truncated");
  ExpectInvalid(Parse("abcde"), "truncated");
  ExpectInvalid(Parse(RawFile("{}", "", 1000)), "past the end");
  ExpectInvalid(Parse(RawFile("{}", "", ~uint64_t{0})), "exceeds the limit");
  ExpectInvalid(Parse(RawFile("{}", "", SafetensorsFile::kMaxHeaderBytes + 1)), "exceeds the limit");
  // An empty header is not JSON.
  ExpectInvalid(Parse(RawFile("", "")), "not valid JSON");
}

TEST_F(SafetensorsTest, TruncatedFileOnDisk) {
  std::vector<float> w(64, 1.0f);
  const fs::path path = dir_ / "model.safetensors";
  ASSERT_TRUE(WriteSafetensors(path, {{"w", DType::kF32, {8, 8}, w.data()}}, {}).ok());
  const std::string raw = ReadRaw(path);
  WriteRaw(path, raw.substr(0, raw.size() - 4));
  auto file = SafetensorsFile::Open(path);
  ExpectInvalid(file, "out of range");
  ExpectInvalid(file, path.string());  // the path is in the message
  ExpectInvalid(file, "'w'");          // and so is the tensor

  WriteRaw(path, raw.substr(0, 20));
  ExpectInvalid(SafetensorsFile::Open(path), "past the end");
  WriteRaw(path, "");
  ExpectInvalid(SafetensorsFile::Open(path), "truncated");
}

TEST_F(SafetensorsTest, OpenErrors) {
  ExpectError(SafetensorsFile::Open(dir_ / "absent.safetensors").status(), absl::StatusCode::kNotFound,
              "absent.safetensors");
  ExpectInvalid(SafetensorsFile::Open(dir_), "not a regular file");
}

TEST_F(SafetensorsTest, HeaderNotJsonOrNotAnObject) {
  ExpectInvalid(Parse(RawFile("{not json", "")), "not valid JSON");
  ExpectInvalid(Parse(RawFile("[1, 2]", "")), "must be a JSON object");
  ExpectInvalid(Parse(RawFile(std::string("{\"\xff\": 1}"), "")), "not valid JSON");
  ExpectInvalid(Parse(RawFile("{} trailing", "")), "not valid JSON");
  ExpectInvalid(Parse(RawFile(R"({"t": 5})", "")), "entry must be an object");
}

TEST_F(SafetensorsTest, BadEntries) {
  const std::string data(16, '\0');
  struct Case {
    const char* header;
    const char* needle;
  };
  const Case cases[] = {
      {R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[0,32]}})", "out of range"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", "out of range"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551615,18446744073709551615]}})",
       "out of range"},
      {R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "size mismatch"},
      {R"({"t":{"dtype":"F16","shape":[2,2],"data_offsets":[0,16]}})", "size mismatch"},
      {R"({"t":{"dtype":"F64","shape":[2],"data_offsets":[0,16]}})", "unsupported dtype 'F64'"},
      {R"({"t":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})", "unsupported dtype 'BOOL'"},
      {R"({"t":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", "unsupported dtype 'F8_E4M3'"},
      {R"({"t":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}})", "unsupported dtype 'f32'"},
      {R"({"t":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}})", "overflows"},
      {R"({"t":{"dtype":"F32","shape":[9223372036854775807,2],"data_offsets":[0,16]}})", "overflows"},
      {R"({"t":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,16]}})", "non-negative"},
      {R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})", "non-negative"},
      {R"({"t":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", "non-negative"},
      {R"({"t":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}})", "non-negative"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", "data_offsets"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}})", "data_offsets"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", "data_offsets"},
      {R"({"t":{"dtype":"F32","shape":[1],"data_offsets":"0-4"}})", "data_offsets"},
      {R"({"t":{"shape":[1],"data_offsets":[0,4]}})", "'dtype'"},
      {R"({"t":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", "'dtype'"},
      {R"({"t":{"dtype":"F32","data_offsets":[0,4]}})", "'shape'"},
      {R"({"t":{"dtype":"F32","shape":{"a":1},"data_offsets":[0,4]}})", "'shape'"},
      {R"({"t":{"dtype":"F32","shape":[1]}})", "'data_offsets'"},
      {R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
       "overlapping"},
      {R"({"a":{"dtype":"U8","shape":[16],"data_offsets":[0,16]},"b":{"dtype":"I32","shape":[1],"data_offsets":[12,16]}})",
       "overlapping"},
      {R"({"__metadata__":{"format":1}})", "__metadata__"},
      {R"({"__metadata__":["pt"]})", "__metadata__"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.header);
    auto file = Parse(RawFile(c.header, data));
    ExpectInvalid(file, c.needle);
    ExpectInvalid(file, "test.safetensors");
  }
}

TEST_F(SafetensorsTest, DeeplyNestedHeaderDoesNotOverflowTheStack) {
  const std::string deep = std::string(200000, '[') + std::string(200000, ']');
  ExpectInvalid(Parse(RawFile(R"({"t":{"dtype":"F32","shape":[)" + deep + R"(],"data_offsets":[0,4]}})",
                              std::string(4, '\0'))),
                "non-negative");
  ExpectInvalid(Parse(RawFile(R"({"__metadata__":{"k":)" + deep + "}}", "")), "__metadata__");
}

TEST_F(SafetensorsTest, EdgeCasesThatAreValid) {
  const std::string data(16, '\0');
  // Zero-size tensors may share an offset with anything; gaps between ranges are tolerated;
  // header padding is JSON whitespace.
  auto file = Parse(RawFile(
      R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[4,4]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
      R"("c":{"dtype":"U8","shape":[4],"data_offsets":[12,16]}}   )",
      data));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 3u);
  EXPECT_TRUE(Parse(RawFile("{}", "")).ok());
}

TEST_F(SafetensorsTest, WriterRejectsBadInput) {
  float x[4] = {};
  const fs::path path = dir_ / "out.safetensors";
  ExpectError(WriteSafetensors(path, {{"a", DType::kF32, {4}, x}, {"a", DType::kF32, {4}, x}}, {}),
              absl::StatusCode::kInvalidArgument, "duplicate");
  ExpectError(WriteSafetensors(path, {{"__metadata__", DType::kF32, {4}, x}}, {}),
              absl::StatusCode::kInvalidArgument, "reserved");
  ExpectError(WriteSafetensors(path, {{"a", DType::kF32, {-1, 4}, x}}, {}),
              absl::StatusCode::kInvalidArgument, "invalid shape");
  ExpectError(WriteSafetensors(path, {{"a", DType::kF32, {4}, nullptr}}, {}),
              absl::StatusCode::kInvalidArgument, "no data");
  ExpectError(WriteSafetensors(path, {{"a", DType::kF32, {4}, x}}, {{"k", "\xff"}}),
              absl::StatusCode::kInvalidArgument, "header");
  EXPECT_FALSE(fs::exists(path));
  EXPECT_FALSE(WriteSafetensors(dir_ / "no_such_dir" / "x.safetensors", {}, {}).ok());
}

// --- WeightStore -------------------------------------------------------------------------

TEST_F(SafetensorsTest, WeightStoreSingleFile) {
  std::vector<float> w(6);
  std::iota(w.begin(), w.end(), 0.0f);
  std::vector<uint16_t> h(4, 0x3c00);  // 1.0 in f16
  std::vector<int32_t> ids(3, 7);
  ASSERT_TRUE(WriteSafetensors(dir_ / "model.safetensors",
                               {{"w", DType::kF32, {2, 3}, w.data()},
                                {"h", DType::kF16, {4}, h.data()},
                                {"ids", DType::kI32, {3}, ids.data()}},
                               {})
                  .ok());
  auto store = WeightStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_THAT((*store)->Names(), ElementsAre("h", "ids", "w"));
  EXPECT_TRUE((*store)->Has("w"));
  EXPECT_FALSE((*store)->Has("x"));

  absl::StatusOr<kernels::Tensor> t = (*store)->Get("w", {2, 3});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->dtype(), DType::kF32);
  EXPECT_EQ(t->ndim(), 2);
  EXPECT_EQ(t->dim(0), 2);
  EXPECT_EQ(t->dim(1), 3);
  EXPECT_EQ(t->data_as<const float>()[5], 5.0f);
  ASSERT_TRUE((*store)->Get("h", {4}).ok());

  ExpectInvalid((*store)->Get("w", {3, 2}), "tensor w has shape [2, 3], config expects [3, 2]");
  ExpectInvalid((*store)->Get("w", {6}), "config expects [6]");
  ExpectInvalid((*store)->Get("ids", {3}), "dtype i32");
  ExpectError((*store)->Get("x", {1}).status(), absl::StatusCode::kNotFound, "tensor x not found");
  ASSERT_NE((*store)->Find("ids"), nullptr);
  EXPECT_EQ((*store)->Find("ids")->dtype, DType::kI32);
}

TEST_F(SafetensorsTest, WeightStoreRejectsMisalignedData) {
  // A 5-byte header puts the data section at offset 13: legal safetensors, but f32 reads from
  // it would be misaligned, so Get refuses rather than hand out the view.
  const std::string header = R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  std::string padded = header;
  while ((8 + padded.size()) % 4 != 1) padded += ' ';
  auto file = SafetensorsFile::FromBuffer(RawFile(padded, std::string(4, '\0')));
  ASSERT_TRUE(file.ok()) << file.status();
  auto store = WeightStore::FromFile(*std::move(file));
  ASSERT_TRUE(store.ok());
  ExpectInvalid((*store)->Get("w", {1}), "aligned");
}

class ShardedStoreTest : public SafetensorsTest {
 protected:
  void SetUp() override {
    SafetensorsTest::SetUp();
    a_.assign(8, 1.0f);
    b_.assign(4, 2.0f);
    ASSERT_TRUE(WriteSafetensors(dir_ / "model-00001-of-00002.safetensors",
                                 {{"layer.0.w", DType::kF32, {2, 4}, a_.data()}}, {{"format", "pt"}})
                    .ok());
    ASSERT_TRUE(WriteSafetensors(dir_ / "model-00002-of-00002.safetensors",
                                 {{"layer.1.w", DType::kF32, {4}, b_.data()},
                                  {"unmapped", DType::kF32, {4}, b_.data()}},
                                 {})
                    .ok());
  }
  void WriteIndex(const nlohmann::json& weight_map) {
    nlohmann::json index = {{"metadata", {{"total_size", 48}}}, {"weight_map", weight_map}};
    WriteRaw(dir_ / "model.safetensors.index.json", index.dump(2));
  }
  const nlohmann::json kGoodMap = {{"layer.0.w", "model-00001-of-00002.safetensors"},
                                   {"layer.1.w", "model-00002-of-00002.safetensors"}};

  std::vector<float> a_, b_;
};

TEST_F(ShardedStoreTest, OpensEveryShard) {
  WriteIndex(kGoodMap);
  auto store = WeightStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_THAT((*store)->Names(), ElementsAre("layer.0.w", "layer.1.w"));  // only what the index maps
  auto t0 = (*store)->Get("layer.0.w", {2, 4});
  auto t1 = (*store)->Get("layer.1.w", {4});
  ASSERT_TRUE(t0.ok() && t1.ok());
  EXPECT_EQ(t0->data_as<const float>()[7], 1.0f);
  EXPECT_EQ(t1->data_as<const float>()[3], 2.0f);
}

TEST_F(ShardedStoreTest, SingleFileWinsOverIndex) {
  WriteIndex(kGoodMap);
  float x = 3.0f;
  ASSERT_TRUE(WriteSafetensors(dir_ / "model.safetensors", {{"solo", DType::kF32, {1}, &x}}, {}).ok());
  auto store = WeightStore::Open(dir_);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_THAT((*store)->Names(), ElementsAre("solo"));
}

TEST_F(ShardedStoreTest, ShardNamesMayNotEscapeTheDirectory) {
  for (const char* name : {"../model-00001-of-00002.safetensors", "sub/x.safetensors",
                           "/etc/passwd", "..", "a\\b.safetensors", ""}) {
    SCOPED_TRACE(name);
    nlohmann::json map = kGoodMap;
    map["layer.1.w"] = name;
    WriteIndex(map);
    ExpectInvalid(WeightStore::Open(dir_), "not a plain file name");
  }
}

TEST_F(ShardedStoreTest, MissingShardIsNotFound) {
  nlohmann::json map = kGoodMap;
  map["layer.2.w"] = "model-00003-of-00003.safetensors";
  WriteIndex(map);
  ExpectError(WeightStore::Open(dir_).status(), absl::StatusCode::kNotFound,
              "model-00003-of-00003.safetensors");
}

TEST_F(ShardedStoreTest, ShardMustHoldWhatTheIndexSays) {
  nlohmann::json map = kGoodMap;
  map["layer.1.w"] = "model-00001-of-00002.safetensors";
  WriteIndex(map);
  ExpectInvalid(WeightStore::Open(dir_), "does not contain");
}

TEST_F(ShardedStoreTest, MalformedIndex) {
  WriteRaw(dir_ / "model.safetensors.index.json", "{\"weight_map\": ");
  ExpectInvalid(WeightStore::Open(dir_), "not valid JSON");
  WriteRaw(dir_ / "model.safetensors.index.json", "{\"metadata\": {}}");
  ExpectInvalid(WeightStore::Open(dir_), "weight_map");
  WriteIndex(nlohmann::json::object());
  ExpectInvalid(WeightStore::Open(dir_), "empty");
  WriteIndex({{"layer.0.w", 1}});
  ExpectInvalid(WeightStore::Open(dir_), "must be a file name");
}

TEST_F(ShardedStoreTest, CorruptShardNamesThePath) {
  WriteIndex(kGoodMap);
  WriteRaw(dir_ / "model-00002-of-00002.safetensors", RawFile("{oops", ""));
  absl::StatusOr<std::unique_ptr<WeightStore>> store = WeightStore::Open(dir_);
  ExpectInvalid(store, "model-00002-of-00002.safetensors");
  ExpectInvalid(store, "not valid JSON");
}

TEST_F(SafetensorsTest, EmptyDirectoryIsNotFound) {
  ExpectError(WeightStore::Open(dir_).status(), absl::StatusCode::kNotFound, "model.safetensors");
  ExpectError(WeightStore::Open(dir_ / "absent").status(), absl::StatusCode::kNotFound, "model.safetensors");
}

}  // namespace
}  // namespace cleave::model
