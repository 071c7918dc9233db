// Moving KV blocks and Mamba state (and later activations) between workers.
//
// One interface, several backends chosen by the peer address:
//   "HOST:PORT"        TCP over host memory (framed; every length and block id is checked on the
//                      receiving side against what the scheduler agreed — see KvReceiver::Expect)
//   "inproc://NAME"    a memcpy into a receiver in the same process (tests, single-process modes;
//                      no authentication: nothing crosses a process boundary)
//   "nccl://HOST:PORT"      GPU to GPU over NCCL: device memory on both sides
//   "cuda-ipc://HOST:PORT"  GPU to GPU between two processes on one machine (CUDA IPC): device
//                           memory on both sides
// The two GPU schemes are the TCP backend with the payload moved elsewhere: the same
// connection, secret (authentication), handshake, frame headers and block ids, and the same
// checks on the receiving side, all on the TCP socket; only the K/V and state bytes travel
// differently. nccl: after the handshake the sender makes an ncclUniqueId and sends it over
// the authenticated connection; both sides join a 2-rank NCCL communicator (one per
// connection; NCCL needs the two ends on different GPUs) and each frame's payload follows its
// header as grouped ncclSend / ncclRecv. cuda-ipc: the sender describes its source memory (IPC
// handles of its cudaMalloc allocations plus offsets) and the receiver, after checking the
// frame, copies from it and acknowledges; SendLayer returns after that acknowledgement.
// For these schemes every source pointer (KvLayerSend, KvStateSend) must be device memory on
// TransportOptions::cuda_device, and the receiver's store must return device pointers and say
// which device (KvBlockStore::cuda_device). The transport reads and writes on its own CUDA
// streams: the caller must have finished writing a source (e.g. synchronised its compute
// stream) before SendLayer / SendState; a receiver's blocks are complete when on_ready runs.
// cuda-ipc sources must be cudaMalloc memory (not stream-ordered pool or VMM memory) that stays
// allocated while the sender lives, because receivers keep each allocation mapped for the life
// of the connection (freeing exported memory that is still mapped elsewhere is undefined in
// CUDA). A peer that dies or stalls fails the transfers on
// its connection after at most io_timeout_ms (NCCL communicators are aborted) rather than
// hanging. A binary built without CUDA fails these schemes with FailedPrecondition ("built
// without CUDA"); a CUDA build on a machine without a usable device with Unavailable.
//
// A transfer is keyed by (request_id, attempt). The prefill side sends, per attention layer, the K
// and V data of a set of destination blocks, and per Mamba layer the request's conv and SSM state
// for one destination state slot; then Finish. The decode side writes each frame straight
// into its KV cache (through KvBlockStore) and reports the transfer complete once every expected
// block of every layer has arrived followed by the finish frame.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace cleave::metrics {
class Counter;
class Histogram;
}  // namespace cleave::metrics

