// SentencePieceAdapter: a SentencePiece .model file (tokenizer of Llama-2-era checkpoints), read
// and run natively with the reference library's behaviour (ids and decoded text identical).
//
// Why not libsentencepiece: Debian's libsentencepiece.so.0 bundles and exports its own
// protobuf-lite 3.14, which the dynamic linker interposes with the system libprotobuf gRPC uses
// (the serving binary crashed at load time). The implementation (model/src/sentencepiece_*.cc)
// parses the file with protobuf classes generated from model/proto/sentencepiece_model.proto;
// this header keeps those classes, and everything else, out of the rest of the tree.
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
