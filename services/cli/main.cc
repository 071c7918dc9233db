// The `cleave` binary: one executable, one subcommand per role or tool.
#include <cstdio>
#include <string>

#include "CLI/CLI.hpp"
#include "commands.h"

int main(int argc, char** argv) {
  CLI::App app{"cleave: disaggregated LLM serving"};
  app.require_subcommand(1);
  cleave::cli::RegisterGenerate(app);
  cleave::cli::RegisterConvert(app);
  cleave::cli::RegisterServe(app);
  cleave::cli::RegisterScheduler(app);
  cleave::cli::RegisterWorker(app);
  cleave::cli::RegisterFrontend(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return cleave::cli::ExitCode();
}
