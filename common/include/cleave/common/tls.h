// The files of a process's TLS identity for internal gRPC (mutual TLS between the scheduler, the
// workers and the frontend) and the KV transport's cluster secret: checking that a deployment
// names them consistently and reading them at startup. No gRPC here: each service builds its
// own credentials from the PEM text (cleave_common does not link gRPC).
#pragma once

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cleave::tls {

// PEM file paths: the CA that signs every peer, this process's certificate and its private key.
// All three empty = plaintext; any other mix is a configuration error.
struct TlsFiles {
  std::string ca_file;
  std::string cert_file;
  std::string key_file;

  bool enabled() const { return !ca_file.empty() || !cert_file.empty() || !key_file.empty(); }
};

// The contents of TlsFiles.
struct TlsPem {
  std::string ca;
  std::string cert;
  std::string key;
};

// OK when all three paths are set or none is; InvalidArgument naming the missing ones otherwise
// (`where` prefixes the message: "tls", "--tls-*").
[[nodiscard]] absl::Status ValidateTlsFiles(const TlsFiles& files, const std::string& where = "tls");

// Reads the three files: nullopt when TLS is off, an error naming the file that is missing,
// unreadable or not PEM. Call at startup, so that a bad path stops the process at once.
[[nodiscard]] absl::StatusOr<std::optional<TlsPem>> LoadTlsPem(const TlsFiles& files);

// The smallest cluster secret accepted, in bytes.
inline constexpr size_t kMinSecretBytes = 32;
// Reads the KV transport's cluster secret: every byte of the file (no trimming). An error naming
// the file when it cannot be read or holds fewer than kMinSecretBytes bytes.
[[nodiscard]] absl::StatusOr<std::string> LoadSecretFile(const std::string& path);

// Reads a whole file; NotFound / PermissionDenied naming `what` and the path.
[[nodiscard]] absl::StatusOr<std::string> ReadFileBytes(const std::string& path, const std::string& what);

}  // namespace cleave::tls
