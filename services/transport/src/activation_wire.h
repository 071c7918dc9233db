// Wire format of the AFD activation transport (cleave/transport/activation.h has the layout and
// the bounds each side checks). Every message is one fixed 32-byte little-endian header, so a
// receiver reads a whole header and checks every field before it trusts any length in it.
// Payloads (f32 rows, i32 assignments) travel as raw host bytes: the static_assert below keeps
// that equal to little-endian, so neither side converts element by element.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>

#include "frame.h"

namespace cleave::transport::afd_wire {

static_assert(std::endian::native == std::endian::little,
              "activation payloads are sent as raw little-endian f32/i32");

inline constexpr uint32_t kHelloMagic = 0x48464143;   // "CAFH" on the wire
inline constexpr uint32_t kAckMagic = 0x4b464143;     // "CAFK"
inline constexpr uint32_t kCallMagic = 0x51464143;    // "CAFQ"
inline constexpr uint32_t kAnswerMagic = 0x41464143;  // "CAFA"
inline constexpr uint16_t kVersion = 1;

inline constexpr size_t kHeaderBytes = 32;
inline constexpr uint32_t kMaxMessageBytes = 4096;  // an error ANSWER's text at most
inline constexpr uint64_t kMaxAssignsPerRow = 64;   // an expert call's assignments <= rows * this

enum class HelloStatus : uint16_t { kOk = 0, kGeometryMismatch = 1 };
enum class AnswerStatus : uint16_t { kOk = 0, kError = 1 };

using Header = std::array<std::byte, kHeaderBytes>;

// HELLO and HELLO_ACK share one layout (the ACK carries the FFN worker's own geometry, so a
// refused attention worker can say what it met):
//   0 magic u32 | 4 version u16 | 6 status u16 (HELLO: 0) | 8 hidden u32 | 12 num_layers u32 |
//   16 max_rows u32 | 20..32 zeros
struct Hello {
  uint32_t magic = kHelloMagic;
  uint16_t version = kVersion;
  uint16_t status = 0;
  uint32_t hidden = 0;
  uint32_t num_layers = 0;
  uint32_t max_rows = 0;
};

// 0 magic u32 | 4 op u16 | 6 reserved u16 | 8 ticket u64 | 16 layer u32 | 20 rows u32 |
// 24 assigns u32 | 28 hidden u32
struct Call {
  uint32_t magic = kCallMagic;
  uint16_t op = 0;
  uint16_t reserved = 0;
  uint64_t ticket = 0;
  uint32_t layer = 0;
  uint32_t rows = 0;
  uint32_t assigns = 0;
  uint32_t hidden = 0;
};

// 0 magic u32 | 4 status u16 | 6 reserved u16 | 8 ticket u64 | 16 out_rows u32 | 20 hidden u32 |
// 24 compute_us u32 | 28 message_bytes u32
struct Answer {
  uint32_t magic = kAnswerMagic;
  uint16_t status = 0;
  uint16_t reserved = 0;
  uint64_t ticket = 0;
  uint32_t out_rows = 0;
  uint32_t hidden = 0;
  uint32_t compute_us = 0;
  uint32_t message_bytes = 0;
};

inline Header EncodeHello(const Hello& h) {
  Header b{};
  wire::PutU32(&b[0], h.magic);
  wire::PutU16(&b[4], h.version);
  wire::PutU16(&b[6], h.status);
  wire::PutU32(&b[8], h.hidden);
  wire::PutU32(&b[12], h.num_layers);
  wire::PutU32(&b[16], h.max_rows);
  return b;
}
inline Hello DecodeHello(const std::byte* b) {
  Hello h;
  h.magic = wire::GetU32(&b[0]);
  h.version = wire::GetU16(&b[4]);
  h.status = wire::GetU16(&b[6]);
  h.hidden = wire::GetU32(&b[8]);
  h.num_layers = wire::GetU32(&b[12]);
  h.max_rows = wire::GetU32(&b[16]);
  return h;
}

inline Header EncodeCall(const Call& c) {
  Header b{};
  wire::PutU32(&b[0], c.magic);
  wire::PutU16(&b[4], c.op);
  wire::PutU16(&b[6], c.reserved);
  wire::PutU64(&b[8], c.ticket);
  wire::PutU32(&b[16], c.layer);
  wire::PutU32(&b[20], c.rows);
  wire::PutU32(&b[24], c.assigns);
  wire::PutU32(&b[28], c.hidden);
  return b;
}
inline Call DecodeCall(const std::byte* b) {
  Call c;
  c.magic = wire::GetU32(&b[0]);
  c.op = wire::GetU16(&b[4]);
  c.reserved = wire::GetU16(&b[6]);
  c.ticket = wire::GetU64(&b[8]);
  c.layer = wire::GetU32(&b[16]);
  c.rows = wire::GetU32(&b[20]);
  c.assigns = wire::GetU32(&b[24]);
  c.hidden = wire::GetU32(&b[28]);
  return c;
}

inline Header EncodeAnswer(const Answer& a) {
  Header b{};
  wire::PutU32(&b[0], a.magic);
  wire::PutU16(&b[4], a.status);
  wire::PutU16(&b[6], a.reserved);
  wire::PutU64(&b[8], a.ticket);
  wire::PutU32(&b[16], a.out_rows);
  wire::PutU32(&b[20], a.hidden);
  wire::PutU32(&b[24], a.compute_us);
  wire::PutU32(&b[28], a.message_bytes);
  return b;
}
inline Answer DecodeAnswer(const std::byte* b) {
  Answer a;
  a.magic = wire::GetU32(&b[0]);
  a.status = wire::GetU16(&b[4]);
  a.reserved = wire::GetU16(&b[6]);
  a.ticket = wire::GetU64(&b[8]);
  a.out_rows = wire::GetU32(&b[16]);
  a.hidden = wire::GetU32(&b[20]);
  a.compute_us = wire::GetU32(&b[24]);
  a.message_bytes = wire::GetU32(&b[28]);
  return a;
}

}  // namespace cleave::transport::afd_wire
