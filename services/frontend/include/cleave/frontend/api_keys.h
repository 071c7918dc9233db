// Client API keys of the frontend: when any is configured, every HTTP route but /health and every
// cleave.v1.Generation call must carry `Authorization: Bearer <key>` (HTTP header / gRPC
// metadata `authorization`). Keys come from a file (one per line) and the CLEAVE_API_KEYS
// environment variable (comma-separated). Immutable once loaded; Authorizes is thread-safe.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace cleave::frontend {

class ApiKeys {
 public:
  ApiKeys() = default;  // no keys: every request is allowed
  explicit ApiKeys(std::vector<std::string> keys) : keys_(std::move(keys)) {}

  // Keys from `file` ("" = none; one key per line, surrounding whitespace trimmed, blank lines
  // and lines starting with '#' skipped) plus those of `env_list` (comma-separated). Errors: an
  // unreadable file, a file that holds no key, a key with whitespace inside.
  [[nodiscard]] static absl::StatusOr<ApiKeys> Load(const std::string& file, std::string_view env_list);

  bool enabled() const { return !keys_.empty(); }
  size_t size() const { return keys_.size(); }
  const std::vector<std::string>& keys() const { return keys_; }

  // True when no key is configured, or `authorization` is "Bearer <key>" (scheme
  // case-insensitive) for one of the keys. The comparison takes the same time whichever key (or
  // byte of it) differs.
  bool Authorizes(std::string_view authorization) const;

 private:
  std::vector<std::string> keys_;
};

}  // namespace cleave::frontend
