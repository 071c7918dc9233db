// The activation transport of attention-FFN disaggregation (AFD): per layer, an attention worker
// sends the normalised hidden states of a micro-batch to the FFN workers of its group and gets
// their FFN output back. TCP between CPU hosts (NCCL between GPUs is the CUDA issue's), with the
// KV transport's connection authentication (auth.h) and its discipline: every length, index and
// layer is bounds-checked on the receiving side, every read and write runs under a progress
// timeout, and a peer that breaks the protocol loses its connection, never the process.
//
// One connection per (attention worker, FFN worker) pair; the attention side dials. Calls are
// pipelined: Send writes a call's frame and returns a ticket at once, the connection's reader
// thread writes the answer straight into the call's `out` buffer, and Wait blocks on the ticket.
// So micro-batch i+1's transfer and compute overlap micro-batch i's (ping-pong). The FFN side
// answers the calls of one connection in arrival order, one thread per connection.
//
// Wire format (little-endian; every message a fixed 32-byte header, then its payload):
//   after auth (when a secret is set), attention -> FFN:
//     HELLO     0 magic u32 "CAFH" | 4 version u16 | 6 0 u16 | 8 hidden u32 | 12 num_layers u32 |
//               16 max_rows u32 | 20..32 zeros
//   FFN -> attention:
//     HELLO_ACK 0 magic u32 "CAFK" | 4 version u16 | 6 status u16 (0 ok, 1 geometry differs) |
//               8 hidden u32 | 12 num_layers u32 | 16 max_rows u32 | 20..32 zeros
//   then any number of, attention -> FFN:
//     CALL      0 magic u32 "CAFQ" | 4 op u16 (1 dense, 2 experts) | 6 0 u16 | 8 ticket u64 |
//               16 layer u32 | 20 rows u32 | 24 assigns u32 | 28 hidden u32
//               payload: rows x hidden f32, then assigns x i32 rows, then assigns x i32 experts
//   and FFN -> attention, one per CALL, in order:
//     ANSWER    0 magic u32 "CAFA" | 4 status u16 (0 ok, 1 error) | 6 0 u16 | 8 ticket u64 |
//               16 out_rows u32 | 20 hidden u32 | 24 compute_us u32 | 28 message_bytes u32
//               payload: ok: out_rows x hidden f32 (dense: out_rows = rows; experts: = assigns);
//                        error: message_bytes (<= 4096) of UTF-8 text, the connection stays up.
// Bounds (FFN side): hidden and layer match the HELLO, rows in [1, max_rows], dense calls carry no
// assignments, an expert call carries 1..rows*64 assignments and every assignment's row < rows;
// the handler checks the expert ids. Bounds (attention side): an ANSWER's ticket is the oldest
// outstanding one and its out_rows/hidden are what that call expects. A violation closes the
// connection; every outstanding and later call on it fails with the reason.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cleave::transport {

enum class FfnOp : uint16_t {
  kDense = 1,    // the layer's dense FFN over every row; out: [rows, hidden]
  kExperts = 2,  // assignment i = row assign_rows[i] through expert assign_experts[i];
                 // out: [assigns, hidden], unweighted (the attention side combines)
};

// One layer's FFN work for one micro-batch (attention side). The pointers must stay valid until
// Wait returns for its ticket; `out` is written by the connection's reader thread.
struct FfnCall {
  FfnOp op = FfnOp::kDense;
  int layer = 0;
  int num_rows = 0;
  const float* rows = nullptr;  // [num_rows, hidden]
  int num_assign = 0;           // kExperts only
  const int32_t* assign_rows = nullptr;
  const int32_t* assign_experts = nullptr;
  float* out = nullptr;         // [dense ? num_rows : num_assign, hidden]
};

// A call as the FFN side sees it, after the framing checks above.
struct FfnRequest {
  FfnOp op = FfnOp::kDense;
  int layer = 0;
  int num_rows = 0;
  std::span<const float> rows;             // [num_rows * hidden]
  std::span<const int32_t> assign_rows;    // kExperts: [num_assign], each < num_rows
  std::span<const int32_t> assign_experts; // kExperts: [num_assign], unchecked
};

// Computes one call into `out` ([out_rows * hidden], out_rows as in FfnOp). A non-OK status goes
// back to the caller as an error ANSWER (e.g. an expert this worker does not own).
using FfnHandler = std::function<absl::Status(const FfnRequest& request, std::span<float> out)>;

struct ActivationOptions {
  int hidden_size = 0;
  int num_layers = 0;
  int max_rows = 8192;             // rows per call at most
  std::string secret;              // cluster secret (auth.h); empty = unauthenticated
  int connect_timeout_ms = 2000;
  int io_timeout_ms = 5000;        // progress timeout of every read and write
  // FFN side.
  std::string listen_host = "127.0.0.1";
  int listen_port = 0;             // 0 = any free port
  std::string advertise_host;      // what address() names; empty = listen_host
};

// What one answered call cost, as the attention side measured it.
struct FfnTiming {
  int64_t round_trip_us = 0;  // Send started -> answer fully read
  int64_t compute_us = 0;     // the FFN side's handler time (from the ANSWER)
};

// The FFN side: accepts attention workers' connections, one thread each.
class FfnServer {
 public:
  static absl::StatusOr<std::unique_ptr<FfnServer>> Start(const ActivationOptions& options,
                                                           FfnHandler handler);
  virtual ~FfnServer() = default;
  // HOST:PORT attention workers dial (advertise_host or listen_host, and the bound port).
  virtual std::string address() const = 0;
  virtual int num_connections() const = 0;
  // Calls answered since the start (ok or error); for drain ("idle for a while") and tests.
  virtual uint64_t calls_answered() const = 0;
  // Closes the listener and every connection; joins the threads. Idempotent.
  virtual void Stop() = 0;
};

// The attention side of one connection to one FFN worker.
class FfnConnection {
 public:
  // Dials, authenticates (when options.secret is set) and exchanges HELLO/HELLO_ACK.
  static absl::StatusOr<std::unique_ptr<FfnConnection>> Connect(const std::string& address,
                                                                const ActivationOptions& options);
  virtual ~FfnConnection() = default;
  // Writes the call's frame (blocking under the io timeout); returns its ticket. Fails at once
  // when the connection is broken.
  virtual absl::StatusOr<uint64_t> Send(const FfnCall& call) = 0;
  // Blocks until the answer to `ticket` is in the call's `out` (OK), the FFN side answered an
  // error, the connection broke, or `deadline` passed (DeadlineExceeded; the connection is then
  // broken, since a late answer would write into a buffer the caller has reused).
  virtual absl::Status Wait(uint64_t ticket, std::chrono::steady_clock::time_point deadline,
                            FfnTiming* timing = nullptr) = 0;
  // Why the connection is unusable; OK while it is healthy.
  virtual absl::Status broken() const = 0;
  virtual const std::string& address() const = 0;
};

}  // namespace cleave::transport
