// Wire format of the TCP KV transport. Fixed-layout little-endian records, no varints and no
// self-describing encodings, so the receiver can check every field before it trusts a length.
//
//   connection:  [with a cluster secret: the auth exchange of auth.h, whose messages start with
//                their own magic "CKVA"; without one, none of it, byte for byte as before]
//                sender -> Hello; receiver -> HelloAck (kOk, or the reason it refuses);
//                then sender -> Frame* until either side closes. The receiver sends nothing after
//                HelloAck, so a sender that finds its socket readable knows the peer has gone.
//   LAYER frame: FrameHeader, n_blocks int32 block ids, then n_blocks * block_bytes of K (in the
//                order of the ids), then n_blocks * block_bytes of V. KV layers only.
//   STATE frame: FrameHeader (n_blocks 0, slot = destination state slot), then conv_state_bytes
//                of conv state, then ssm_state_bytes of SSM state. State (Mamba) layers only.
//   FINISH:      FrameHeader only (layer, n_blocks, slot and payload_bytes are 0).
//
// GPU payload schemes (nccl://, cuda-ipc://): the same connection, Hello and frames, with the
// payload moved off the socket. payload_bytes keeps its meaning (the bytes the frame lands), so
// the receiver's framing checks are the ones TCP applies; what follows the ids differs:
//   GPU SETUP:   once, right after HelloAck: FrameHeader type kGpuSetup, layer = the scheme
//                (GpuScheme), n_blocks = slot = 0, payload_bytes = the setup payload that
//                follows (NCCL: the 128-byte ncclUniqueId the sender made; CUDA IPC: none).
//                The receiver answers with one Ack (status kOk, or kRefused when it listens for
//                another scheme). A plain TCP receiver closes on the unknown type instead.
//   nccl://      LAYER / STATE frames carry nothing after the header and ids: the payload parts
//                (K of each block in id order, then V; or conv then SSM, empty parts skipped)
//                follow as one grouped ncclSend per part over the connection's 2-rank NCCL
//                communicator (sender rank 0). The receiver sends nothing after the setup Ack.
//   cuda-ipc://  after the header and ids, one IpcDescriptor per payload part (same order); the
//                receiver copies from the sender's exported memory and answers each frame with
//                an Ack (kOk written, kDropped not expected, kRefused broke the agreement or a
//                descriptor was out of bounds, kFailed the copy failed). FINISH frames get none.
//
// Version 2 added STATE frames and the state layout to the hello. Its first 24 bytes keep the
// version 1 layout, so either side can read a peer's version before it knows the peer's length:
// a receiver refusing another version answers with those 24 bytes only, and a sender that reads
// an ack of another version stops there.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace cleave::transport::wire {

inline constexpr uint32_t kHelloMagic = 0x31564b43;  // "CKV1" on the wire
inline constexpr uint32_t kFrameMagic = 0x46564b43;  // "CKVF": every frame, to catch desync
inline constexpr uint16_t kVersion = 2;

// Upper bound on blocks per LAYER frame, whatever the pool size: it bounds the receiver's
// per-connection id buffer (16 KiB) and what one frame can pin.
inline constexpr uint32_t kMaxBlocksPerFrame = 4096;

enum class FrameType : uint16_t { kLayer = 1, kFinish = 2, kState = 3, kGpuSetup = 4 };
enum class GpuScheme : uint32_t { kNccl = 1, kCudaIpc = 2 };
enum class HelloStatus : uint16_t { kOk = 0, kVersionMismatch = 1, kGeometryMismatch = 2 };

// Hello and HelloAck share one 48-byte layout:
//   0 magic u32 | 4 version u16 | 6 status u16 (Hello: 0) | 8 num_layers u32 |
//   12 num_state_layers u32 | 16 block_bytes u64 | 24 conv_state_bytes u64 |
//   32 ssm_state_bytes u64 | 40 state_layers_hash u64
// Bytes 0..23 are the prefix every version shares (version 1 had 12 reserved, and stopped at 24).
// Fields of a part the model lacks are 0: block_bytes without KV layers, the state fields
// without state layers. state_layers_hash is StateLayersHash() of which layers carry state.
// The ack carries the receiver's own geometry so a refused sender can say what it met.
struct Hello {
  uint32_t magic = kHelloMagic;
  uint16_t version = kVersion;
  uint16_t status = 0;
  uint32_t num_layers = 0;
  uint32_t num_state_layers = 0;
  uint64_t block_bytes = 0;
  uint64_t conv_state_bytes = 0;
  uint64_t ssm_state_bytes = 0;
  uint64_t state_layers_hash = 0;
};
inline constexpr size_t kHelloPrefixBytes = 24;
inline constexpr size_t kHelloBytes = 48;

// 0 magic u32 | 4 type u16 | 6 reserved u16 | 8 request_id u64 | 16 attempt u32 | 20 layer u32 |
// 24 n_blocks u32 | 28 slot u32 (STATE; 0 otherwise) | 32 payload_bytes u64 (bytes after the
// id list)
struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t type = 0;
  uint16_t reserved0 = 0;
  uint64_t request_id = 0;
  uint32_t attempt = 0;
  uint32_t layer = 0;
  uint32_t n_blocks = 0;
  uint32_t slot = 0;
  uint64_t payload_bytes = 0;
};
inline constexpr size_t kFrameHeaderBytes = 40;

