// SentencePieceAdapter: sentencepiece::SentencePieceProcessor behind a header with no Abseil.
//
// Why a separate translation unit: Debian's sentencepiece_processor.h declares
// `namespace absl { using std::string_view; }`, which collides with Abseil's own
// absl::string_view class, so no file may include both. Only sentencepiece_adapter.cc includes
// the sentencepiece header; everything else (status handling included) talks to this class.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace cleave::model {

// Immutable after Load; all methods are const and thread-safe.
class SentencePieceAdapter {
 public:
  // nullptr with *error set when the file is missing or not a SentencePiece model.
  static std::unique_ptr<SentencePieceAdapter> Load(const std::string& path, std::string* error);
  ~SentencePieceAdapter();

  // false with *error set on failure.
  bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const;
  bool Decode(const std::vector<int>& ids, std::string* text, std::string* error) const;

  int piece_size() const;
  int bos_id() const;  // -1 if none
  int eos_id() const;  // -1 if none
  bool IsControl(int id) const;
  bool IsUnknown(int id) const;
  const std::string& IdToPiece(int id) const;   // id in [0, piece_size())
  int PieceToId(std::string_view piece) const;  // unk id when unknown

 private:
  struct Impl;
  explicit SentencePieceAdapter(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace cleave::model
