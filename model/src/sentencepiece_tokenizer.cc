// Tokenizer over a SentencePiece .model file (Llama-2-era checkpoints without tokenizer.json).
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/model/sentencepiece_adapter.h"
#include "cleave/model/tokenizer.h"
#include "cleave/model/unicode_text.h"

namespace cleave::model {
namespace {

class SentencePieceTokenizer : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(std::unique_ptr<SentencePieceAdapter> sp) : sp_(std::move(sp)) {}

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_bos) const override {
    if (!IsValidUtf8(text)) return absl::InvalidArgumentError("text to encode is not valid UTF-8");
    std::vector<int> ids;
    std::string error;
    if (!sp_->Encode(text, &ids, &error)) {
      return absl::InternalError(absl::StrCat("sentencepiece encode: ", error));
    }
    std::vector<int32_t> out;
    out.reserve(ids.size() + 1);
    if (add_bos && sp_->bos_id() >= 0) out.push_back(sp_->bos_id());
    out.insert(out.end(), ids.begin(), ids.end());
    return out;
  }

  // SentencePiece renders control tokens (<s>, </s>) as nothing. Kept, they appear as their
  // piece text between separately decoded runs, the way Hugging Face shows them.
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids,
                                     bool skip_special_tokens) const override {
    std::string out;
    std::vector<int> run;
    auto flush_run = [&]() -> absl::Status {
      if (run.empty()) return absl::OkStatus();
      std::string text, error;
      if (!sp_->Decode(run, &text, &error)) {
        return absl::InternalError(absl::StrCat("sentencepiece decode: ", error));
      }
      out += text;
      run.clear();
      return absl::OkStatus();
    };
    for (int32_t id : ids) {
      if (id < 0 || id >= vocab_size()) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " is out of range [0, ", vocab_size(), ")"));
      }
      if (skip_special_tokens && IsSpecial(id)) continue;
      if (sp_->IsControl(id)) {
        CLEAVE_RETURN_IF_ERROR(flush_run());
        out += sp_->IdToPiece(id);
        continue;
      }
      run.push_back(id);
    }
    CLEAVE_RETURN_IF_ERROR(flush_run());
    return out;
  }

  int vocab_size() const override { return sp_->piece_size(); }
  int32_t bos_id() const override { return sp_->bos_id(); }
  int32_t eos_id() const override { return sp_->eos_id(); }
  bool IsSpecial(int32_t id) const override {
    return id >= 0 && id < vocab_size() && (sp_->IsControl(id) || sp_->IsUnknown(id));
  }
  std::optional<int32_t> TokenId(std::string_view token) const override {
    const int id = sp_->PieceToId(token);
    if (id < 0 || id >= vocab_size() || sp_->IdToPiece(id) != token) return std::nullopt;
    return id;
  }

 private:
  std::unique_ptr<SentencePieceAdapter> sp_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceTokenizer(
    const std::filesystem::path& model_file) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(model_file, ec)) {
    return absl::NotFoundError(
        absl::StrCat("SentencePiece model not found: ", model_file.string()));
  }
  std::string error;
  auto sp = SentencePieceAdapter::Load(model_file.string(), &error);
  if (sp == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot load SentencePiece model ", model_file.string(), ": ", error));
  }
  return std::unique_ptr<Tokenizer>(new SentencePieceTokenizer(std::move(sp)));
}

}  // namespace cleave::model
