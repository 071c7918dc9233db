#include "cleave/common/tls.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace cleave::tls {

absl::Status ValidateTlsFiles(const TlsFiles& f, const std::string& where) {
  if (!f.enabled()) return absl::OkStatus();
  std::vector<std::string> missing;
  if (f.ca_file.empty()) missing.push_back("ca_file (--tls-ca)");
  if (f.cert_file.empty()) missing.push_back("cert_file (--tls-cert)");
  if (f.key_file.empty()) missing.push_back("key_file (--tls-key)");
  if (missing.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(where, ": TLS needs the CA, the certificate and the key together; missing ",
                                                 absl::StrJoin(missing, ", ")));
}

absl::StatusOr<std::string> ReadFileBytes(const std::string& path, const std::string& what) {
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    const std::string why = err != 0 ? std::strerror(err) : "cannot open";
    const std::string message = absl::StrCat(what, " ", path, ": ", why);
    return err == EACCES ? absl::PermissionDeniedError(message) : absl::NotFoundError(message);
  }
  std::ostringstream bytes;
  bytes << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat(what, " ", path, ": read error"));
  return bytes.str();
}

absl::StatusOr<std::optional<TlsPem>> LoadTlsPem(const TlsFiles& f) {
  if (absl::Status s = ValidateTlsFiles(f); !s.ok()) return s;
  if (!f.enabled()) return std::optional<TlsPem>();
  TlsPem pem;
  struct Part {
    const std::string& path;
    std::string& out;
    const char* what;
  };
  for (const Part& p : {Part{f.ca_file, pem.ca, "TLS CA file"}, Part{f.cert_file, pem.cert, "TLS certificate file"},
                        Part{f.key_file, pem.key, "TLS key file"}}) {
    absl::StatusOr<std::string> bytes = ReadFileBytes(p.path, p.what);
    if (!bytes.ok()) return bytes.status();
    if (bytes->find("-----BEGIN ") == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(p.what, " ", p.path, " is not PEM (no -----BEGIN line)"));
    }
    p.out = *std::move(bytes);
  }
  return std::optional<TlsPem>(std::move(pem));
}

absl::StatusOr<std::string> LoadSecretFile(const std::string& path) {
  absl::StatusOr<std::string> secret = ReadFileBytes(path, "KV secret file");
  if (!secret.ok()) return secret.status();
  if (secret->size() < kMinSecretBytes) {
    return absl::InvalidArgumentError(absl::StrCat("KV secret file ", path, " holds ", secret->size(),
                                                   " bytes; a cluster secret needs at least ", kMinSecretBytes,
                                                   " (e.g. head -c 32 /dev/urandom > FILE)"));
  }
  return secret;
}

}  // namespace cleave::tls
