// Subcommands of the cleave CLI. Each Register* adds its subcommand and options to the app and
// sets the callback that runs it; the callback records the process exit code.
#pragma once

#include "CLI/CLI.hpp"
#include "absl/status/status.h"

namespace cleave::cli {

void RegisterGenerate(CLI::App& app);
void RegisterConvert(CLI::App& app);
void RegisterScheduler(CLI::App& app);
void RegisterWorker(CLI::App& app);
void RegisterFrontend(CLI::App& app);
void RegisterServe(CLI::App& app);

// Exit code of the subcommand that ran (0 on success).
int ExitCode();
// Prints "error: <message>" to stderr and records exit code 1 (2 for bad arguments).
void Fail(const absl::Status& status);

}  // namespace cleave::cli
