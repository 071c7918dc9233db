// Reading and writing the safetensors format (https://github.com/huggingface/safetensors):
//
//   [u64 little-endian N][N bytes of JSON header][data]
//
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets
// relative to the start of the data section, plus an optional "__metadata__" string map.
//
// Weight files are untrusted input: every field is validated before any tensor is exposed, so a
// TensorEntry's [data, data + nbytes) always lies inside the file and never overlaps another's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/kernels/dtype.h"

namespace cleave::model {

// One tensor of a parsed file. `data` points into the file's bytes (owned by the
// SafetensorsFile) and is read-only: in a mapped file the pages are PROT_READ, and writing
// through it faults. It is aligned to the dtype's size only if the writer laid the file out so
// (the reference writer and WriteSafetensors do); WeightStore::Get checks.
struct TensorEntry {
  std::string name;
  kernels::DType dtype;
  std::vector<int64_t> shape;  // row-major; empty for a scalar
  const uint8_t* data;
  size_t nbytes;               // == numel * DTypeSize(dtype)
};

// A validated safetensors file. Immutable after Open/FromBuffer: every method is const and any
// number of threads may call them concurrently. Entries and their data live as long as this.
class SafetensorsFile {
 public:
  // Header larger than this is refused (the reference implementation's limit): a real header
  // is a few hundred KB even for the largest checkpoints.
  static constexpr uint64_t kMaxHeaderBytes = 100u << 20;

  // Maps `path` read-only (MAP_PRIVATE) and validates it. NotFound when the file is absent,
  // InvalidArgument (naming the path and the offending tensor) when it is malformed. The file
  // must not be truncated by someone else while mapped (that would SIGBUS on access).
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(
      const std::filesystem::path& path);
  // Same validation over bytes already in memory, which the file takes ownership of. For tests
  // and fuzzing; `source` only names the buffer in error messages.
  [[nodiscard]] static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBuffer(
      std::string bytes, std::string source = "<buffer>");

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // nullptr when absent. O(log n).
  const TensorEntry* Find(std::string_view name) const;
  // Every tensor, sorted by name.
  const std::vector<TensorEntry>& tensors() const { return tensors_; }
  // The header's "__metadata__" (empty when it has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The path (or FromBuffer's `source`), for messages.
  const std::string& source() const { return source_; }

 private:
  explicit SafetensorsFile(std::string source) : source_(std::move(source)) {}
  absl::Status Parse();

  std::string source_;
  const uint8_t* bytes_ = nullptr;  // whole file: the mapping or owned_.data()
  size_t size_ = 0;
  void* mapping_ = nullptr;         // munmap'ed in the destructor when non-null
  std::string owned_;               // FromBuffer's bytes
  std::vector<TensorEntry> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Maps a safetensors dtype string ("BF16") to cleave's; InvalidArgument naming it otherwise.
// Supported: F32, F16, BF16, I32, I64, U8.
[[nodiscard]] absl::StatusOr<kernels::DType> DTypeFromSafetensors(std::string_view name);
std::string_view SafetensorsDTypeName(kernels::DType dtype);

struct TensorToWrite {
  std::string name;
  kernels::DType dtype;
  std::vector<int64_t> shape;
  const void* data;  // numel * DTypeSize(dtype) bytes, row-major; borrowed for the call
};

// Writes a safetensors file readable by the reference implementation: header keys sorted (a
// JSON object), header padded with spaces to a multiple of 8 bytes, data laid out without gaps
// by descending dtype size then name, so every tensor is aligned to its element size. Writes
// to a temporary file beside `path` and renames it, so a reader never sees a partial file.
// InvalidArgument for duplicate or reserved names and negative shapes.
[[nodiscard]] absl::Status WriteSafetensors(const std::filesystem::path& path,
                                            const std::vector<TensorToWrite>& tensors,
                                            const std::map<std::string, std::string>& metadata);

}  // namespace cleave::model
