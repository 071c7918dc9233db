// IncrementalDetokenizer: see tokenizer.h for the window scheme.
#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/model/tokenizer.h"
#include "cleave/model/unicode_text.h"

namespace cleave::model {
namespace {

// How many prompt tokens the first window reaches back (vLLM's
// INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET): enough context for the first generated token's
// leading space and for a character whose bytes started in the prompt.
constexpr size_t kInitialWindow = 5;
// How far back the window may be widened when the last prompt tokens decode to nothing.
constexpr size_t kMaxPromptTail = 32;
// Window length beyond which text is emitted even if it ends in U+FFFD. Real output never gets
// near it (a character is at most 4 byte tokens); it bounds the cost of degenerate streams.
constexpr size_t kMaxWindow = 64;

// Normally new_text extends prefix_text and this is prefix_text.size(). Decoders that are not
// prefix-stable (ByteFallback turns a whole invalid byte run into U+FFFDs, so a byte emitted
// as "A" can later decode as "\uFFFD") break that; emitting from the common prefix, snapped to
// a character boundary, then keeps the stream valid UTF-8.
size_t CommonPrefixAtCharBoundary(const std::string& prefix_text, const std::string& new_text) {
  if (new_text.starts_with(prefix_text)) return prefix_text.size();
  size_t n = 0;
  while (n < prefix_text.size() && n < new_text.size() && prefix_text[n] == new_text[n]) ++n;
  while (n > 0 && n < new_text.size() && (static_cast<uint8_t>(new_text[n]) & 0xC0) == 0x80) --n;
  return n;
}

}  // namespace

IncrementalDetokenizer::IncrementalDetokenizer(const Tokenizer& tokenizer,
                                               std::span<const int32_t> prompt_ids,
                                               bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {
  // Only the tail of the prompt is ever decoded again.
  const size_t keep = std::min(prompt_ids.size(), kMaxPromptTail);
  ids_.assign(prompt_ids.end() - keep, prompt_ids.end());
  read_offset_ = ids_.size();
  prefix_offset_ = read_offset_ - std::min(read_offset_, kInitialWindow);
  // Same rule as in Push: the window must decode to something (see there).
  while (prefix_offset_ > 0 && DecodeWindow(prefix_offset_, read_offset_).empty()) --prefix_offset_;
}

std::string IncrementalDetokenizer::DecodeWindow(size_t begin, size_t end) const {
  auto text = tokenizer_.Decode(std::span<const int32_t>(ids_).subspan(begin, end - begin),
                                skip_special_tokens_);
  // Every id was validated by Push; a prompt id the tokenizer rejects decodes as nothing.
  return text.ok() ? *std::move(text) : std::string();
}

absl::StatusOr<std::string> IncrementalDetokenizer::Push(int32_t id) {
  if (id < 0 || id >= tokenizer_.vocab_size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("token id ", id, " is out of range [0, ", tokenizer_.vocab_size(), ")"));
  }
  {  // Also catches holes in the vocabulary before the id joins the window.
    const int32_t one[] = {id};
    auto check = tokenizer_.Decode(one, skip_special_tokens_);
    if (!check.ok()) return check.status();
  }
  ids_.push_back(id);
  const std::string prefix_text = DecodeWindow(prefix_offset_, read_offset_);
  const std::string new_text = DecodeWindow(prefix_offset_, ids_.size());
  // Hold back while the window ends in a partial character, or adds nothing (e.g. a skipped
  // special token, or a lone "▁" the decoder strips at the start of the window) -- unless the
  // window has grown past kMaxWindow, where a stream of such tokens would make every Push
  // decode an ever longer window.
  const bool window_full = ids_.size() - prefix_offset_ > kMaxWindow;
  if (!window_full &&
      (new_text.size() <= prefix_text.size() || EndsWithReplacementChar(new_text))) {
    return std::string();
  }
  std::string delta = new_text.substr(CommonPrefixAtCharBoundary(prefix_text, new_text));
  // The next window starts at read_offset_, unless that stretch decodes to nothing:
  // SentencePiece strips *all* leading whitespace pieces of a decode, so a window made only of
  // "▁" pieces would also eat the space of the token after it.
  if (window_full || !DecodeWindow(read_offset_, ids_.size()).empty()) {
    prefix_offset_ = read_offset_;
  }
  read_offset_ = ids_.size();
  // The window before prefix_offset_ is never decoded again; drop it so ids_ stays short.
  if (prefix_offset_ > 0) {
    ids_.erase(ids_.begin(), ids_.begin() + prefix_offset_);
    read_offset_ -= prefix_offset_;
    prefix_offset_ = 0;
  }
  text_ += delta;
  return delta;
}

std::string IncrementalDetokenizer::Flush() {
  if (read_offset_ >= ids_.size()) return std::string();
  const std::string prefix_text = DecodeWindow(prefix_offset_, read_offset_);
  const std::string new_text = DecodeWindow(prefix_offset_, ids_.size());
  std::string delta = new_text.substr(CommonPrefixAtCharBoundary(prefix_text, new_text));
  prefix_offset_ = read_offset_ = ids_.size();
  text_ += delta;
  return delta;
}

}  // namespace cleave::model
