// SentencePieceAdapter: reads SentencePiece .model files natively (see sentencepiece_adapter.h
// for why we no longer link libsentencepiece). The file is parsed with protobuf classes generated
// from model/proto/sentencepiece_model.proto, checked the way upstream's ModelInterface checks it,
// and copied into plain structs (sentencepiece_internal.h); encoding and decoding then follow
// upstream's SentencePieceProcessor.
#include "cleave/model/sentencepiece_adapter.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <sstream>

#include "sentencepiece_internal.h"
#include "sentencepiece_model.pb.h"

namespace cleave::model {

using namespace spm_internal;  // NOLINT(build/namespaces): this file is its only user

struct SentencePieceAdapter::Impl {
  Model model;
  int bos_id = -1;
  int eos_id = -1;
};

namespace {

constexpr size_t kMaxPieceSize = 8000;  // upstream's limit

// "<0xXX>" (upper-case hex, as upstream writes and requires) -> the byte, else -1.
int PieceToByte(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  int value = 0;
  for (char c : piece.substr(3, 2)) {
    if (c >= '0' && c <= '9') {
      value = value * 16 + (c - '0');
    } else if (c >= 'A' && c <= 'F') {
      value = value * 16 + (c - 'A' + 10);
    } else {
      return -1;
    }
  }
  return value;
}

bool SetNormalizer(const spm::NormalizerSpec& spec, bool treat_ws_as_suffix, Normalizer* n,
                   std::string* error) {
  n->add_dummy_prefix = spec.add_dummy_prefix();
  n->remove_extra_whitespaces = spec.remove_extra_whitespaces();
  n->escape_whitespaces = spec.escape_whitespaces();
  n->treat_whitespace_as_suffix = treat_ws_as_suffix;
  return n->LoadCharsMap(spec.precompiled_charsmap(), error);
}

// Copies a parsed ModelProto into `m`, rejecting what upstream rejects at load time
// (ModelInterface::InitializePieces, the unigram model's checks, the normalizer's).
bool Build(const spm::ModelProto& proto, Model* m, std::string* error) {
  const auto& trainer = proto.trainer_spec();
  switch (trainer.model_type()) {
    case spm::TrainerSpec::UNIGRAM: m->kind = ModelKind::kUnigram; break;
    case spm::TrainerSpec::BPE: m->kind = ModelKind::kBpe; break;
    case spm::TrainerSpec::WORD: m->kind = ModelKind::kWord; break;
    case spm::TrainerSpec::CHAR: m->kind = ModelKind::kChar; break;
  }
  if (proto.pieces_size() == 0) {
    *error = "the model has no pieces";
    return false;
  }
  m->byte_fallback = trainer.byte_fallback();
  const bool single_map = m->kind == ModelKind::kBpe;
  std::vector<bool> byte_seen(256, false);
  m->min_score = std::numeric_limits<float>::max();
  for (int i = 0; i < proto.pieces_size(); ++i) {
    const auto& p = proto.pieces(i);
    const std::string& piece = p.piece();
    auto type = static_cast<PieceType>(p.type());
    // Upstream turns a stray "\0" piece (some converters add one next to <0x00>) into UNUSED
    // and leaves it out of every lookup.
    const bool null_piece = piece == std::string_view("\0", 1) && m->byte_fallback;
    if (null_piece) type = PieceType::kUnused;
    m->pieces.push_back(piece);
    m->scores.push_back(p.score());
    m->types.push_back(type);
    if (piece.size() >= kMaxPieceSize) {
      *error = "piece " + std::to_string(i) + " is too long";
      return false;
    }
    if (piece.empty()) {
      *error = "piece " + std::to_string(i) + " is empty";
      return false;
    }
    if (m->kind == ModelKind::kUnigram && !std::isfinite(p.score())) {
      *error = "piece " + std::to_string(i) + " has a NaN or infinite score";
      return false;
    }
    if (null_piece) continue;
    if (piece.find('\0') != std::string::npos) {
      *error = "piece " + std::to_string(i) + " contains a NUL byte";
      return false;
    }
    const bool normal = type == PieceType::kNormal || type == PieceType::kUserDefined ||
                        type == PieceType::kUnused;
    if (!(normal || single_map ? m->normal_ids : m->reserved_ids).emplace(piece, i).second) {
      *error = "piece \"" + piece + "\" is defined twice";
      return false;
    }
    if (type == PieceType::kUnknown) {
      if (m->unk_id >= 0) {
        *error = "more than one UNKNOWN piece";
        return false;
      }
      m->unk_id = i;
    }
    if (type == PieceType::kByte) {
      const int byte = PieceToByte(piece);
      if (!m->byte_fallback || byte < 0) {
        *error = "byte piece \"" + piece + "\" is invalid or byte_fallback is off";
        return false;
      }
      byte_seen[byte] = true;
      m->byte_ids[byte] = i;
    }
    if (normal && m->kind == ModelKind::kUnigram) m->normal_trie.Insert(piece, i);
    if (type == PieceType::kUserDefined) m->user_defined_trie.Insert(piece, i);
    if (type == PieceType::kNormal) m->min_score = std::min(m->min_score, p.score());
  }
  if (m->unk_id < 0 && !m->byte_fallback) {
    *error = "the model has no UNKNOWN (<unk>) piece";
    return false;
  }
  if (m->byte_fallback && std::find(byte_seen.begin(), byte_seen.end(), false) != byte_seen.end()) {
    *error = "byte_fallback is on but the model lacks some of the 256 <0xXX> pieces";
    return false;
  }
  if (m->kind == ModelKind::kUnigram && m->normal_trie.empty()) {
    *error = "a unigram model needs at least one normal piece";
    return false;
  }
  m->unk_surface = trainer.has_unk_surface() ? trainer.unk_surface() : " \xE2\x81\x87 ";
  const auto& ns = proto.normalizer_spec();
  if (!SetNormalizer(ns, trainer.treat_whitespace_as_suffix(), &m->normalizer, error)) {
    return false;
  }
  if (proto.has_denormalizer_spec() && !proto.denormalizer_spec().precompiled_charsmap().empty()) {
    m->has_denormalizer = true;
    if (!SetNormalizer(proto.denormalizer_spec(), false, &m->denormalizer, error)) return false;
  }
  return true;
}

// Upstream's processor-level ids: the piece named in trainer_spec (or the default name), when
// it has the expected type; else -1.
int NamedId(const Model& m, const std::string& name, const char* fallback, PieceType type) {
  const int id = m.PieceToId(name.empty() ? fallback : name);
  return m.Is(id, type) ? id : -1;
}

}  // namespace

SentencePieceAdapter::SentencePieceAdapter(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SentencePieceAdapter::~SentencePieceAdapter() = default;

std::unique_ptr<SentencePieceAdapter> SentencePieceAdapter::Load(const std::string& path,
                                                                 std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = "cannot open " + path;
    return nullptr;
  }
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) {
    *error = "error reading " + path;
    return nullptr;
  }
  const std::string bytes = buf.str();
  if (bytes.empty()) {
    *error = "invalid argument: the file is empty, not a SentencePiece model";
    return nullptr;
  }
  spm::ModelProto proto;
  if (!proto.ParseFromString(bytes)) {
    *error = "invalid argument: not a SentencePiece model (the protobuf does not parse; "
             "truncated or corrupt file?)";
    return nullptr;
  }
  auto impl = std::make_unique<Impl>();
  if (!Build(proto, &impl->model, error)) {
    *error = "invalid argument: " + *error;
    return nullptr;
  }
  const auto& trainer = proto.trainer_spec();
  Model& m = impl->model;
  m.unk_piece_id = NamedId(m, trainer.unk_piece(), "<unk>", PieceType::kUnknown);
  impl->bos_id = NamedId(m, trainer.bos_piece(), "<s>", PieceType::kControl);
  impl->eos_id = NamedId(m, trainer.eos_piece(), "</s>", PieceType::kControl);
  return std::unique_ptr<SentencePieceAdapter>(new SentencePieceAdapter(std::move(impl)));
}