namespace cleave::transport {

// Where a sender or receiver counts its transfers (the worker's metrics registry owns them and
// outlives the transport). Any member may be null, and an all-null struct (the default) turns the
// accounting off. A transfer is one (request_id, attempt):
//   bytes    payload bytes (KV blocks, state) of every frame handed over / written into the store
//   seconds  sender: first SendLayer/SendState -> its Finish's `done` OK; receiver: Expect ->
//            on_ready (observed for successful transfers only)
//   ok       sender: Finish's `done` OK; receiver: on_ready
//   failed   sender: `done` with an error (transfers that never sent a frame are not counted);
//            receiver: on_failed (Forget is a cancellation, not a failure: not counted)
struct TransferMetrics {
  metrics::Counter* bytes = nullptr;
  metrics::Histogram* seconds = nullptr;
  metrics::Counter* ok = nullptr;
  metrics::Counter* failed = nullptr;
  bool enabled() const { return bytes || seconds || ok || failed; }
};

// Shape of the KV both sides must agree on. Per layer, one block of K (and one of V) is
// block_bytes() contiguous bytes: f32 [block_size, num_kv_heads, head_dim].
struct KvGeometry {
  int num_layers = 0;
  int block_size = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int num_blocks = 0;  // receiver's pool size: every block id must be < num_blocks
  // Models with Mamba layers: state_layers[l] != 0 marks layer l as a state layer (it carries one
  // slot's conv + SSM state, no KV blocks); empty means every layer is a KV layer. A slot's state
  // in one state layer is conv_state_bytes (f32 [d_inner, d_conv - 1]) followed on the wire by
  // ssm_state_bytes (f32 [d_inner, d_state]). (The "= {}" keeps designated initializers that
  // omit it free of -Wmissing-field-initializers.)
  std::vector<uint8_t> state_layers = {};
  size_t conv_state_bytes = 0;
  size_t ssm_state_bytes = 0;
  int num_state_slots = 0;  // receiver's pool size: every slot must be < num_state_slots
  size_t block_bytes() const {
    return static_cast<size_t>(block_size) * num_kv_heads * head_dim * sizeof(float);
  }
  bool is_state_layer(int layer) const {
    return layer >= 0 && static_cast<size_t>(layer) < state_layers.size() && state_layers[layer] != 0;
  }
  bool operator==(const KvGeometry&) const = default;
};

// The receiver's view of its KV cache memory. Returned pointers stay valid for the store's life.
class KvBlockStore {
 public:
  virtual ~KvBlockStore() = default;
  virtual const KvGeometry& geometry() const = 0;
  // Start of block `block` of layer `layer`'s K (is_value false) or V pool; block_bytes() long.
  virtual std::byte* BlockData(int layer, bool is_value, int block) = 0;
  // Start of slot `slot`'s conv state (is_ssm false, conv_state_bytes long) or SSM state
  // (ssm_state_bytes long) in state layer `layer`. Stores of models without state return nullptr.
  virtual std::byte* StateData(int layer, bool is_ssm, int slot) {
    (void)layer, (void)is_ssm, (void)slot;
    return nullptr;
  }
  // Where BlockData / StateData point: -1 host memory (tcp, inproc), else the CUDA device
  // ordinal holding them. The nccl and cuda-ipc receivers require >= 0.
  virtual int cuda_device() const { return -1; }
};

// One layer of one request, as the sender hands it over: for each destination block i, the bytes
// at k_src[i] and v_src[i] (block_bytes() each) go to block dst_blocks[i] of layer `layer`.
struct KvLayerSend {
  uint64_t request_id = 0;
  uint32_t attempt = 0;
  int layer = 0;
  std::span<const int32_t> dst_blocks;
  std::span<const std::byte* const> k_src;
  std::span<const std::byte* const> v_src;
};

// One state layer of one request: conv_state_bytes at conv_src and ssm_state_bytes at ssm_src go
// to slot dst_slot of layer `layer`.
struct KvStateSend {
  uint64_t request_id = 0;
  uint32_t attempt = 0;
  int layer = 0;
  int dst_slot = 0;
  const std::byte* conv_src = nullptr;
  const std::byte* ssm_src = nullptr;
};

using DoneCallback = std::function<void(absl::Status)>;

// Sends to any number of peers; thread-safe. Data is copied (or written) before SendLayer
// returns, so the caller may overwrite its source blocks at once (nccl: the sending kernels have
// finished; cuda-ipc: the receiver has copied and acknowledged). Memory held for a peer is
// bounded: SendLayer blocks while the peer's queue is full, and fails after the send timeout.
class KvSender {
 public:
  virtual ~KvSender() = default;
  [[nodiscard]] virtual absl::Status SendLayer(const std::string& peer, const KvLayerSend& layer) = 0;
  // Same contract as SendLayer, for a state layer.
  [[nodiscard]] virtual absl::Status SendState(const std::string& peer, const KvStateSend& state) = 0;
  // Ends the transfer; `done` runs (on a transport thread) once every frame of the request has
  // been written to the peer, or with the error that stopped it (peer unreachable, timeout).
  // "Written" means handed to the peer's socket: whether the receiver accepted the transfer is
  // its on_ready / on_failed, reported through the scheduler. `done` may also run on the calling
  // thread (inproc, or a transfer that had already failed). Call Finish for every transfer that
  // had a SendLayer, even one that failed: it also drops the sender's record of the transfer.
  // TCP: once the connection carrying a transfer fails, that transfer stays failed (SendLayer
  // returns the error) until its Finish; other transfers re-dial on their next SendLayer.
  virtual void Finish(const std::string& peer, uint64_t request_id, uint32_t attempt,
                      DoneCallback done) = 0;
};

// Callbacks run on a transport thread (TCP: the connection's reader; inproc: the sender's
// thread), never under a transport lock, so they may call Expect / Forget. They must not destroy
// the receiver. None runs once the receiver's destructor has started.
struct ReceiverCallbacks {
  // Every expected block of every KV layer arrived, and (when a state slot is expected) the state
  // of every state layer, then the finish frame.
  std::function<void(uint64_t request_id, uint32_t attempt)> on_ready;
  // A frame for this transfer broke the agreement (unknown block, wrong layer, short data, or
  // the sender's connection dropped mid-transfer). The transfer is forgotten.
  std::function<void(uint64_t request_id, uint32_t attempt, const std::string& why)> on_failed;
  // Received-direction accounting (see TransferMetrics); off by default.
  TransferMetrics metrics = {};
};

// Accepts transfers into a KvBlockStore. Thread-safe.
class KvReceiver {
 public:
  virtual ~KvReceiver() = default;
  // The address senders use to reach this receiver ("HOST:PORT", "nccl://HOST:PORT",
  // "cuda-ipc://HOST:PORT" or "inproc://NAME"). TCP and the GPU schemes: advertise_host (else
  // listen_host) and the bound port.
  virtual std::string address() const = 0;
  // Agreement from the scheduler: frames of (request_id, attempt) may write exactly `blocks`
  // (in every KV layer) and, when state_slot >= 0, that slot (in every state layer). Frames for
  // transfers not expected are refused (read and dropped), so Expect must come before the
  // sender's first frame. Replaces an earlier agreement for the key.
  virtual void Expect(uint64_t request_id, uint32_t attempt, std::vector<int32_t> blocks,
                      int state_slot = -1) = 0;
  // Drops an expectation (request cancelled or preempted); late frames for it are discarded.
  // When Forget returns, no write for the transfer is in flight and none will start, so its
  // blocks may be handed to another request. (It waits for a frame being received into them:
  // at most io_timeout_ms when that peer stalls.)
  virtual void Forget(uint64_t request_id, uint32_t attempt) = 0;
  // Forget() for every expectation at once: the worker lost its scheduler and re-registers with
  // its whole pool free, so nothing agreed before may write a block from now on.
  virtual void ForgetAll() = 0;
};

struct TransportOptions {
  std::string listen_host = "127.0.0.1";
  int listen_port = 0;                    // 0 = pick a free port (address() tells which)
  size_t max_queued_bytes_per_peer = 64u << 20;
  int connect_timeout_ms = 3000;
  int io_timeout_ms = 10000;              // a stalled peer fails the transfer after this
  // Senders only: the KV shape this process sends. SendLayer copies geometry.block_bytes() from
  // each source pointer (the spans carry no sizes), SendState conv_state_bytes and
  // ssm_state_bytes, and the TCP handshake states (num_layers, block_bytes, which layers carry
  // state, conv/SSM bytes) so a receiver whose store has another shape refuses the connection.
  // Pool sizes (num_blocks, num_state_slots) are optional here: when set, sends naming ids
  // beyond them fail early. Receivers ignore it and use their store's geometry. Unset or
  // unusable (num_layers == 0, or a KV / state layer without its sizes): SendLayer / SendState
  // fail with FailedPrecondition.
  KvGeometry geometry;
  // Senders only: sent-direction accounting (see TransferMetrics); off by default.
  TransferMetrics sent_metrics = {};
  // The cluster secret that authenticates TCP connections (both sides must hold the same bytes;
  // empty = no authentication). A peer that cannot prove it is refused before any frame: every
  // connection starts with a mutual HMAC-SHA256 challenge-response (services/transport/src/auth.h)
  // and both sides must agree on whether there is a secret at all. A sender refused, or finding
  // a receiver that does not authenticate or cannot prove the secret, fails its sends with
  // Unauthenticated ("authentication: ..."); a receiver drops such a peer (logged, nothing
  // written, no callback). The secret is never logged. inproc:// transfers ignore it: they stay
  // inside one process, where there is no one to authenticate.
  std::string secret;
  // Receivers: the host peers must dial (address() reports it); empty = listen_host. A host name
  // or IP only (IPv6 with or without brackets); the port is always the one bound.
  std::string advertise_host;
  // Senders to nccl:// and cuda-ipc:// peers: the CUDA device holding the source memory (the
  // NCCL communicator's device; cuda-ipc checks each pointer is on it). -1 (the default) fails
  // those sends with FailedPrecondition; TCP and inproc ignore it.
  int cuda_device = -1;
};

// The sender for every address scheme above.
std::unique_ptr<KvSender> CreateKvSender(const TransportOptions& options);

// `listen`: "tcp" listens on options.listen_host:listen_port; "nccl" and "cuda-ipc" listen the
// same way and take that payload scheme (address() is then "nccl://HOST:PORT" /
// "cuda-ipc://HOST:PORT"; the store must hold device memory: cuda_device() >= 0);
// "inproc://NAME" registers NAME in this process. The store must outlive the receiver.
absl::StatusOr<std::unique_ptr<KvReceiver>> CreateKvReceiver(const std::string& listen,
                                                             const TransportOptions& options,
                                                             KvBlockStore& store,
                                                             ReceiverCallbacks callbacks);

// Whether this binary has the nccl:// and cuda-ipc:// backends (built with the CUDA toolkit).
// Built is not usable: a machine without a GPU still fails them with Unavailable.
bool KvGpuTransportsBuilt();

}  // namespace cleave::transport
