#include "cleave/model/weight_store.h"

#include <cstdint>
#include <fstream>
#include <sstream>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cleave/common/status.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

using json = nlohmann::json;

constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";
// An index lists one line per tensor; even a 1000-layer model stays far below this.
constexpr uintmax_t kMaxIndexBytes = 100u << 20;

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// The index is untrusted: a shard name must be a plain file name inside the model directory,
// never a path that climbs out of it or a name the OS would truncate.
bool IsPlainFileName(const std::string& name) {
  return !name.empty() && name.find('/') == std::string::npos &&
         name.find('\\') == std::string::npos && name.find("..") == std::string::npos &&
         name.find('\0') == std::string::npos;
}

absl::StatusOr<std::string> ReadSmallFile(const std::filesystem::path& path, uintmax_t limit) {
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(path, ec);
  if (ec) return absl::UnavailableError(absl::StrCat("cannot stat ", path.string(), ": ", ec.message()));
  if (size > limit) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), " is ", size, " bytes (limit ", limit, ")"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::UnavailableError(absl::StrCat("cannot read ", path.string()));
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// weight_map as shard -> the tensors the index puts in it.
absl::StatusOr<std::map<std::string, std::vector<std::string>>> ReadIndex(
    const std::filesystem::path& path) {
  CLEAVE_ASSIGN_OR_RETURN(std::string text, ReadSmallFile(path, kMaxIndexBytes));
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": ", why));
  };
  json index;
  try {
    index = json::parse(text);
  } catch (const json::exception& e) {
    return bad(absl::StrCat("not valid JSON: ", e.what()));
  }
  if (!index.is_object() || !index.contains("weight_map") || !index.at("weight_map").is_object()) {
    return bad("expected an object with a 'weight_map' object");
  }
  const json& weight_map = index.at("weight_map");
  if (weight_map.empty()) return bad("'weight_map' is empty");
  std::map<std::string, std::vector<std::string>> shards;
  for (const auto& [tensor, shard] : weight_map.items()) {
    if (!shard.is_string()) {
      return bad(absl::StrCat("weight_map entry for '", tensor, "' must be a file name, got ",
                              shard.type_name()));
    }
    const std::string& file = shard.get_ref<const std::string&>();
    if (!IsPlainFileName(file)) {
      return bad(absl::StrCat("weight_map puts '", tensor, "' in '", file,
                              "', which is not a plain file name in the model directory "
                              "(no '/', '\\' or '..' allowed)"));
    }
    shards[file].push_back(tensor);
  }
  return shards;
}

}  // namespace

absl::StatusOr<std::unique_ptr<WeightStore>> WeightStore::FromFile(std::unique_ptr<SafetensorsFile> file) {
  auto store = std::unique_ptr<WeightStore>(new WeightStore(file->source()));
  for (const TensorEntry& t : file->tensors()) store->by_name_.emplace(t.name, &t);
  store->files_.push_back(std::move(file));
  return store;
}

absl::StatusOr<std::unique_ptr<WeightStore>> WeightStore::Open(const std::filesystem::path& model_dir) {
  std::error_code ec;
  const std::filesystem::path single = model_dir / kSingleFile;
  if (std::filesystem::exists(single, ec)) {
    CLEAVE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single));
    return FromFile(std::move(file));
  }
  const std::filesystem::path index_path = model_dir / kIndexFile;
  if (!std::filesystem::exists(index_path, ec)) {
    return absl::NotFoundError(absl::StrCat("no ", kSingleFile, " or ", kIndexFile, " in ",
                                            model_dir.string()));
  }
  CLEAVE_ASSIGN_OR_RETURN(auto shards, ReadIndex(index_path));

  auto store = std::unique_ptr<WeightStore>(new WeightStore(model_dir.string()));
  for (const auto& [shard, names] : shards) {
    const std::filesystem::path shard_path = model_dir / shard;
    if (!std::filesystem::exists(shard_path, ec)) {
      return absl::NotFoundError(absl::StrCat("shard ", shard_path.string(), ", named by ",
                                              kIndexFile, ", is missing"));
    }
    CLEAVE_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(shard_path));
    for (const std::string& name : names) {
      const TensorEntry* entry = file->Find(name);
      if (entry == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(kIndexFile, " puts tensor '", name, "' in ",
                                                       shard_path.string(), ", which does not contain it"));
      }
      // Only what the index maps is exposed, as transformers loads it: a shard may carry
      // tensors the index assigns elsewhere (or nowhere), and those are not seen.
      store->by_name_.emplace(name, entry);
    }
    store->files_.push_back(std::move(file));
  }
  return store;
}

const TensorEntry* WeightStore::Find(std::string_view name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

absl::StatusOr<kernels::Tensor> WeightStore::Get(std::string_view name,
                                                 std::vector<int64_t> expected_shape) const {
  const TensorEntry* e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(absl::StrCat("tensor ", std::string(name), " not found in ", source_));
  }
  if (e->shape != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", e->name, " has shape ", ShapeString(e->shape),
                                                   ", config expects ", ShapeString(expected_shape)));
  }
  if (e->dtype != kernels::DType::kF32 && e->dtype != kernels::DType::kBF16 &&
      e->dtype != kernels::DType::kF16) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", e->name, " has dtype ",
                                                   std::string(kernels::DTypeName(e->dtype)),
                                                   "; weights must be f32, bf16 or f16"));
  }
  if (expected_shape.size() > static_cast<size_t>(kernels::kMaxDims)) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", e->name, " has ", expected_shape.size(),
                                                   " dims; at most ", kernels::kMaxDims, " are supported"));
  }
  // Kernels read elements through typed pointers; a writer that did not pad its header can
  // leave them misaligned, which is undefined behaviour to read that way.
  if (reinterpret_cast<uintptr_t>(e->data) % kernels::DTypeSize(e->dtype) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor ", e->name, " in ", source_, " is not aligned to its ",
        kernels::DTypeSize(e->dtype), "-byte elements (the file's header is not padded)"));
  }
  return kernels::Tensor(const_cast<uint8_t*>(e->data), e->dtype, expected_shape.data(),
                         static_cast<int>(expected_shape.size()));
}

std::vector<std::string> WeightStore::Names() const {
  std::vector<std::string> names;
  names.reserve(by_name_.size());
  for (const auto& [name, entry] : by_name_) names.push_back(name);
  return names;
}

}  // namespace cleave::model
