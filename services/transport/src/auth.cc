#include "auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sys/uio.h>

#include <climits>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "frame.h"
#include "socket_io.h"

namespace cleave::transport::auth {
namespace {

constexpr std::string_view kSenderLabel = "cleave-kv-auth-v1 sender";
constexpr std::string_view kReceiverLabel = "cleave-kv-auth-v1 receiver";
constexpr size_t kMacBytes = 32;  // SHA-256
static_assert(kMacBytes == kNonceBytes, "one 32-byte body holds a nonce or a MAC");

using Body = std::array<std::byte, 32>;

struct Message {
  uint32_t magic = 0;
  uint16_t version = 0;
  uint16_t kind = 0;
  Body body{};
};

Message Decode(const std::byte* b) {
  Message m;
  m.magic = wire::GetU32(&b[0]);
  m.version = wire::GetU16(&b[4]);
  m.kind = wire::GetU16(&b[6]);
  std::memcpy(m.body.data(), &b[8], m.body.size());
  return m;
}

absl::Status Write(int fd, Kind kind, const Body& body) {
  std::array<std::byte, kMessageBytes> b{};
  wire::PutU32(&b[0], kAuthMagic);
  wire::PutU16(&b[4], kAuthVersion);
  wire::PutU16(&b[6], static_cast<uint16_t>(kind));
  std::memcpy(&b[8], body.data(), body.size());
  iovec iov{b.data(), b.size()};
  return WriteFullv(fd, &iov, 1);
}

absl::Status Context(const absl::Status& s, const char* what) {
  return absl::Status(s.code(), absl::StrCat("authentication: ", what, ": ", s.message()));
}

absl::Status Fresh(Body& nonce) {
  if (RAND_bytes(reinterpret_cast<unsigned char*>(nonce.data()), static_cast<int>(nonce.size())) !=
      1) {
    return absl::InternalError("authentication: RAND_bytes failed to make a nonce");
  }
  return absl::OkStatus();
}

// HMAC-SHA256(secret, label || first || second || wire version as u16 LE).
absl::StatusOr<Body> Mac(std::string_view secret, std::string_view label, const Body& first,
                         const Body& second) {
  if (secret.size() > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError("authentication: cluster secret too long");
  }
  std::vector<std::byte> msg(label.size() + first.size() + second.size() + 2);
  std::byte* p = msg.data();
  std::memcpy(p, label.data(), label.size());
  p += label.size();
  std::memcpy(p, first.data(), first.size());
  p += first.size();
  std::memcpy(p, second.data(), second.size());
  p += second.size();
  wire::PutU16(p, wire::kVersion);
  Body mac{};
  unsigned int len = 0;
  if (HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()),
           reinterpret_cast<const unsigned char*>(msg.data()), msg.size(),
           reinterpret_cast<unsigned char*>(mac.data()), &len) == nullptr ||
      len != kMacBytes) {
    return absl::InternalError("authentication: HMAC-SHA256 failed");
  }
  return mac;
}

bool SameMac(const Body& a, const Body& b) {
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

// Reads one whole message. A clean close before its first byte is `closed_status`.
absl::StatusOr<Message> Read(int fd, const char* what, const absl::Status& closed_status) {
  std::array<std::byte, kMessageBytes> b{};
  absl::Status st = ReadFull(fd, b.data(), b.size(), /*eof_ok_at_start=*/true);
  if (absl::IsNotFound(st)) return closed_status;
  if (!st.ok()) return Context(st, what);
  return Decode(b.data());
}

// The rest of a message whose first `first_len` bytes the caller has read already.
absl::StatusOr<Message> ReadRest(int fd, const std::byte* first, size_t first_len) {
  std::array<std::byte, kMessageBytes> b{};
  std::memcpy(b.data(), first, first_len);
  if (absl::Status st = ReadFull(fd, b.data() + first_len, b.size() - first_len); !st.ok()) {
    return Context(st, "reading the peer's opening");
  }
  return Decode(b.data());
}

}  // namespace

