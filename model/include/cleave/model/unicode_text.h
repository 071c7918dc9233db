// UTF-8 helpers shared by the tokenizers. Text in cleave is std::string holding UTF-8; these
// functions never throw and never read past the given view.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace cleave::model {

inline constexpr char32_t kReplacementChar = 0xFFFD;

// Decodes the code point starting at s[pos]. Returns its length in bytes (1-4), or 0 when the
// bytes there are not a well-formed UTF-8 sequence (overlong forms and surrogates rejected).
int DecodeUtf8(std::string_view s, size_t pos, char32_t* code_point);
void AppendUtf8(char32_t code_point, std::string* out);
bool IsValidUtf8(std::string_view s);

// bytes with every ill-formed subsequence replaced by U+FFFD, one per maximal subpart — what
// Python's bytes.decode(errors="replace") and Rust's String::from_utf8_lossy produce, so decodes
// match the reference tokenizers byte for byte.
std::string Utf8Lossy(std::string_view bytes);

// True when s ends in U+FFFD, the signal (in decoded text) of a character still incomplete.
bool EndsWithReplacementChar(std::string_view s);

// Unicode White_Space, which Rust's char::is_whitespace tests (lstrip/rstrip of added tokens).
bool IsUnicodeWhitespace(char32_t c);

// GPT-2's byte-level alphabet: every byte maps to a printable code point (printable Latin-1
// bytes to themselves, the rest to U+0100 upwards), so any byte string becomes a string of
// "characters" BPE can work on.
const std::string& ByteLevelChar(uint8_t byte);  // UTF-8 of the code point for this byte
int ByteLevelByte(char32_t code_point);          // inverse; -1 when not in the alphabet

}  // namespace cleave::model