bool SentencePieceAdapter::Encode(std::string_view text, std::vector<int>* ids,
                                  std::string* error) const {
  const Model& m = impl_->model;
  ids->clear();
  const std::string normalized = Normalize(m.normalizer, &m, text);
  if (normalized.empty()) return true;
  Segments segments;
  switch (m.kind) {
    case ModelKind::kUnigram: segments = EncodeUnigram(m, normalized); break;
    case ModelKind::kBpe: segments = EncodeBpe(m, normalized); break;
    case ModelKind::kWord: segments = EncodeWord(m, normalized); break;
    case ModelKind::kChar: segments = EncodeChar(m, normalized); break;
  }
  // Upstream's EncodeOptimized: unknown pieces become their UTF-8 bytes' <0xXX> pieces with
  // byte_fallback; without it a run of unknown pieces is one <unk>.
  bool prev_unknown = false;
  for (const auto& [piece, id] : segments) {
    if (piece.empty()) {
      *error = "empty piece in the segmentation";
      return false;
    }
    if (m.Is(id, PieceType::kControl)) {
      ids->push_back(id);
      prev_unknown = false;
      continue;
    }
    const bool unknown = m.IsUnknown(id);
    if (unknown && m.byte_fallback) {
      for (char c : piece) ids->push_back(m.byte_ids[static_cast<unsigned char>(c)]);
    } else if (!(unknown && prev_unknown)) {
      if (id < 0 || id >= static_cast<int>(m.pieces.size())) {
        *error = "the segmentation produced no id for \"" + std::string(piece) + "\"";
        return false;
      }
      ids->push_back(id);
    }
    prev_unknown = unknown;
  }
  return true;
}

