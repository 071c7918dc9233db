// `cleave frontend`: the frontend process (HTTP + gRPC APIs over a SchedulerClient).
#pragma once

#include <string>

#include "absl/status/status.h"
#include "cleave/common/shutdown.h"
#include "config.h"

namespace cleave::cli {

struct FrontendRunOptions {
  FrontendConfig frontend;
  std::string model_dir;
  std::string scheduler;
};

absl::Status RunFrontend(const FrontendRunOptions& options, ShutdownLatch& shutdown);

}  // namespace cleave::cli
