// Minimal leveled logging to stderr. absl/log is not in Debian 12's Abseil (20220623), so this
// stays small on purpose: one line per message, a level prefix, thread-safe via a single write.
#pragma once

#include <sstream>
#include <string>

namespace cleave {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Messages below this level are dropped. Set once at startup (not synchronised).
void SetMinLogLevel(LogLevel level);
LogLevel MinLogLevel();
void EmitLog(LogLevel level, const char* file, int line, const std::string& msg);

class LogMessage {
 public:
  LogMessage(LogLevel level, const char* file, int line) : level_(level), file_(file), line_(line) {}
  ~LogMessage() { EmitLog(level_, file_, line_, stream_.str()); }
  std::ostringstream& stream() { return stream_; }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream stream_;
};

}  // namespace cleave

#define CLEAVE_LOG(level)                                                       \
  if (::cleave::LogLevel::k##level < ::cleave::MinLogLevel()) {                 \
  } else                                                                        \
    ::cleave::LogMessage(::cleave::LogLevel::k##level, __FILE__, __LINE__).stream()
