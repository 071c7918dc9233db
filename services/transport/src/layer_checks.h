// The checks every backend applies to one layer of KV before any memory is touched, kept in
// one place so TCP and inproc judge a frame by the same rules. The agreement checks (is this
// block promised to this transfer?) live in TransferTracker::BeginLayer.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "cleave/transport/kv_transport.h"

namespace cleave::transport {

// The receiving side's framing rules for a LAYER frame, judged against its own geometry:
// n_blocks within (0, min(kMaxBlocksPerFrame, num_blocks)] and
// payload_bytes == n_blocks * 2 * block_bytes. A failure means the frame's lengths cannot be
// trusted (TCP closes the connection).
absl::Status CheckLayerFraming(const KvGeometry& geometry, uint64_t n_blocks,
                               uint64_t payload_bytes);

// The sending side's checks on a caller's KvLayerSend against the sender's geometry: spans of
// equal length, no null source, layer in range, ids non-negative (and < num_blocks when the
// sender's geometry names a pool size), and the framing rules above. Catches a caller's bug
// at SendLayer instead of as a failed transfer on the far side.
absl::Status CheckLayerSend(const KvGeometry& sender_geometry, const KvLayerSend& layer);

}  // namespace cleave::transport
