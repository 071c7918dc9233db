// WeightStore: every tensor of a Hugging Face checkpoint directory, by name, as views into the
// memory-mapped safetensors files.
//
// A directory holds either one `model.safetensors` or a `model.safetensors.index.json` whose
// "weight_map" names, for each tensor, the shard file (in the same directory) that holds it.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "cleave/kernels/tensor.h"
#include "cleave/model/safetensors.h"

namespace cleave::model {

// Owns the mapped files; the Tensors that Get returns point into them and are valid for the
// store's lifetime. Weights are read-only: the views carry a non-const pointer because Tensor
// has no const flavour, but the pages are mapped PROT_READ and a write through them faults.
// Immutable after Open: all methods are const and safe to call from any number of threads.
class WeightStore {
 public:
  // Prefers model.safetensors when both layouts are present (as transformers does).
  // NotFound when the directory has neither, or when a shard the index names is missing;
  // InvalidArgument when a file is malformed, a shard name is not a plain file name (contains
  // '/' or '..'), or a shard lacks a tensor the index puts in it.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<WeightStore>> Open(
      const std::filesystem::path& model_dir);
  // A store over one already-validated file (tests build these from in-memory buffers).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<WeightStore>> FromFile(
      std::unique_ptr<SafetensorsFile> file);

  bool Has(std::string_view name) const { return Find(name) != nullptr; }
  // The raw entry, any dtype (nullptr when absent); for tools that copy tensors through.
  const TensorEntry* Find(std::string_view name) const;

  // View of a tensor that must have exactly `expected_shape` and a float dtype (f32, bf16,
  // f16). NotFound naming the tensor; InvalidArgument "tensor X has shape [..], config expects
  // [..]", or naming the dtype, or when the data is not aligned to the element size.
  [[nodiscard]] absl::StatusOr<kernels::Tensor> Get(std::string_view name,
                                                    std::vector<int64_t> expected_shape) const;

  // Every tensor name, sorted.
  std::vector<std::string> Names() const;
  // Where the weights came from (the directory, or the single file's source), for messages.
  const std::string& source() const { return source_; }

 private:
  explicit WeightStore(std::string source) : source_(std::move(source)) {}

  std::string source_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  // Entries point into files_. std::less<> lets Find look up a string_view without a copy.
  std::map<std::string, const TensorEntry*, std::less<>> by_name_;
};

}  // namespace cleave::model
