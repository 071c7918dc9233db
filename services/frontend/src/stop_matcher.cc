#include "cleave/frontend/stop_matcher.h"

#include <algorithm>
#include <utility>

namespace cleave::frontend {

StopMatcher::StopMatcher(std::vector<std::string> stops) {
  for (std::string& s : stops) {
    if (!s.empty()) stops_.push_back(std::move(s));
  }
}

StopMatcher::Result StopMatcher::Push(std::string_view piece) {
  if (stopped_) return {"", true};
  pending_.append(piece);
  if (stops_.empty()) return {std::exchange(pending_, std::string()), false};

  // The earliest complete match wins (it ends the text soonest); a stop string may span the
  // boundary between held-back text and the new piece, which the search over pending_ covers.
  size_t first = std::string::npos;
  for (const std::string& stop : stops_) first = std::min(first, pending_.find(stop));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string text = pending_.substr(0, first);
    pending_.clear();
    return {std::move(text), true};
  }

  // Hold back the longest suffix that is a prefix of some stop string. A UTF-8 stop string
  // never starts with a continuation byte, so the split always falls between characters.
  size_t hold = 0;
  for (const std::string& stop : stops_) {
    size_t max_len = std::min(stop.size() - 1, pending_.size());
    for (size_t len = max_len; len > hold; --len) {
      if (std::string_view(pending_).substr(pending_.size() - len) ==
          std::string_view(stop).substr(0, len)) {
        hold = len;
        break;
      }
    }
  }
  std::string text = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return {std::move(text), false};
}

std::string StopMatcher::Flush() {
  if (stopped_) return "";
  return std::exchange(pending_, std::string());
}

}  // namespace cleave::frontend
