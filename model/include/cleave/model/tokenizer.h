// Tokenizer: text <-> token ids for Llama-family models, plus streaming detokenization.
//
// Two implementations sit behind the interface: a Hugging Face tokenizer.json reader (byte-level
// BPE as in GPT-2 / Llama-3 / Qwen2, and SentencePiece-style BPE with byte fallback as in
// Llama-2 / Mistral) and a SentencePiece .model wrapper. Both are immutable after loading.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace cleave::model {

// All methods are const and thread-safe: one instance serves every request concurrently.
class Tokenizer {
 public:
  virtual ~Tokenizer();

  // text must be valid UTF-8 (InvalidArgument otherwise). Added/special tokens written in the
  // text (e.g. "<|im_end|>") map to their ids, as Hugging Face does; a SentencePiece .model has
  // no such notion and tokenizes them as plain text. add_bos prepends bos_id() when there is one.
  [[nodiscard]] virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                                    bool add_bos) const = 0;
  // Always valid UTF-8 (broken byte sequences become U+FFFD, as the reference libraries do).
  // Ids outside [0, vocab_size()) or unassigned -> InvalidArgument.
  [[nodiscard]] virtual absl::StatusOr<std::string> Decode(std::span<const int32_t> ids,
                                                           bool skip_special_tokens) const = 0;

  virtual int vocab_size() const = 0;  // one past the largest id
  virtual int32_t bos_id() const = 0;  // -1 if none
  virtual int32_t eos_id() const = 0;  // -1 if none
  // Special tokens (BOS/EOS, chat markers, SentencePiece control tokens and <unk>) are the ones
  // Decode drops when skip_special_tokens is set.
  virtual bool IsSpecial(int32_t id) const = 0;
  // Id of a token by its content, e.g. "<|im_end|>" or "</s>"; nullopt when unknown.
  virtual std::optional<int32_t> TokenId(std::string_view token) const = 0;
};

// <dir>/tokenizer.json when present (HF fast tokenizer; <dir>/tokenizer_config.json, when
// present, supplies bos_token / eos_token / add_bos_token), else <dir>/tokenizer.model
// (SentencePiece). NotFound naming both paths otherwise; InvalidArgument for malformed files
// or unsupported tokenizer types.
[[nodiscard]] absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(
    const std::filesystem::path& model_dir);
[[nodiscard]] absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceTokenizer(
    const std::filesystem::path& model_file);
// Parses tokenizer.json text. Without tokenizer_config.json, BOS comes from the
// TemplateProcessing post-processor and EOS from well-known token names ("</s>",
// "<|end_of_text|>", "<|endoftext|>", ...). Never crashes on malformed input (it is fuzzed).
[[nodiscard]] absl::StatusOr<std::unique_ptr<Tokenizer>> ParseHfTokenizerJson(
    const std::string& json_text);

// Streaming detokenization for one sequence: turns ids arriving one at a time into text without
// ever splitting a UTF-8 character, and with SentencePiece leading-space handling right (a
// token's "▁" becomes a space only when something precedes it). Uses vLLM/TGI's
// prefix_offset/read_offset scheme: decode a short window ending at the new token and emit only
// the suffix beyond the previously emitted window, once it does not end in U+FFFD (an
// incomplete character).
//
// Not thread-safe (one per sequence). Holds a reference to the tokenizer, which must outlive it.
// Concatenating everything Push() and Flush() return gives the text Decode(prompt + generated)
// adds after Decode(prompt).
class IncrementalDetokenizer {
 public:
  IncrementalDetokenizer(const Tokenizer& tokenizer, std::span<const int32_t> prompt_ids,
                         bool skip_special_tokens);

  // Text newly completed by this token; often "" (partial character, skipped special token).
  // An invalid id is InvalidArgument and leaves the state unchanged.
  [[nodiscard]] absl::StatusOr<std::string> Push(int32_t id);
  // Whatever is still held back at the end of generation (an incomplete character decodes to
  // U+FFFD here, exactly as a full Decode would).
  std::string Flush();
  // Everything emitted so far.
  const std::string& text() const { return text_; }

 private:
  // Text ids_[begin, end) decode to.
  std::string DecodeWindow(size_t begin, size_t end) const;

  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::vector<int32_t> ids_;  // prompt tail + generated ids
  size_t prefix_offset_ = 0;  // start of the decode window
  size_t read_offset_ = 0;    // ids before this have been emitted
  std::string text_;
};

}  // namespace cleave::model
