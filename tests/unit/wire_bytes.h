// Little-endian byte packing for tests that write or read transport frames by hand (a malicious
// or scripted peer), independent of the transport's own encoders so that they check them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace cleave::wire_test {

using Bytes = std::vector<std::byte>;

// Appends the low `bytes` bytes of v, least significant first.
inline void Put(Bytes& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<std::byte>(v >> (8 * i)));
}

// Reads `bytes` bytes at `at` as a little-endian integer.
inline uint64_t Get(const Bytes& in, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = v << 8 | static_cast<uint8_t>(in[at + i]);
  return v;
}

}  // namespace cleave::wire_test
