#include "cleave/model/unicode_text.h"

#include <array>

namespace cleave::model {
namespace {

// Valid ranges for the second byte of a sequence led by `lead` (Unicode Table 3-7), which is
// what rejects overlong forms, surrogates and code points above U+10FFFF.
bool SecondByteOk(uint8_t lead, uint8_t b) {
  if (lead == 0xE0) return b >= 0xA0 && b <= 0xBF;
  if (lead == 0xED) return b >= 0x80 && b <= 0x9F;
  if (lead == 0xF0) return b >= 0x90 && b <= 0xBF;
  if (lead == 0xF4) return b >= 0x80 && b <= 0x8F;
  return b >= 0x80 && b <= 0xBF;
}

int SequenceLength(uint8_t lead) {
  if (lead < 0x80) return 1;
  if (lead >= 0xC2 && lead <= 0xDF) return 2;
  if (lead >= 0xE0 && lead <= 0xEF) return 3;
  if (lead >= 0xF0 && lead <= 0xF4) return 4;
  return 0;
}

// Length of the longest prefix of a well-formed sequence at s[pos] (at least 1): the bytes one
// U+FFFD replaces under the "maximal subpart" practice.
int MaximalSubpart(std::string_view s, size_t pos) {
  const auto lead = static_cast<uint8_t>(s[pos]);
  const int len = SequenceLength(lead);
  if (len <= 1) return 1;
  int n = 1;
  while (n < len && pos + n < s.size()) {
    const auto b = static_cast<uint8_t>(s[pos + n]);
    const bool ok = n == 1 ? SecondByteOk(lead, b) : (b >= 0x80 && b <= 0xBF);
    if (!ok) break;
    ++n;
  }
  return n;
}

struct ByteLevelTables {
  std::array<std::string, 256> to_char;
  std::array<int, 324> to_byte;  // code points used are all below U+0144

  ByteLevelTables() {
    to_byte.fill(-1);
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const int cp = printable ? b : next++;
      to_byte[cp] = b;
      AppendUtf8(static_cast<char32_t>(cp), &to_char[b]);
    }
  }
};

const ByteLevelTables& Tables() {
  static const ByteLevelTables* tables = new ByteLevelTables();
  return *tables;
}

}  // namespace

int DecodeUtf8(std::string_view s, size_t pos, char32_t* code_point) {
  if (pos >= s.size()) return 0;
  const auto lead = static_cast<uint8_t>(s[pos]);
  const int len = SequenceLength(lead);
  if (len == 0 || pos + len > s.size()) return 0;
  if (len == 1) {
    *code_point = lead;
    return 1;
  }
  if (MaximalSubpart(s, pos) != len) return 0;
  char32_t cp = lead & (0xFF >> (len + 1));
  for (int i = 1; i < len; ++i) cp = (cp << 6) | (static_cast<uint8_t>(s[pos + i]) & 0x3F);
  *code_point = cp;
  return len;
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsValidUtf8(std::string_view s) {
  size_t pos = 0;
  char32_t cp;
  while (pos < s.size()) {
    if (static_cast<uint8_t>(s[pos]) < 0x80) {
      ++pos;
      continue;
    }
    const int len = DecodeUtf8(s, pos, &cp);
    if (len == 0) return false;
    pos += len;
  }
  return true;
}

std::string Utf8Lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  size_t pos = 0;
  char32_t cp;
  while (pos < bytes.size()) {
    const int len = DecodeUtf8(bytes, pos, &cp);
    if (len > 0) {
      out.append(bytes.substr(pos, len));
      pos += len;
    } else {
      AppendUtf8(kReplacementChar, &out);
      pos += MaximalSubpart(bytes, pos);
    }
  }
  return out;
}

bool EndsWithReplacementChar(std::string_view s) {
  return s.size() >= 3 && s.substr(s.size() - 3) == "\xEF\xBF\xBD";
}

bool IsUnicodeWhitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

const std::string& ByteLevelChar(uint8_t byte) { return Tables().to_char[byte]; }

int ByteLevelByte(char32_t cp) { return cp < Tables().to_byte.size() ? Tables().to_byte[cp] : -1; }

}  // namespace cleave::model
