#include "layer_checks.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "frame.h"

namespace cleave::transport {

absl::Status CheckLayerFraming(const KvGeometry& geometry, uint64_t n_blocks,
                               uint64_t payload_bytes) {
  const uint64_t cap = std::min<uint64_t>(wire::kMaxBlocksPerFrame,
                                          static_cast<uint64_t>(std::max(geometry.num_blocks, 0)));
  if (n_blocks == 0 || n_blocks > cap) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer frame carries ", n_blocks, " blocks; allowed 1..", cap));
  }
  // n_blocks <= 4096 and block_bytes is a product of four ints: no overflow in 64 bits.
  const uint64_t want = n_blocks * 2 * static_cast<uint64_t>(geometry.block_bytes());
  if (payload_bytes != want) {
    return absl::InvalidArgumentError(absl::StrCat("layer frame payload is ", payload_bytes,
                                                   " bytes; ", n_blocks, " blocks need ", want));
  }
  return absl::OkStatus();
}

absl::Status CheckLayerSend(const KvGeometry& g, const KvLayerSend& layer) {
  if (g.num_layers <= 0 || g.block_bytes() == 0) {
    return absl::FailedPreconditionError(
        "kv sender: TransportOptions.geometry is unset (num_layers and block shape needed)");
  }
  const size_t n = layer.dst_blocks.size();
  if (layer.k_src.size() != n || layer.v_src.size() != n) {
    return absl::InvalidArgumentError(absl::StrCat("kv send: ", n, " dst blocks but ",
                                                   layer.k_src.size(), " K and ",
                                                   layer.v_src.size(), " V sources"));
  }
  if (layer.layer < 0 || layer.layer >= g.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv send: layer ", layer.layer, " out of range (num_layers ", g.num_layers, ")"));
  }
  for (size_t i = 0; i < n; ++i) {
    const int32_t b = layer.dst_blocks[i];
    if (b < 0 || (g.num_blocks > 0 && b >= g.num_blocks)) {
      return absl::InvalidArgumentError(absl::StrCat("kv send: dst block ", b, " out of range"));
    }
    if (layer.k_src[i] == nullptr || layer.v_src[i] == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("kv send: null source for dst block ", b));
    }
  }
  // The sender may not know the receiver's pool size; the frame cap still applies.
  KvGeometry framing = g;
  if (framing.num_blocks <= 0) framing.num_blocks = static_cast<int>(wire::kMaxBlocksPerFrame);
  return CheckLayerFraming(framing, n, n * 2 * g.block_bytes());
}

}  // namespace cleave::transport
