#include "cleave/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <system_error>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cleave/common/status.h"
#include "nlohmann/json.hpp"

namespace cleave::model {
namespace {

using json = nlohmann::json;
using kernels::DType;

constexpr std::string_view kMetadataKey = "__metadata__";

// Reads a non-negative JSON integer. nlohmann parses non-negative literals as unsigned and
// negative ones as signed; literals past UINT64_MAX become floats and are refused here.
bool GetU64(const json& v, uint64_t& out) {
  if (!v.is_number_unsigned()) return false;
  out = v.get<uint64_t>();
  return true;
}

// A JSON value for an error message. Containers are named, never dumped: dump() recurses, and
// a hostile header can nest arrays a million deep.
std::string Describe(const json& v) {
  if (!v.is_primitive()) return v.type_name();
  std::string text = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (text.size() > 64) text = text.substr(0, 64) + "...";
  return text;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// numel * element size, or false on overflow.
bool ByteSize(const std::vector<int64_t>& shape, size_t element_size, uint64_t& out) {
  uint64_t n = element_size;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  out = n;
  return true;
}

uint64_t ReadLe64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void WriteLe64(uint64_t v, char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

// One header entry, validated against the data section [0, data_size).
absl::StatusOr<TensorEntry> ParseEntry(const std::string& name, const json& v, const uint8_t* data,
                                       uint64_t data_size) {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", name, "': ", why));
  };
  if (!v.is_object()) return bad(absl::StrCat("entry must be an object, got ", v.type_name()));
  if (!v.contains("dtype") || !v.at("dtype").is_string()) return bad("'dtype' is missing or not a string");
  if (!v.contains("shape") || !v.at("shape").is_array()) return bad("'shape' is missing or not a list");
  if (!v.contains("data_offsets") || !v.at("data_offsets").is_array()) {
    return bad("'data_offsets' is missing or not a list");
  }

  TensorEntry e;
  e.name = name;
  absl::StatusOr<DType> dtype = DTypeFromSafetensors(v.at("dtype").get_ref<const std::string&>());
  if (!dtype.ok()) return bad(std::string(dtype.status().message()));
  e.dtype = *dtype;

  for (const json& d : v.at("shape")) {
    uint64_t dim;
    if (!GetU64(d, dim) || dim > static_cast<uint64_t>(INT64_MAX)) {
      return bad(absl::StrCat("shape entries must be non-negative integers, got ",
                              Describe(d)));
    }
    e.shape.push_back(static_cast<int64_t>(dim));
  }

  const json& offsets = v.at("data_offsets");
  uint64_t begin, end;
  if (offsets.size() != 2 || !GetU64(offsets[0], begin) || !GetU64(offsets[1], end)) {
    return bad("'data_offsets' must be two non-negative integers [begin, end]");
  }
  if (begin > end || end > data_size) {
    return bad(absl::StrCat("data_offsets [", begin, ", ", end, "] out of range: the data section is ",
                            data_size, " bytes"));
  }
  uint64_t nbytes;
  if (!ByteSize(e.shape, kernels::DTypeSize(e.dtype), nbytes)) {
    return bad(absl::StrCat("shape ", ShapeString(e.shape), " overflows 64-bit byte counts"));
  }
  if (nbytes != end - begin) {
    return bad(absl::StrCat("shape ", ShapeString(e.shape), " of ", std::string(SafetensorsDTypeName(e.dtype)),
                            " needs ", nbytes, " bytes but data_offsets [", begin, ", ", end,
                            "] hold ", end - begin, " (size mismatch)"));
  }
  e.data = data + begin;
  e.nbytes = static_cast<size_t>(nbytes);
  return e;
}

absl::Status ParseMetadata(const json& v, std::map<std::string, std::string>& out) {
  if (!v.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("'__metadata__' must be an object of strings, got ", v.type_name()));
  }
  for (const auto& [key, value] : v.items()) {
    if (!value.is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("'__metadata__' value for '", key,
                                                     "' must be a string, got ", value.type_name()));
    }
    out[key] = value.get<std::string>();
  }
  return absl::OkStatus();
}

// Ranges may leave gaps (the reference writer does not, but nothing here depends on it); they
// must not overlap, or one tensor's view would alias another's.
absl::Status CheckNoOverlap(const std::vector<TensorEntry>& tensors) {
  std::vector<const TensorEntry*> by_offset;
  for (const TensorEntry& t : tensors) {
    if (t.nbytes > 0) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorEntry* a, const TensorEntry* b) { return a->data < b->data; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorEntry& prev = *by_offset[i - 1];
    if (prev.data + prev.nbytes > by_offset[i]->data) {
      return absl::InvalidArgumentError(absl::StrCat("tensors '", prev.name, "' and '",
                                                     by_offset[i]->name, "' have overlapping data_offsets"));
    }
  }
  return absl::OkStatus();
}

class FileCloser {
 public:
  explicit FileCloser(int fd) : fd_(fd) {}
  ~FileCloser() { ::close(fd_); }
  FileCloser(const FileCloser&) = delete;
  FileCloser& operator=(const FileCloser&) = delete;

