// libFuzzer target: arbitrary bytes as a SentencePiece .model file. SentencePieceAdapter::Load
// must reject what it cannot use with an error (no crash, no out-of-bounds read: the darts-clone
// charsmap in particular is read in place); an accepted model must encode text into ids inside
// its vocabulary, deterministically, and decode any in-range ids.
//
// Input layout: the model bytes, optionally followed by the marker "#TXT" and a text to encode
// (text after the last marker); without one, a fixed mixed-script string is used. The model is
// serialized protobuf, which may itself contain any byte, so a marker rather than a NUL.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "cleave/model/sentencepiece_adapter.h"

namespace {

// Load reads a path; one scratch file per fuzzing process, removed when libFuzzer exits.
const std::string& ScratchPath() {
  static const std::string* path = [] {
    auto* p = new std::string("/tmp/cleave_spm_fuzz_" + std::to_string(::getpid()) + ".model");
    std::atexit([] { std::remove(ScratchPath().c_str()); });
    return p;
  }();
  return *path;
}

void CheckText(const cleave::model::SentencePieceAdapter& sp, std::string_view text) {
  std::vector<int> ids, again;
  std::string error, decoded;
  if (!sp.Encode(text, &ids, &error)) return;  // an error status is fine, a crash is not
  for (int id : ids) {
    if (id < 0 || id >= sp.piece_size()) __builtin_trap();
  }
  if (!sp.Encode(text, &again, &error) || again != ids) __builtin_trap();
  if (!sp.Decode(ids, &decoded, &error)) __builtin_trap();  // ids in range always decode
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const size_t marker = input.rfind("#TXT");
  const std::string_view model = input.substr(0, marker);
  {
    FILE* f = std::fopen(ScratchPath().c_str(), "wb");
    if (f == nullptr) return 0;
    std::fwrite(model.data(), 1, model.size(), f);
    std::fclose(f);
  }
  std::string error;
  auto sp = cleave::model::SentencePieceAdapter::Load(ScratchPath(), &error);
  if (sp == nullptr) {
    if (error.empty()) __builtin_trap();  // a rejection always says why
    return 0;
  }
  const int n = sp->piece_size();
  if (n <= 0 || sp->bos_id() < -1 || sp->bos_id() >= n || sp->eos_id() < -1 ||
      sp->eos_id() >= n) {
    __builtin_trap();
  }
  if (marker != std::string_view::npos) {
    CheckText(*sp, input.substr(marker + 4));  // may be invalid UTF-8: normalized to U+FFFD
  } else {
    CheckText(*sp, "Hello  wörld\t<s> 中文 😀👍🏽 it's 12345 \n▁x   ");
  }
  // Every piece maps back to an id, and ids around the vocabulary's edges decode (or, out of
  // range, fail cleanly).
  for (int id = 0; id < n && id < 1024; ++id) {
    if (sp->PieceToId(sp->IdToPiece(id)) < 0) __builtin_trap();
  }
  std::string text;
  sp->Decode({0, 1, n - 1, n / 2, 0}, &text, &error);
  if (sp->Decode({n}, &text, &error) || sp->Decode({-1}, &text, &error)) __builtin_trap();
  return 0;
}
