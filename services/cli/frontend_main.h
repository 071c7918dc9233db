// `cleave frontend`: the frontend process (HTTP + gRPC APIs over a SchedulerClient).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "cleave/common/shutdown.h"
#include "cleave/common/tls.h"
#include "config.h"

namespace cleave::cli {

struct FrontendRunOptions {
  FrontendConfig frontend;
  std::string model_dir;
  std::string scheduler;
  // Mutual TLS to the scheduler; the same certificate serves the public gRPC API (clients need no
  // certificate there). All empty = plaintext.
  tls::TlsFiles tls;
};

absl::Status RunFrontend(const FrontendRunOptions& options, ShutdownLatch& shutdown);

}  // namespace cleave::cli