 private:
  int fd_;
};

}  // namespace

absl::StatusOr<DType> DTypeFromSafetensors(std::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  if (name == "I32") return DType::kI32;
  if (name == "I64") return DType::kI64;
  if (name == "U8") return DType::kU8;
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype '", std::string(name), "' (supported: F32, F16, BF16, I32, I64, U8)"));
}

std::string_view SafetensorsDTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32: return "F32";
    case DType::kF16: return "F16";
    case DType::kBF16: return "BF16";
    case DType::kI32: return "I32";
    case DType::kI64: return "I64";
    case DType::kU8: return "U8";
  }
  return "?";
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(
    const std::filesystem::path& path) {
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile(path.string()));
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot open ", path.string()));
  FileCloser closer(fd);  // the mapping outlives the descriptor
  struct stat st;
  if (::fstat(fd, &st) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("cannot stat ", path.string()));
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), " is not a regular file"));
  }
  file->size_ = static_cast<size_t>(st.st_size);
  if (file->size_ > 0) {  // mmap of length 0 fails; Parse reports the empty file as truncated
    void* p = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) return absl::ErrnoToStatus(errno, absl::StrCat("cannot mmap ", path.string()));
    file->mapping_ = p;
    file->bytes_ = static_cast<const uint8_t*>(p);
  }
  CLEAVE_RETURN_IF_ERROR(file->Parse());
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBuffer(std::string bytes,
                                                                             std::string source) {
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile(std::move(source)));
  // Moved in before taking the pointer: the object is heap-allocated and never moves again.
  file->owned_ = std::move(bytes);
  file->bytes_ = reinterpret_cast<const uint8_t*>(file->owned_.data());
  file->size_ = file->owned_.size();
  CLEAVE_RETURN_IF_ERROR(file->Parse());
  return file;
}

absl::Status SafetensorsFile::Parse() {
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", why));
  };
  if (size_ < 8) {
    return bad(absl::StrCat("truncated: ", size_, " bytes, too short for the 8-byte header length"));
  }
  const uint64_t header_len = ReadLe64(bytes_);
  if (header_len > kMaxHeaderBytes) {
    return bad(absl::StrCat("header length ", header_len, " exceeds the limit of ", kMaxHeaderBytes,
                            " bytes"));
  }
  if (header_len > size_ - 8) {
    return bad(absl::StrCat("header length ", header_len, " runs past the end of the file (",
                            size_, " bytes; truncated?)"));
  }
  const char* header_begin = reinterpret_cast<const char*>(bytes_ + 8);
  json header;
  try {
    header = json::parse(header_begin, header_begin + header_len);
  } catch (const json::exception& e) {
    return bad(absl::StrCat("header is not valid JSON: ", e.what()));
  }
  if (!header.is_object()) return bad(absl::StrCat("header must be a JSON object, got ", header.type_name()));

  const uint8_t* data = bytes_ + 8 + header_len;
  const uint64_t data_size = size_ - 8 - header_len;
  tensors_.reserve(header.size());
  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      absl::Status s = ParseMetadata(value, metadata_);
      if (!s.ok()) return bad(std::string(s.message()));
      continue;
    }
    absl::StatusOr<TensorEntry> entry = ParseEntry(name, value, data, data_size);
    if (!entry.ok()) return bad(std::string(entry.status().message()));
    tensors_.push_back(*std::move(entry));
  }
  // A JSON object iterates in key order already; sorting keeps Find's binary search independent
  // of that detail.
  std::sort(tensors_.begin(), tensors_.end(),
            [](const TensorEntry& a, const TensorEntry& b) { return a.name < b.name; });
  absl::Status s = CheckNoOverlap(tensors_);
  if (!s.ok()) return bad(std::string(s.message()));
  return absl::OkStatus();
}

