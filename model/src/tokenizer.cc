// LoadTokenizer: picks the tokenizer implementation from the files in a model directory.
#include "cleave/model/tokenizer.h"

#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/model/hf_tokenizer.h"

namespace cleave::model {
namespace {

absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path.string()));
  std::ostringstream buf;
  buf << in.rdbuf();
  if (in.bad()) return absl::DataLossError(absl::StrCat("error reading ", path.string()));
  return buf.str();
}

// The same error, with the file it came from in front.
absl::Status WithPath(const absl::Status& s, const std::filesystem::path& path) {
  return absl::Status(s.code(), absl::StrCat(path.string(), ": ", s.message()));
}

}  // namespace

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadTokenizer(const std::filesystem::path& model_dir) {
  const auto json_path = model_dir / "tokenizer.json";
  const auto sp_path = model_dir / "tokenizer.model";
  std::error_code ec;
  if (std::filesystem::is_regular_file(json_path, ec)) {
    CLEAVE_ASSIGN_OR_RETURN(std::string json_text, ReadFile(json_path));
    HfTokenizerConfig config;
    const auto config_path = model_dir / "tokenizer_config.json";
    if (std::filesystem::is_regular_file(config_path, ec)) {
      CLEAVE_ASSIGN_OR_RETURN(std::string config_text, ReadFile(config_path));
      auto parsed = ParseHfTokenizerConfig(config_text);
      if (!parsed.ok()) return WithPath(parsed.status(), config_path);
      config = *std::move(parsed);
    }
    auto tokenizer = ParseHfTokenizerJson(json_text, config);
    if (!tokenizer.ok()) return WithPath(tokenizer.status(), json_path);
    return tokenizer;
  }
  if (std::filesystem::is_regular_file(sp_path, ec)) return LoadSentencePieceTokenizer(sp_path);
  return absl::NotFoundError(absl::StrCat("no tokenizer: neither ", json_path.string(), " nor ",
                                          sp_path.string(), " exists"));
}

}  // namespace cleave::model
