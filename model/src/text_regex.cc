#include "cleave/model/text_regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "cleave/model/unicode_text.h"

namespace cleave::model {
namespace {

// Oniguruma's Unicode \s: U+0009-000D, U+0085 and the Z categories (not U+180E, which PCRE2's
// \h still includes). Its \w: letters, marks, decimal digits, connector punctuation.
constexpr std::string_view kSpaceClass = "\\t-\\r\\x{85}\\p{Z}";
constexpr std::string_view kWordClass = "\\p{L}\\p{M}\\p{Nd}\\p{Pc}";

// Rewrites \s \S \w \W into explicit classes with Oniguruma's meaning. Negated shorthands inside
// a character class cannot be expanded into a union and are left to PCRE2 (close enough; no
// tokenizer we know writes them).
std::string RewriteShorthands(std::string_view p) {
  std::string out;
  out.reserve(p.size() + 32);
  bool in_class = false;
  for (size_t i = 0; i < p.size(); ++i) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[++i];
      if (e == 'Q') {  // \Q...\E is literal text: copy it untouched
        const size_t end = p.find("\\E", i + 1);
        const size_t stop = end == std::string_view::npos ? p.size() : end + 2;
        out.append(p.substr(i - 1, stop - (i - 1)));
        i = stop - 1;
        continue;
      }
      const bool space = e == 's' || e == 'S';
      const bool word = e == 'w' || e == 'W';
      const bool negated = e == 'S' || e == 'W';
      if ((space || word) && !(in_class && negated)) {
        const std::string_view cls = space ? kSpaceClass : kWordClass;
        if (in_class) {
          out.append(cls);
        } else {
          absl::StrAppend(&out, negated ? "[^" : "[", std::string(cls), "]");
        }
        continue;
      }
      out.push_back('\\');
      out.push_back(e);
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out.push_back(c);
      // A ']' right after '[' or '[^' is a literal member, not the end of the class.
      if (i + 1 < p.size() && p[i + 1] == '^') out.push_back(p[++i]);
      if (i + 1 < p.size() && p[i + 1] == ']') out.push_back(p[++i]);
      continue;
    }
    if (in_class && c == '[' && i + 1 < p.size() && p[i + 1] == ':') {  // [:alpha:]
      const size_t end = p.find(":]", i + 2);
      if (end != std::string_view::npos) {
        out.append(p.substr(i, end + 2 - i));
        i = end + 1;
        continue;
      }
    }
    if (in_class && c == ']') in_class = false;
    out.push_back(c);
  }
  return out;
}

pcre2_code* Code(void* p) { return static_cast<pcre2_code*>(p); }

}  // namespace

absl::StatusOr<std::unique_ptr<TextRegex>> TextRegex::Compile(std::string_view pattern) {
  const std::string rewritten = RewriteShorthands(pattern);
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rewritten.data()), rewritten.size(),
                    PCRE2_UTF | PCRE2_UCP | PCRE2_MULTILINE, &error, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    return absl::InvalidArgumentError(absl::StrCat("regex does not compile at offset ", offset,
                                                   ": ", reinterpret_cast<char*>(message),
                                                   " (pattern: ", std::string(pattern), ")"));
  }
  auto regex = std::unique_ptr<TextRegex>(new TextRegex());
  regex->pattern_ = std::string(pattern);
  regex->code_ = code;
  // JIT is a large speedup for the pre-tokenizer hot loop; without it (e.g. an unsupported CPU)
  // the interpreter gives the same answers.
  (void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  return regex;
}

TextRegex::~TextRegex() { pcre2_code_free(Code(code_)); }

absl::StatusOr<std::vector<std::pair<size_t, size_t>>> TextRegex::FindAll(
    std::string_view text) const {
  // Checked once here so every pcre2_match below can skip its O(n) UTF-8 scan.
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("regex subject is not valid UTF-8");
  std::vector<std::pair<size_t, size_t>> matches;
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(Code(code_), nullptr);
  if (md == nullptr) return absl::ResourceExhaustedError("pcre2_match_data_create failed");
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t search_from = 0;
  bool have_last = false;
  size_t last_match_end = 0;
  absl::Status status;
  while (search_from <= text.size()) {
    const int rc = pcre2_match(Code(code_), subject, text.size(), search_from, PCRE2_NO_UTF_CHECK,
                               md, nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(rc, message, sizeof(message));
      status = absl::ResourceExhaustedError(
          absl::StrCat("regex match failed: ", reinterpret_cast<char*>(message)));
      break;
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    const size_t begin = ov[0], end = ov[1];
    if (end < begin || end < search_from) {  // only \K tricks get here; they would loop forever
      status = absl::InvalidArgumentError("regex match ends before it starts (\\K?)");
      break;
    }
    if (begin == end && have_last && last_match_end == end) {
      // Oniguruma's iterator: no empty match where the previous one ended; step one character.
      char32_t cp;
      const int len = search_from < text.size() ? DecodeUtf8(text, search_from, &cp) : 1;
      search_from += len > 0 ? len : 1;
      continue;
    }
    matches.emplace_back(begin, end);
    search_from = end;
    have_last = true;
    last_match_end = end;
  }
  pcre2_match_data_free(md);
  if (!status.ok()) return status;
  return matches;
}

}  // namespace cleave::model
