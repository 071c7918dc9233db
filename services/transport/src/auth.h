// Mutual authentication of a TCP KV transport connection by a shared cluster secret (HMAC-SHA256,
// OpenSSL libcrypto), run before the geometry Hello whenever either side holds a secret. It
// proves that both ends hold the same secret; it does not encrypt or sign the frames that follow
// (the transport trusts the network path once a connection is authenticated, as it always has).
//
// Every auth message is 40 bytes, little-endian:
//   0 magic u32 ("CKVA") | 4 auth version u16 (1) | 6 kind u16 | 8 body [32 bytes]
// kind and body:
//   1 OPEN       sender -> receiver  Ns, the sender's fresh 32-byte nonce
//   2 CHALLENGE  receiver -> sender  Nr, the receiver's fresh 32-byte nonce
//   3 PROOF      sender -> receiver  HMAC(secret, "cleave-kv-auth-v1 sender" || Nr || Ns || V)
//   4 CONFIRM    receiver -> sender  HMAC(secret, "cleave-kv-auth-v1 receiver" || Ns || Nr || V)
//   5 DENIED     receiver -> sender  zeros: the proof was wrong (the secrets differ)
//   6 NO_AUTH    receiver -> sender  zeros: this receiver has no secret and authenticates nobody
// where HMAC is HMAC-SHA256, V is the Hello's wire version (frame.h kVersion) as u16 LE, and
// the labels are their ASCII bytes without a terminator.
//
// The exchange. Both first messages are sent without waiting for the other side, so they cross:
//
//   sender (with a secret)                     receiver (with a secret)
//     OPEN(Ns), on connect    ───────────>
//                             <───────────     CHALLENGE(Nr), on accept
//     PROOF(mac_s)            ───────────>     checks mac_s
//                             <───────────     CONFIRM(mac_r), or DENIED and close
//     checks mac_r; then the Hello / HelloAck of frame.h and frames, as without a secret
//
// Why these transcripts: each MAC covers the other side's fresh nonce, so a recorded PROOF or
// CONFIRM is useless on another connection (replay); the two labels differ, so one side's MAC is
// never valid as the other's (reflection); V ties the proof to the protocol spoken afterwards.
// A receiver computes nothing for a peer before it has checked that peer's PROOF, so it is no
// oracle. MACs are compared with CRYPTO_memcmp.
//
// Agreement on whether auth is on at all (the magic of a side's first message tells which):
//   receiver secret, sender none   the sender reads CHALLENGE where it expected a HelloAck and
//                                  stops (Unauthenticated); the receiver reads a Hello where it
//                                  expected OPEN and closes without reading any frame.
//   receiver none, sender secret   the receiver reads OPEN where it expected a Hello, answers
//                                  NO_AUTH and closes; the sender stops (Unauthenticated).
//   both, different secrets        DENIED (receiver), or a CONFIRM that does not verify
//                                  (sender): Unauthenticated on both sides.
// Each read runs under the connection's io timeout, so a peer that stalls mid-exchange is
// dropped after it. The secret's bytes never appear in a message or a log line.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "absl/status/status.h"

namespace cleave::transport::auth {

inline constexpr uint32_t kAuthMagic = 0x41564b43;  // "CKVA" on the wire
inline constexpr uint16_t kAuthVersion = 1;
inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kMessageBytes = 40;

enum class Kind : uint16_t {
  kOpen = 1,
  kChallenge = 2,
  kProof = 3,
  kConfirm = 4,
  kDenied = 5,
  kNoAuth = 6,
};

using Nonce = std::array<std::byte, kNonceBytes>;

// Sender side, on a freshly connected socket with its io timeout set, before the Hello. OK once
// the receiver has proven it holds `secret` (non-empty); Unauthenticated when it refuses this
// sender, does not authenticate, or fails its own proof; the I/O error otherwise.
[[nodiscard]] absl::Status AuthenticateToReceiver(int fd, std::string_view secret);

// Receiver side, step 1: a fresh nonce, sent as CHALLENGE on a just-accepted socket.
[[nodiscard]] absl::Status SendChallenge(int fd, Nonce& nr);

// Receiver side, step 2: `first` holds the peer's first `first_len` bytes (an OPEN's prefix; the
// caller has checked its magic). Reads the rest of OPEN and the PROOF, and answers CONFIRM, or
// DENIED and returns Unauthenticated.
[[nodiscard]] absl::Status AuthenticateSender(int fd, std::string_view secret, const Nonce& nr,
                                              const std::byte* first, size_t first_len);

// Receiver without a secret that was sent `first` (an OPEN's prefix): reads the rest of the
// OPEN (so the close is clean), answers NO_AUTH. Always returns Unauthenticated.
[[nodiscard]] absl::Status RefuseAuthentication(int fd, const std::byte* first, size_t first_len);

}  // namespace cleave::transport::auth
