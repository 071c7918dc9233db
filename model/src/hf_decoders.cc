// Decoders of hf_components.h: token strings back to text, as `tokenizers` decode_chain does.
#include <optional>

#include "cleave/common/status.h"
#include "cleave/model/hf_components.h"
#include "cleave/model/unicode_text.h"

namespace cleave::model {
namespace {

class SequenceDecoder : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts)
      : parts_(std::move(parts)) {}
  absl::Status Decode(std::vector<std::string>* tokens) const override {
    for (const auto& p : parts_) CLEAVE_RETURN_IF_ERROR(p->Decode(tokens));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

// Maps byte-level characters back to bytes. A token with any character outside the alphabet
// (typically an added token) contributes its raw UTF-8 instead, as `tokenizers` does.
class ByteLevelDecoder : public Decoder {
 public:
  absl::Status Decode(std::vector<std::string>* tokens) const override {
    std::string bytes;
    for (const std::string& t : *tokens) {
      const size_t mark = bytes.size();
      bool all_mapped = true;
      size_t pos = 0;
      while (pos < t.size()) {
        char32_t cp;
        const int len = DecodeUtf8(t, pos, &cp);
        const int b = len > 0 ? ByteLevelByte(cp) : -1;
        if (b < 0) {
          all_mapped = false;
          break;
        }
        bytes.push_back(static_cast<char>(b));
        pos += len;
      }
      if (!all_mapped) {
        bytes.resize(mark);
        bytes += t;
      }
    }
    tokens->assign(1, Utf8Lossy(bytes));
    return absl::OkStatus();
  }
};

class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(TextPattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status Decode(std::vector<std::string>* tokens) const override {
    for (std::string& t : *tokens) {
      CLEAVE_ASSIGN_OR_RETURN(t, pattern_.ReplaceAll(t, content_));
    }
    return absl::OkStatus();
  }

 private:
  TextPattern pattern_;
  std::string content_;
};

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// The byte a "<0xNN>" token stands for. Parses like Rust's u8::from_str_radix(.., 16), which
// also takes "+N" (one digit after a plus sign).
std::optional<uint8_t> FallbackByte(const std::string& t) {
  if (t.size() != 6 || !t.starts_with("<0x") || t.back() != '>') return std::nullopt;
  const int hi = HexDigit(t[3]), lo = HexDigit(t[4]);
  if (t[3] == '+' && lo >= 0) return static_cast<uint8_t>(lo);
  if (hi < 0 || lo < 0) return std::nullopt;
  return static_cast<uint8_t>(hi * 16 + lo);
}

// Runs of <0xNN> tokens become their bytes when those form valid UTF-8, else one U+FFFD per
// byte (all or nothing per run, unlike a lossy decode).
class ByteFallbackDecoder : public Decoder {
 public:
  absl::Status Decode(std::vector<std::string>* tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens->size());
    std::string run;
    auto flush = [&] {
      if (run.empty()) return;
      if (IsValidUtf8(run)) {
        out.push_back(run);
      } else {
        for (size_t i = 0; i < run.size(); ++i) out.emplace_back("\xEF\xBF\xBD");
      }
      run.clear();
    };
    for (std::string& t : *tokens) {
      if (auto b = FallbackByte(t)) {
        run.push_back(static_cast<char>(*b));
        continue;
      }
      flush();
      out.push_back(std::move(t));
    }
    flush();
    *tokens = std::move(out);
    return absl::OkStatus();
  }
};

class FuseDecoder : public Decoder {
 public:
  absl::Status Decode(std::vector<std::string>* tokens) const override {
    std::string all;
    for (const std::string& t : *tokens) all += t;
    tokens->assign(1, std::move(all));
    return absl::OkStatus();
  }
};

class StripDecoder : public Decoder {
 public:
  StripDecoder(std::string content, int start, int stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  absl::Status Decode(std::vector<std::string>* tokens) const override {
    if (content_.empty()) return absl::OkStatus();
    for (std::string& t : *tokens) {
      size_t begin = 0, end = t.size();
      for (int i = 0; i < start_ && std::string_view(t).substr(begin).starts_with(content_); ++i) {
        begin += content_.size();
      }
      for (int i = 0; i < stop_ && end >= begin + content_.size() &&
                      std::string_view(t).substr(0, end).ends_with(content_);
           ++i) {
        end -= content_.size();
      }
      t = t.substr(begin, end - begin);
    }
    return absl::OkStatus();
  }

 private:
  std::string content_;  // one character (UTF-8)
  int start_, stop_;
};

// "▁" back to " ", except that the first token loses its "▁"s entirely when a prefix was
// prepended (that is what `tokenizers` does, all of them, not just the first).
class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, PrependScheme scheme)
      : replacement_(std::move(replacement)), scheme_(scheme) {}
  absl::Status Decode(std::vector<std::string>* tokens) const override {
    const TextPattern pattern = TextPattern::Literal(replacement_);
    for (size_t i = 0; i < tokens->size(); ++i) {
      const bool drop = i == 0 && scheme_ != PrependScheme::kNever;
      CLEAVE_ASSIGN_OR_RETURN((*tokens)[i], pattern.ReplaceAll((*tokens)[i], drop ? "" : " "));
    }
    return absl::OkStatus();
  }

 private:
  std::string replacement_;
  PrependScheme scheme_;
};

}  // namespace

std::unique_ptr<Decoder> MakeSequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts) {
  return std::make_unique<SequenceDecoder>(std::move(parts));
}
std::unique_ptr<Decoder> MakeByteLevelDecoder() { return std::make_unique<ByteLevelDecoder>(); }
std::unique_ptr<Decoder> MakeReplaceDecoder(TextPattern pattern, std::string content) {
  return std::make_unique<ReplaceDecoder>(std::move(pattern), std::move(content));
}
std::unique_ptr<Decoder> MakeByteFallbackDecoder() {
  return std::make_unique<ByteFallbackDecoder>();
}
std::unique_ptr<Decoder> MakeFuseDecoder() { return std::make_unique<FuseDecoder>(); }
std::unique_ptr<Decoder> MakeStripDecoder(std::string content, int start, int stop) {
  return std::make_unique<StripDecoder>(std::move(content), start, stop);
}
std::unique_ptr<Decoder> MakeMetaspaceDecoder(std::string replacement, PrependScheme scheme) {
  return std::make_unique<MetaspaceDecoder>(std::move(replacement), scheme);
}

}  // namespace cleave::model
