#include "layer_checks.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace cleave::transport {
namespace {

// Keeps conv + SSM sums (and their doubles) far from overflow in 64 bits.
constexpr size_t kMaxStateBytes = size_t{1} << 40;

absl::Status Unusable(const absl::Status& why) {
  return absl::FailedPreconditionError(
      absl::StrCat("kv sender: TransportOptions.geometry is unset or unusable: ", why.message()));
}

}  // namespace

bool HasKvLayers(const KvGeometry& g) {
  for (int l = 0; l < g.num_layers; ++l) {
    if (!g.is_state_layer(l)) return true;
  }
  return false;
}

int NumStateLayers(const KvGeometry& g) {
  int n = 0;
  for (int l = 0; l < g.num_layers; ++l) n += g.is_state_layer(l);
  return n;
}

absl::Status CheckGeometry(const KvGeometry& g, bool receiver) {
  if (g.num_layers <= 0) {
    return absl::InvalidArgumentError("geometry needs num_layers > 0 (and a KV or state shape)");
  }
  if (g.state_layers.size() > static_cast<size_t>(g.num_layers)) {
    return absl::InvalidArgumentError(absl::StrCat("state_layers has ", g.state_layers.size(),
                                                   " entries for ", g.num_layers, " layers"));
  }
  if (HasKvLayers(g)) {
    if (g.block_size <= 0 || g.num_kv_heads <= 0 || g.head_dim <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV layers need a block shape; got block_size ", g.block_size,
                       ", num_kv_heads ", g.num_kv_heads, ", head_dim ", g.head_dim));
    }
    if (receiver && g.num_blocks <= 0) {
      return absl::InvalidArgumentError("KV layers need num_blocks > 0");
    }
  }
  if (NumStateLayers(g) > 0) {
    if (g.conv_state_bytes + g.ssm_state_bytes == 0 || g.conv_state_bytes > kMaxStateBytes ||
        g.ssm_state_bytes > kMaxStateBytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("state layers need conv + SSM state bytes in (0, 2^40] each; got ",
                       g.conv_state_bytes, " + ", g.ssm_state_bytes));
    }
    if (receiver && g.num_state_slots <= 0) {
      return absl::InvalidArgumentError("state layers need num_state_slots > 0");
    }
  }
  return absl::OkStatus();
}

wire::Hello HelloFor(const KvGeometry& g) {
  wire::Hello h;
  h.num_layers = static_cast<uint32_t>(std::max(g.num_layers, 0));
  if (HasKvLayers(g)) h.block_bytes = g.block_bytes();
  h.num_state_layers = static_cast<uint32_t>(NumStateLayers(g));
  if (h.num_state_layers > 0) {
    h.conv_state_bytes = g.conv_state_bytes;
    h.ssm_state_bytes = g.ssm_state_bytes;
    h.state_layers_hash = wire::StateLayersHash(
        g.state_layers.data(), std::min<size_t>(g.state_layers.size(), h.num_layers));
  }
  return h;
}

bool SameGeometry(const wire::Hello& a, const wire::Hello& b) {
  return a.num_layers == b.num_layers && a.block_bytes == b.block_bytes &&
         a.num_state_layers == b.num_state_layers && a.conv_state_bytes == b.conv_state_bytes &&
         a.ssm_state_bytes == b.ssm_state_bytes && a.state_layers_hash == b.state_layers_hash;
}

std::string DescribeGeometry(const wire::Hello& h) {
  std::string s = absl::StrCat(h.num_layers, " layers x ", h.block_bytes, " B blocks");
  if (h.num_state_layers > 0) {
    absl::StrAppend(&s, " (", h.num_state_layers, " state layers, hash ",
                    absl::Hex(h.state_layers_hash), ", state ", h.conv_state_bytes, " + ",
                    h.ssm_state_bytes, " B)");
  }
  return s;
}

absl::Status CheckLayerFraming(const KvGeometry& geometry, uint64_t n_blocks,
                               uint64_t payload_bytes) {
  if (geometry.block_bytes() == 0 || !HasKvLayers(geometry)) {
    return absl::InvalidArgumentError("layer frame, but this geometry has no KV layers");
  }
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

absl::Status CheckStateFraming(const KvGeometry& geometry, uint64_t n_blocks,
                               uint64_t payload_bytes) {
  if (NumStateLayers(geometry) == 0) {
    return absl::InvalidArgumentError("state frame, but this geometry has no state layers");
  }
  if (n_blocks != 0) {
    return absl::InvalidArgumentError(absl::StrCat("state frame carries ", n_blocks, " block ids"));
  }
  // Both terms are bounded by CheckGeometry.
  const uint64_t want = static_cast<uint64_t>(geometry.conv_state_bytes) + geometry.ssm_state_bytes;
  if (payload_bytes != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("state frame payload is ", payload_bytes, " bytes; a slot's state is ", want));
  }
  return absl::OkStatus();
}

absl::Status CheckLayerSend(const KvGeometry& g, const KvLayerSend& layer) {
  if (absl::Status s = CheckGeometry(g, /*receiver=*/false); !s.ok()) return Unusable(s);
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
  if (g.is_state_layer(layer.layer)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv send: layer ", layer.layer, " is a state layer (use SendState)"));
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

absl::Status CheckStateSend(const KvGeometry& g, const KvStateSend& state) {
  if (absl::Status s = CheckGeometry(g, /*receiver=*/false); !s.ok()) return Unusable(s);
  if (state.layer < 0 || state.layer >= g.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv state send: layer ", state.layer, " out of range (num_layers ", g.num_layers, ")"));
  }
  if (!g.is_state_layer(state.layer)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv state send: layer ", state.layer, " is a KV layer (use SendLayer)"));
  }
  if (state.dst_slot < 0 || (g.num_state_slots > 0 && state.dst_slot >= g.num_state_slots)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv state send: dst slot ", state.dst_slot, " out of range"));
  }
  if ((g.conv_state_bytes > 0 && state.conv_src == nullptr) ||
      (g.ssm_state_bytes > 0 && state.ssm_src == nullptr)) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv state send: null source for layer ", state.layer));
  }
  return absl::OkStatus();
}

}  // namespace cleave::transport
