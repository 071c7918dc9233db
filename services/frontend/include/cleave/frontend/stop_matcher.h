// Stop strings over streamed text: emits text as early as possible without ever emitting a stop
// string or any part of one. Text that could still become the start of a stop string is held
// back until the next piece decides it.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace cleave::frontend {

// Not thread-safe (one per choice).
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops);  // empty strings are ignored

  struct Result {
    std::string text;      // safe to emit now
    bool stopped = false;  // a stop string matched: text ends right before it; the rest is dropped
  };
  // Appends `piece` (whole UTF-8 characters) to the pending text. After a stop, returns {"", true}.
  Result Push(std::string_view piece);
  // End of generation without a stop: whatever was held back.
  std::string Flush();

  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;  // emitted nothing of this yet: a possible stop-string prefix
  bool stopped_ = false;
};

}  // namespace cleave::frontend
