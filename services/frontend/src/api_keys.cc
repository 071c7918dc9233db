#include "cleave/frontend/api_keys.h"

#include <algorithm>
#include <cctype>

#include "absl/strings/str_cat.h"
#include "cleave/common/tls.h"

namespace cleave::frontend {
namespace {

bool IsSpace(char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; }

std::string_view Trim(std::string_view s) {
  while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
  return s;
}

// `text` split at every `sep` (empty pieces kept).
std::vector<std::string_view> Split(std::string_view text, char sep) {
  std::vector<std::string_view> out;
  for (size_t start = 0;;) {
    const size_t end = text.find(sep, start);
    out.push_back(text.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start));
    if (end == std::string_view::npos) return out;
    start = end + 1;
  }
}

// Equal bytes, in time that depends only on the longer length (never on where they differ).
bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned>(x ^ y);
  }
  return diff == 0;
}

absl::Status AddKey(std::vector<std::string>& keys, std::string_view raw, const std::string& where) {
  const std::string_view key = Trim(raw);
  if (key.empty() || key.front() == '#') return absl::OkStatus();
  for (char c : key) {
    if (IsSpace(c) || std::iscntrl(static_cast<unsigned char>(c)) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": an API key must not contain whitespace"));
    }
  }
  keys.emplace_back(key);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ApiKeys> ApiKeys::Load(const std::string& file, std::string_view env_list) {
  std::vector<std::string> keys;
  if (!file.empty()) {
    absl::StatusOr<std::string> text = tls::ReadFileBytes(file, "API keys file");
    if (!text.ok()) return text.status();
    for (std::string_view line : Split(*text, '\n')) {
      if (absl::Status s = AddKey(keys, line, absl::StrCat("API keys file ", file)); !s.ok()) return s;
    }
    if (keys.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("API keys file ", file, " holds no key"));
    }
  }
  for (std::string_view item : Split(env_list, ',')) {
    if (absl::Status s = AddKey(keys, item, "CLEAVE_API_KEYS"); !s.ok()) return s;
  }
  return ApiKeys(std::move(keys));
}

bool ApiKeys::Authorizes(std::string_view authorization) const {
  if (keys_.empty()) return true;
  constexpr std::string_view kScheme = "bearer ";
  if (authorization.size() <= kScheme.size()) return false;
  for (size_t i = 0; i < kScheme.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(authorization[i])) != kScheme[i]) return false;
  }
  const std::string_view presented = Trim(authorization.substr(kScheme.size()));
  bool match = false;
  for (const std::string& key : keys_) match |= ConstantTimeEquals(presented, key);  // no early exit
  return match;
}

}  // namespace cleave::frontend
