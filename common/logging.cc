#include "cleave/common/logging.h"

#include <unistd.h>

#include <atomic>
#include <cstring>

namespace cleave {
namespace {
std::atomic<int> g_min_level{static_cast<int>(LogLevel::kInfo)};
constexpr const char* kNames[] = {"D", "I", "W", "E"};
}  // namespace

void SetMinLogLevel(LogLevel level) { g_min_level.store(static_cast<int>(level)); }
LogLevel MinLogLevel() { return static_cast<LogLevel>(g_min_level.load()); }

void EmitLog(LogLevel level, const char* file, int line, const std::string& msg) {
  const char* base = std::strrchr(file, '/');
  std::string out = std::string(kNames[static_cast<int>(level)]) + " " + (base ? base + 1 : file) +
                    ":" + std::to_string(line) + "] " + msg + "\n";
  // One write() per line so concurrent messages never interleave mid-line.
  ssize_t ignored = ::write(STDERR_FILENO, out.data(), out.size());
  (void)ignored;
}

}  // namespace cleave