// 0 magic u32 | 4 status u16 | 6 reserved u16 | 8 request_id u64 | 16 attempt u32 | 20 layer u32.
// The receiver's answer to a GPU SETUP (ids 0) and to each cuda-ipc LAYER / STATE frame (the
// frame's ids, so a sender can tell an answer that is out of step).
inline constexpr uint32_t kAckMagic = 0x4b564b43;  // "CKVK"
enum class AckStatus : uint16_t { kOk = 0, kDropped = 1, kRefused = 2, kFailed = 3 };
struct Ack {
  uint32_t magic = kAckMagic;
  uint16_t status = 0;
  uint64_t request_id = 0;
  uint32_t attempt = 0;
  uint32_t layer = 0;
};
inline constexpr size_t kAckBytes = 24;

// 0 cudaIpcMemHandle_t [64 bytes] | 64 allocation_bytes u64 | 72 offset u64: one payload part
// lives at `offset` in the allocation the handle exports, which the sender says is
// allocation_bytes long (the receiver also checks against what the driver maps).
inline constexpr size_t kIpcHandleBytes = 64;
inline constexpr size_t kIpcDescriptorBytes = 80;
// The setup payload's upper bound (NCCL_UNIQUE_ID_BYTES), so a receiver reads a bounded amount.
inline constexpr size_t kMaxSetupPayloadBytes = 128;

// FNV-1a (64-bit) over the ascending indices of the state layers, each as 4 little-endian bytes.
// Fixed here rather than a library hash because both ends must compute it alike, whatever they
// were built with. Not a security check: it catches configuration mismatches.
inline uint64_t StateLayersHash(const uint8_t* state_layers, size_t n) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (size_t l = 0; l < n; ++l) {
    if (state_layers[l] == 0) continue;
    for (int i = 0; i < 4; ++i) {
      h ^= static_cast<uint8_t>(l >> (8 * i));
      h *= 0x100000001b3ull;
    }
  }
  return h;
}

// Little-endian stores and loads, byte by byte so they hold on any host (compilers turn them
// into single moves on little-endian targets).
inline void PutU16(std::byte* p, uint16_t v) {
  for (int i = 0; i < 2; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline void PutU32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline void PutU64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>(v >> (8 * i));
}
inline uint16_t GetU16(const std::byte* p) {
  return static_cast<uint16_t>(static_cast<uint16_t>(p[0]) | static_cast<uint16_t>(p[1]) << 8);
}
inline uint32_t GetU32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = v << 8 | static_cast<uint32_t>(p[i]);
  return v;
}
inline uint64_t GetU64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = v << 8 | static_cast<uint64_t>(p[i]);
  return v;
}

inline std::array<std::byte, kHelloBytes> EncodeHello(const Hello& h) {
  std::array<std::byte, kHelloBytes> b{};
  PutU32(&b[0], h.magic);
  PutU16(&b[4], h.version);
  PutU16(&b[6], h.status);
  PutU32(&b[8], h.num_layers);
  PutU32(&b[12], h.num_state_layers);
  PutU64(&b[16], h.block_bytes);
  PutU64(&b[24], h.conv_state_bytes);
  PutU64(&b[32], h.ssm_state_bytes);
  PutU64(&b[40], h.state_layers_hash);
  return b;
}
// `b` holds kHelloBytes; when only the prefix was read, the rest must be zero.
inline Hello DecodeHello(const std::byte* b) {
  Hello h;
  h.magic = GetU32(&b[0]);
  h.version = GetU16(&b[4]);
  h.status = GetU16(&b[6]);
  h.num_layers = GetU32(&b[8]);
  h.num_state_layers = GetU32(&b[12]);
  h.block_bytes = GetU64(&b[16]);
  h.conv_state_bytes = GetU64(&b[24]);
  h.ssm_state_bytes = GetU64(&b[32]);
  h.state_layers_hash = GetU64(&b[40]);
  return h;
}

inline void EncodeFrameHeader(const FrameHeader& h, std::byte* b) {
  PutU32(&b[0], h.magic);
  PutU16(&b[4], h.type);
  PutU16(&b[6], h.reserved0);
  PutU64(&b[8], h.request_id);
  PutU32(&b[16], h.attempt);
  PutU32(&b[20], h.layer);
  PutU32(&b[24], h.n_blocks);
  PutU32(&b[28], h.slot);
  PutU64(&b[32], h.payload_bytes);
}
inline FrameHeader DecodeFrameHeader(const std::byte* b) {
  FrameHeader h;
  h.magic = GetU32(&b[0]);
  h.type = GetU16(&b[4]);
  h.reserved0 = GetU16(&b[6]);
  h.request_id = GetU64(&b[8]);
  h.attempt = GetU32(&b[16]);
  h.layer = GetU32(&b[20]);
  h.n_blocks = GetU32(&b[24]);
  h.slot = GetU32(&b[28]);
  h.payload_bytes = GetU64(&b[32]);
  return h;
}

inline void EncodeAck(const Ack& a, std::byte* b) {
  PutU32(&b[0], a.magic);
  PutU16(&b[4], a.status);
  PutU16(&b[6], 0);
  PutU64(&b[8], a.request_id);
  PutU32(&b[16], a.attempt);
  PutU32(&b[20], a.layer);
}
inline Ack DecodeAck(const std::byte* b) {
  Ack a;
  a.magic = GetU32(&b[0]);
  a.status = GetU16(&b[4]);
  a.request_id = GetU64(&b[8]);
  a.attempt = GetU32(&b[16]);
  a.layer = GetU32(&b[20]);
  return a;
}

}  // namespace cleave::transport::wire