bool SentencePieceAdapter::Decode(const std::vector<int>& ids, std::string* text,
                                  std::string* error) const {
  // Upstream's DecodeOptimized for ids.
  const Model& m = impl_->model;
  text->clear();
  const auto& n = m.normalizer;
  // The dummy prefix's "▁" is dropped from the first piece that renders text; with
  // remove_extra_whitespaces, every leading "▁" until some text appears.
  const bool strip_leading = n.add_dummy_prefix || n.remove_extra_whitespaces;
  bool is_bos_ws = true;
  std::string bytes;  // a run of byte pieces, rendered together
  const auto flush_bytes = [&] {
    for (size_t offset = 0; offset < bytes.size();) {
      size_t len = 0;
      if (DecodeOneUtf8(std::string_view(bytes).substr(offset), &len)) {
        text->append(bytes, offset, len);
      } else {
        text->append(kReplacementUtf8);  // one U+FFFD per byte that starts no valid character
      }
      offset += len;
    }
    bytes.clear();
  };
  for (int id : ids) {
    if (id < 0 || id >= piece_size()) {
      *error = "invalid id " + std::to_string(id);
      return false;
    }
    std::string_view piece = m.pieces[id];
    if (m.Is(id, PieceType::kByte)) {
      bytes.push_back(static_cast<char>(PieceToByte(piece)));
      continue;
    }
    flush_bytes();
    if (!text->empty()) is_bos_ws = false;
    if (m.Is(id, PieceType::kControl)) continue;  // <s>, </s>: invisible
    bool has_bos_ws = false;
    if (is_bos_ws && strip_leading && piece.starts_with(kSpaceSymbol)) {
      piece.remove_prefix(kSpaceSymbol.size());
      has_bos_ws = !n.remove_extra_whitespaces;
    }
    if (m.IsUnknown(id)) {
      text->append(m.unk_surface);
    } else {
      for (size_t pos = 0; pos < piece.size();) {
        if (piece.substr(pos).starts_with(kSpaceSymbol)) {
          text->push_back(' ');
          pos += kSpaceSymbol.size();
        } else {
          text->push_back(piece[pos++]);
        }
      }
    }
    if (has_bos_ws || !text->empty()) is_bos_ws = false;
  }
  flush_bytes();
  if (m.has_denormalizer) *text = Normalize(m.denormalizer, nullptr, *text);
  return true;
}

int SentencePieceAdapter::piece_size() const {
  return static_cast<int>(impl_->model.pieces.size());
}
int SentencePieceAdapter::bos_id() const { return impl_->bos_id; }
int SentencePieceAdapter::eos_id() const { return impl_->eos_id; }
bool SentencePieceAdapter::IsControl(int id) const {
  return impl_->model.Is(id, PieceType::kControl);
}
bool SentencePieceAdapter::IsUnknown(int id) const {
  return id >= 0 && impl_->model.IsUnknown(id);
}
const std::string& SentencePieceAdapter::IdToPiece(int id) const {
  static const std::string* const kEmpty = new std::string;
  if (id < 0 || id >= piece_size()) return *kEmpty;
  return impl_->model.pieces[id];
}
int SentencePieceAdapter::PieceToId(std::string_view piece) const {
  return impl_->model.PieceToId(piece);
}

}  // namespace cleave::model
