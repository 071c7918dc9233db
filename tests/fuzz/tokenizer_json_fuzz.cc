// libFuzzer target: arbitrary bytes as tokenizer.json text. ParseHfTokenizerJson must return a
// status (no exception, no crash, no runaway allocation); an accepted tokenizer must encode and
// decode without crashing, produce ids inside its vocabulary, and decode to valid UTF-8, also
// when streamed through IncrementalDetokenizer.
//
// Input layout: the JSON, optionally followed by a NUL byte and a text to encode (so the fuzzer
// can steer the text too); without one, a fixed mixed-script string is used.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "cleave/model/tokenizer.h"
#include "cleave/model/unicode_text.h"

namespace {

void CheckText(const cleave::model::Tokenizer& tok, std::string_view text) {
  for (bool add_bos : {false, true}) {
    auto ids = tok.Encode(text, add_bos);
    if (!ids.ok()) continue;  // e.g. a regex hitting its match limit: a status is fine
    for (int32_t id : *ids) {
      if (id < 0 || id >= tok.vocab_size()) __builtin_trap();
    }
    for (bool skip : {false, true}) {
      auto decoded = tok.Decode(*ids, skip);
      if (decoded.ok() && !cleave::model::IsValidUtf8(*decoded)) __builtin_trap();
      cleave::model::IncrementalDetokenizer detok(tok, {}, skip);
      for (int32_t id : *ids) {
        auto chunk = detok.Push(id);
        if (chunk.ok() && !cleave::model::IsValidUtf8(*chunk)) __builtin_trap();
      }
      if (!cleave::model::IsValidUtf8(detok.Flush())) __builtin_trap();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string json(input.substr(0, nul));
  auto tok = cleave::model::ParseHfTokenizerJson(json);
  if (!tok.ok()) return 0;
  const cleave::model::Tokenizer& t = **tok;
  if (t.vocab_size() <= 0 || t.bos_id() < -1 || t.bos_id() >= t.vocab_size() || t.eos_id() < -1 ||
      t.eos_id() >= t.vocab_size()) {
    __builtin_trap();
  }
  if (nul != std::string_view::npos) {
    CheckText(t, input.substr(nul + 1));  // invalid UTF-8 must come back as a status
  } else {
    CheckText(t, "Hello  wörld\t<s> 中文 😀👍🏽 it's 12345 \n▁x <|end_of_text|>");
  }
  // Ids around the vocabulary's edges, including unassigned holes and out-of-range values.
  const int32_t probe[] = {0, 1, t.vocab_size() - 1, t.vocab_size(), -1, t.vocab_size() / 2};
  auto decoded = t.Decode(probe, false);
  if (decoded.ok() && !cleave::model::IsValidUtf8(*decoded)) __builtin_trap();
  return 0;
}
