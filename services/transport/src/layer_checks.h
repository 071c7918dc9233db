// The checks every backend applies to a geometry and to one frame (a layer of KV or a layer of
// state) before any memory is touched, kept in one place so TCP and inproc judge by the same
// rules. The agreement checks (is this block / slot promised to this transfer?) live in
// TransferTracker::BeginLayer / BeginState.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "cleave/transport/kv_transport.h"
#include "frame.h"

namespace cleave::transport {

// Does any layer in [0, num_layers) carry KV blocks / state?
bool HasKvLayers(const KvGeometry& geometry);
int NumStateLayers(const KvGeometry& geometry);

// A geometry a backend can work with: num_layers > 0, state_layers no longer than num_layers,
// a positive block shape when there are KV layers, conv + SSM bytes > 0 (each under 1 TiB, so
// sums cannot overflow) when there are state layers. A receiver (`receiver` true) also needs
// the pool sizes: num_blocks > 0 with KV layers, num_state_slots > 0 with state layers.
// InvalidArgument naming the first problem.
absl::Status CheckGeometry(const KvGeometry& geometry, bool receiver);

// What a geometry says about itself in the handshake (frame.h); status 0. Parts the model
// lacks are zeroed, so e.g. two pure-state geometries agree whatever their unused KV shape.
wire::Hello HelloFor(const KvGeometry& geometry);
// The handshake's rule: both ends must agree on every shape field (not on pool sizes).
bool SameGeometry(const wire::Hello& a, const wire::Hello& b);
// "4 layers (2 state) x 256 B blocks, state 96 + 512 B" for refusal messages.
std::string DescribeGeometry(const wire::Hello& h);

// The receiving side's framing rules for a LAYER frame, judged against its own geometry:
// KV layers exist, n_blocks within (0, min(kMaxBlocksPerFrame, num_blocks)] and
// payload_bytes == n_blocks * 2 * block_bytes. A failure means the frame's lengths cannot be
// trusted (TCP closes the connection).
absl::Status CheckLayerFraming(const KvGeometry& geometry, uint64_t n_blocks,
                               uint64_t payload_bytes);

// The same for a STATE frame: state layers exist, no block ids, and
// payload_bytes == conv_state_bytes + ssm_state_bytes.
absl::Status CheckStateFraming(const KvGeometry& geometry, uint64_t n_blocks,
                               uint64_t payload_bytes);

// The sending side's checks on a caller's KvLayerSend against the sender's geometry: spans of
// equal length, no null source, layer in range and a KV layer, ids non-negative (and
// < num_blocks when the sender's geometry names a pool size), and the framing rules above.
// Catches a caller's bug at SendLayer instead of as a failed transfer on the far side.
// FailedPrecondition when the geometry itself is unusable (CheckGeometry).
absl::Status CheckLayerSend(const KvGeometry& sender_geometry, const KvLayerSend& layer);

// The same for a KvStateSend: layer in range and a state layer, dst_slot >= 0 (and
// < num_state_slots when the sender's geometry names a pool size), no null source for a
// non-empty part.
absl::Status CheckStateSend(const KvGeometry& sender_geometry, const KvStateSend& state);

}  // namespace cleave::transport