const TensorEntry* SafetensorsFile::Find(std::string_view name) const {
  auto it = std::lower_bound(tensors_.begin(), tensors_.end(), name,
                             [](const TensorEntry& t, std::string_view n) { return t.name < n; });
  return it != tensors_.end() && it->name == name ? &*it : nullptr;
}

namespace {

struct Layout {
  std::vector<size_t> order;     // indices into the input, in data order
  std::vector<uint64_t> nbytes;  // per input tensor
  std::string header;            // padded JSON
};

absl::StatusOr<Layout> PlanLayout(const std::vector<TensorToWrite>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  Layout out;
  out.nbytes.resize(tensors.size());
  std::map<std::string_view, size_t> seen;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorToWrite& t = tensors[i];
    if (t.name == kMetadataKey) return absl::InvalidArgumentError("tensor name '__metadata__' is reserved");
    if (!seen.emplace(t.name, i).second) {
      return absl::InvalidArgumentError(absl::StrCat("duplicate tensor name '", t.name, "'"));
    }
    if (!ByteSize(t.shape, kernels::DTypeSize(t.dtype), out.nbytes[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "': invalid shape ", ShapeString(t.shape)));
    }
    if (out.nbytes[i] > 0 && t.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "' has no data"));
    }
  }
  // Widest dtype first, as the reference writer does: with no gaps between tensors, that keeps
  // every tensor aligned to its element size once the data section itself is 8-aligned.
  out.order.resize(tensors.size());
  std::iota(out.order.begin(), out.order.end(), 0);
  std::sort(out.order.begin(), out.order.end(), [&](size_t a, size_t b) {
    const size_t sa = kernels::DTypeSize(tensors[a].dtype), sb = kernels::DTypeSize(tensors[b].dtype);
    return sa != sb ? sa > sb : tensors[a].name < tensors[b].name;
  });

  json header = json::object();
  if (!metadata.empty()) header[std::string(kMetadataKey)] = metadata;
  uint64_t offset = 0;
  for (size_t i : out.order) {
    const TensorToWrite& t = tensors[i];
    header[t.name] = {{"dtype", std::string(SafetensorsDTypeName(t.dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + out.nbytes[i]}}};
    offset += out.nbytes[i];
  }
  try {
    out.header = header.dump();  // strict: names or metadata that are not UTF-8 throw
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("cannot encode safetensors header: ", e.what()));
  }
  // Pad with spaces (valid JSON whitespace) so the data section starts 8-aligned.
  out.header.append((8 - out.header.size() % 8) % 8, ' ');
  return out;
}

}  // namespace

absl::Status WriteSafetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  CLEAVE_ASSIGN_OR_RETURN(Layout layout, PlanLayout(tensors, metadata));
  std::filesystem::path tmp = path;
  tmp += ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return absl::ErrnoToStatus(errno, absl::StrCat("cannot create ", tmp.string()));

  char len[8];
  WriteLe64(layout.header.size(), len);
  errno = 0;
  bool ok = std::fwrite(len, 1, 8, f) == 8 &&
            std::fwrite(layout.header.data(), 1, layout.header.size(), f) == layout.header.size();
  for (size_t i : layout.order) {
    if (!ok) break;
    const size_t n = static_cast<size_t>(layout.nbytes[i]);
    ok = n == 0 || std::fwrite(tensors[i].data, 1, n, f) == n;
  }
  // fclose flushes, so a full disk may only show here.
  ok = (std::fclose(f) == 0) && ok;
  const int write_errno = errno;
  std::error_code ec;
  if (!ok) {
    std::filesystem::remove(tmp, ec);
    return absl::ErrnoToStatus(write_errno != 0 ? write_errno : EIO,
                               absl::StrCat("failed writing ", tmp.string()));
  }
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    const std::string why = ec.message();
    std::filesystem::remove(tmp, ec);
    return absl::UnavailableError(
        absl::StrCat("cannot rename ", tmp.string(), " to ", path.string(), ": ", why));
  }
  return absl::OkStatus();
}

}  // namespace cleave::model
