// The only file that includes sentencepiece_processor.h (see sentencepiece_adapter.h for why).
#include "cleave/model/sentencepiece_adapter.h"

#include <sentencepiece_processor.h>

namespace cleave::model {

struct SentencePieceAdapter::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SentencePieceAdapter::SentencePieceAdapter(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SentencePieceAdapter::~SentencePieceAdapter() = default;

std::unique_ptr<SentencePieceAdapter> SentencePieceAdapter::Load(const std::string& path,
                                                                 std::string* error) {
  auto impl = std::make_unique<Impl>();
  const auto status = impl->sp.Load(path);
  if (!status.ok()) {
    *error = status.ToString();
    return nullptr;
  }
  return std::unique_ptr<SentencePieceAdapter>(new SentencePieceAdapter(std::move(impl)));
}

bool SentencePieceAdapter::Encode(std::string_view text, std::vector<int>* ids,
                                  std::string* error) const {
  const auto status = impl_->sp.Encode(text, ids);
  if (!status.ok()) *error = status.ToString();
  return status.ok();
}

bool SentencePieceAdapter::Decode(const std::vector<int>& ids, std::string* text,
                                  std::string* error) const {
  const auto status = impl_->sp.Decode(ids, text);
  if (!status.ok()) *error = status.ToString();
  return status.ok();
}

int SentencePieceAdapter::piece_size() const { return impl_->sp.GetPieceSize(); }
int SentencePieceAdapter::bos_id() const { return impl_->sp.bos_id(); }
int SentencePieceAdapter::eos_id() const { return impl_->sp.eos_id(); }
bool SentencePieceAdapter::IsControl(int id) const { return impl_->sp.IsControl(id); }
bool SentencePieceAdapter::IsUnknown(int id) const { return impl_->sp.IsUnknown(id); }
const std::string& SentencePieceAdapter::IdToPiece(int id) const { return impl_->sp.IdToPiece(id); }
int SentencePieceAdapter::PieceToId(std::string_view piece) const {
  return impl_->sp.PieceToId(piece);
}

}  // namespace cleave::model