absl::Status AuthenticateToReceiver(int fd, std::string_view secret) {
  Body ns{};
  if (absl::Status s = Fresh(ns); !s.ok()) return s;
  if (absl::Status s = Write(fd, Kind::kOpen, ns); !s.ok())
    return Context(s, "sending the opening");

  absl::StatusOr<Message> challenge = Read(
      fd, "waiting for the receiver's challenge",
      absl::UnauthenticatedError("authentication: the receiver closed the connection instead of "
                                 "challenging this sender (it authenticates nobody?)"));
  if (!challenge.ok()) return challenge.status();
  if (challenge->magic != kAuthMagic) {
    return absl::UnauthenticatedError(
        "authentication: the receiver did not challenge this sender (not a cleave KV receiver, "
        "or one without authentication)");
  }
  if (challenge->version != kAuthVersion) {
    return absl::UnauthenticatedError(
        absl::StrCat("authentication: the receiver speaks auth version ", challenge->version,
                     "; this sender speaks ", kAuthVersion));
  }
  if (challenge->kind == static_cast<uint16_t>(Kind::kNoAuth)) {
    return absl::UnauthenticatedError(
        "authentication: the receiver has no cluster secret and authenticates nobody, but this "
        "sender has one (configure the same secret on both sides, or on neither)");
  }
  if (challenge->kind != static_cast<uint16_t>(Kind::kChallenge)) {
    return absl::UnauthenticatedError(absl::StrCat(
        "authentication: expected the receiver's challenge, got message kind ", challenge->kind));
  }
  const Body& nr = challenge->body;

  absl::StatusOr<Body> proof = Mac(secret, kSenderLabel, nr, ns);
  if (!proof.ok()) return proof.status();
  if (absl::Status s = Write(fd, Kind::kProof, *proof); !s.ok()) {
    return Context(s, "sending the proof");
  }

  absl::StatusOr<Message> reply =
      Read(fd, "waiting for the receiver's confirmation",
           absl::UnauthenticatedError(
               "authentication: the receiver closed the connection after this sender's proof"));
  if (!reply.ok()) return reply.status();
  if (reply->magic == kAuthMagic && reply->kind == static_cast<uint16_t>(Kind::kDenied)) {
    return absl::UnauthenticatedError(
        "authentication: the receiver refused this sender's proof (the cluster secrets differ)");
  }
  if (reply->magic != kAuthMagic || reply->version != kAuthVersion ||
      reply->kind != static_cast<uint16_t>(Kind::kConfirm)) {
    return absl::UnauthenticatedError(
        "authentication: expected the receiver's confirmation, got something else");
  }
  absl::StatusOr<Body> expected = Mac(secret, kReceiverLabel, ns, nr);
  if (!expected.ok()) return expected.status();
  if (!SameMac(*expected, reply->body)) {
    return absl::UnauthenticatedError(
        "authentication: the receiver failed to prove it holds the cluster secret (the secrets "
        "differ)");
  }
  return absl::OkStatus();
}

absl::Status SendChallenge(int fd, Nonce& nr) {
  if (absl::Status s = Fresh(nr); !s.ok()) return s;
  if (absl::Status s = Write(fd, Kind::kChallenge, nr); !s.ok()) {
    return Context(s, "sending the challenge");
  }
  return absl::OkStatus();
}

absl::Status AuthenticateSender(int fd, std::string_view secret, const Nonce& nr,
                                const std::byte* first, size_t first_len) {
  absl::StatusOr<Message> open = ReadRest(fd, first, first_len);
  if (!open.ok()) return open.status();
  // Whatever goes wrong from here, the peer is told DENIED (so a misconfigured sender says so
  // clearly) and the connection closes. A failed write of DENIED changes nothing.
  auto deny = [fd](std::string why) {
    (void)Write(fd, Kind::kDenied, Body{});
    return absl::UnauthenticatedError(absl::StrCat("authentication: ", why));
  };
  if (open->version != kAuthVersion) {
    return deny(absl::StrCat("peer speaks auth version ", open->version, "; this receiver speaks ",
                             kAuthVersion));
  }
  if (open->kind != static_cast<uint16_t>(Kind::kOpen)) {
    return deny(absl::StrCat("peer opened with message kind ", open->kind, ", not OPEN"));
  }
  const Body& ns = open->body;
  if (SameMac(ns, nr)) return deny("peer echoed this receiver's challenge as its own nonce");

  absl::StatusOr<Message> proof = Read(
      fd, "waiting for the peer's proof",
      absl::UnauthenticatedError("authentication: peer closed the connection before its proof"));
  if (!proof.ok()) return proof.status();
  if (proof->magic != kAuthMagic || proof->version != kAuthVersion ||
      proof->kind != static_cast<uint16_t>(Kind::kProof)) {
    return deny("expected the peer's proof, got something else");
  }
  absl::StatusOr<Body> expected = Mac(secret, kSenderLabel, nr, ns);
  if (!expected.ok()) return expected.status();
  if (!SameMac(*expected, proof->body)) {
    return deny("peer's proof does not match this receiver's cluster secret (the secrets differ)");
  }
  absl::StatusOr<Body> confirm = Mac(secret, kReceiverLabel, ns, nr);
  if (!confirm.ok()) return confirm.status();
  if (absl::Status s = Write(fd, Kind::kConfirm, *confirm); !s.ok()) {
    return Context(s, "sending the confirmation");
  }
  return absl::OkStatus();
}

absl::Status RefuseAuthentication(int fd, const std::byte* first, size_t first_len) {
  // Read the whole OPEN first: closing with its bytes unread would reset the connection, and
  // the sender might lose NO_AUTH, the one clear reason it can get.
  if (ReadRest(fd, first, first_len).ok()) (void)Write(fd, Kind::kNoAuth, Body{});
  return absl::UnauthenticatedError(
      "authentication: peer asked to authenticate, but this receiver has no cluster secret");
}

}  // namespace cleave::transport::auth
