// Shared pieces of the KV transport tests: a host-memory block (and state slot) store, a
// recorder for receiver callbacks, deterministic source blocks and states, and helpers that run
// one transfer.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "cleave/transport/kv_transport.h"

namespace cleave::transport::testing_util {

using std::chrono::milliseconds;

// Small blocks keep the tests fast: 4 tokens x 2 heads x 8 dims x f32 = 256 B per block.
inline KvGeometry TestGeometry(int num_layers = 3, int num_blocks = 64) {
  return KvGeometry{.num_layers = num_layers,
                    .block_size = 4,
                    .num_kv_heads = 2,
                    .head_dim = 8,
                    .num_blocks = num_blocks};
}

// A Jamba-like hybrid: 4 layers, 0 and 2 Mamba (state) layers, 1 and 3 attention. State sizes
// are deliberately not multiples of each other or of a block: conv 96 B, SSM 520 B per slot.
inline KvGeometry HybridGeometry(int num_blocks = 64, int num_state_slots = 8) {
  KvGeometry g = TestGeometry(/*num_layers=*/4, num_blocks);
  g.state_layers = {1, 0, 1, 0};
  g.conv_state_bytes = 96;
  g.ssm_state_bytes = 520;
  g.num_state_slots = num_state_slots;
  return g;
}

// A pure Mamba model: every layer carries state, no KV shape and no block pool at all.
inline KvGeometry PureStateGeometry(int num_state_slots = 8) {
  return KvGeometry{.num_layers = 3,
                    .state_layers = {1, 1, 1},
                    .conv_state_bytes = 96,
                    .ssm_state_bytes = 520,
                    .num_state_slots = num_state_slots};
}

inline std::vector<int> StateLayers(const KvGeometry& g) {
  std::vector<int> out;
  for (int l = 0; l < g.num_layers; ++l) {
    if (g.is_state_layer(l)) out.push_back(l);
  }
  return out;
}
inline std::vector<int> KvLayers(const KvGeometry& g) {
  std::vector<int> out;
  for (int l = 0; l < g.num_layers; ++l) {
    if (!g.is_state_layer(l)) out.push_back(l);
  }
  return out;
}

inline constexpr std::byte kUntouched{0xEE};

// KV layout [layer][K|V][block][block_bytes] (every layer, so writes into a state layer's blocks
// would show), state layout [layer][slot][conv | SSM] (state layers only), all filled with
// kUntouched so stray writes show.
class TestStore : public KvBlockStore {
 public:
  explicit TestStore(const KvGeometry& g)
      : g_(g),
        data_(static_cast<size_t>(g.num_layers) * 2 * g.num_blocks * g.block_bytes(), kUntouched),
        state_(static_cast<size_t>(g.num_layers) * std::max(g.num_state_slots, 0) * SlotBytes(),
               kUntouched) {}
  const KvGeometry& geometry() const override { return g_; }
  std::byte* BlockData(int layer, bool is_value, int block) override {
    const size_t idx =
        (static_cast<size_t>(layer) * 2 + (is_value ? 1 : 0)) * g_.num_blocks + block;
    return data_.data() + idx * g_.block_bytes();
  }
  std::byte* StateData(int layer, bool is_ssm, int slot) override {
    if (!g_.is_state_layer(layer)) return nullptr;
    const size_t idx = static_cast<size_t>(layer) * g_.num_state_slots + slot;
    return state_.data() + idx * SlotBytes() + (is_ssm ? g_.conv_state_bytes : 0);
  }
  bool StateUntouched(int layer, int slot) {
    const std::byte* p = StateData(layer, false, slot);
    for (size_t i = 0; i < SlotBytes(); ++i) {
      if (p[i] != kUntouched) return false;
    }
    return true;
  }
  bool BlockUntouched(int layer, bool is_value, int block) {
    const std::byte* p = BlockData(layer, is_value, block);
    for (size_t i = 0; i < g_.block_bytes(); ++i) {
      if (p[i] != kUntouched) return false;
    }
    return true;
  }
  void Reset() {
    std::fill(data_.begin(), data_.end(), kUntouched);
    std::fill(state_.begin(), state_.end(), kUntouched);
  }
  bool AllUntouched() {
    for (const auto* v : {&data_, &state_}) {
      for (std::byte b : *v) {
        if (b != kUntouched) return false;
      }
    }
    return true;
  }

 private:
  size_t SlotBytes() const { return g_.conv_state_bytes + g_.ssm_state_bytes; }

  KvGeometry g_;
  std::vector<std::byte> data_;
  std::vector<std::byte> state_;
};

// The bytes a test sends for (transfer seed, layer, block, K/V): cheap, distinct, never kUntouched.
inline std::byte PatternByte(uint64_t seed, int layer, int block, bool is_value, size_t i) {
  const uint64_t x = seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(layer) * 1000003 +
                     static_cast<uint64_t>(block) * 7919 + (is_value ? 104729 : 0) + i * 31;
  const auto b = static_cast<uint8_t>(x ^ (x >> 29));
  return static_cast<std::byte>(b == 0xEE ? 0x11 : b);
}

// Source memory for one layer of a transfer.
struct LayerSource {
  std::vector<std::vector<std::byte>> k, v;
  std::vector<const std::byte*> k_ptrs, v_ptrs;
};
inline LayerSource MakeLayerSource(const KvGeometry& g, uint64_t seed, int layer,
                                   const std::vector<int32_t>& blocks) {
  LayerSource s;
  for (int32_t b : blocks) {
    s.k.emplace_back(g.block_bytes());
    s.v.emplace_back(g.block_bytes());
    for (size_t i = 0; i < g.block_bytes(); ++i) {
      s.k.back()[i] = PatternByte(seed, layer, b, false, i);
      s.v.back()[i] = PatternByte(seed, layer, b, true, i);
    }
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    s.k_ptrs.push_back(s.k[i].data());
    s.v_ptrs.push_back(s.v[i].data());
  }
  return s;
}

// The bytes of a slot's state in one layer: conv (is_ssm false) then SSM, offset i in each.
inline std::byte StateByte(uint64_t seed, int layer, int slot, bool is_ssm, size_t i) {
  return PatternByte(seed ^ 0x5bd1e995, layer, 1'000'000 + slot, is_ssm, i);
}

// Sends one state layer from freshly made source memory, then scribbles on that memory.
inline absl::Status SendOneState(KvSender& sender, const std::string& peer, const KvGeometry& g,
                                 uint64_t request_id, uint32_t attempt, int layer, int slot,
                                 uint64_t seed) {
  std::vector<std::byte> conv(g.conv_state_bytes), ssm(g.ssm_state_bytes);
  for (size_t i = 0; i < conv.size(); ++i) conv[i] = StateByte(seed, layer, slot, false, i);
  for (size_t i = 0; i < ssm.size(); ++i) ssm[i] = StateByte(seed, layer, slot, true, i);
  KvStateSend send{.request_id = request_id,
                   .attempt = attempt,
                   .layer = layer,
                   .dst_slot = slot,
                   .conv_src = conv.data(),
                   .ssm_src = ssm.data()};
  absl::Status st = sender.SendState(peer, send);
  std::fill(conv.begin(), conv.end(), std::byte{0});
  std::fill(ssm.begin(), ssm.end(), std::byte{0});
  return st;
}

inline bool StateMatches(TestStore& store, uint64_t seed, int layer, int slot) {
  const KvGeometry& g = store.geometry();
  for (bool is_ssm : {false, true}) {
    const std::byte* p = store.StateData(layer, is_ssm, slot);
    const size_t n = is_ssm ? g.ssm_state_bytes : g.conv_state_bytes;
    for (size_t i = 0; i < n; ++i) {
      if (p[i] != StateByte(seed, layer, slot, is_ssm, i)) return false;
    }
  }
  return true;
}

inline absl::Status SendOneLayer(KvSender& sender, const std::string& peer, const KvGeometry& g,
                                 uint64_t request_id, uint32_t attempt, int layer,
                                 const std::vector<int32_t>& blocks, uint64_t seed) {
  LayerSource src = MakeLayerSource(g, seed, layer, blocks);
  KvLayerSend send{.request_id = request_id,
                   .attempt = attempt,
                   .layer = layer,
                   .dst_blocks = blocks,
                   .k_src = src.k_ptrs,
                   .v_src = src.v_ptrs};
  absl::Status st = sender.SendLayer(peer, send);
  // The contract lets the caller reuse its memory at once: scribble on it to prove it.
  for (auto& blk : src.k) std::fill(blk.begin(), blk.end(), std::byte{0});
  for (auto& blk : src.v) std::fill(blk.begin(), blk.end(), std::byte{0});
  return st;
}

inline bool LayerMatches(TestStore& store, uint64_t seed, int layer,
                         const std::vector<int32_t>& blocks) {
  const size_t bb = store.geometry().block_bytes();
  for (int32_t b : blocks) {
    for (bool is_value : {false, true}) {
      const std::byte* p = store.BlockData(layer, is_value, b);
      for (size_t i = 0; i < bb; ++i) {
        if (p[i] != PatternByte(seed, layer, b, is_value, i)) return false;
      }
    }
  }
  return true;
}

// Runs Finish and waits for `done`; DeadlineExceeded here means the transport hung.
inline absl::Status FinishAndWait(KvSender& sender, const std::string& peer, uint64_t request_id,
                                  uint32_t attempt, milliseconds timeout = milliseconds(10000)) {
  auto promise = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> result = promise->get_future();
  sender.Finish(peer, request_id, attempt, [promise](absl::Status s) { promise->set_value(s); });
  if (result.wait_for(timeout) != std::future_status::ready) {
    return absl::DeadlineExceededError("Finish's done callback never ran");
  }
  return result.get();
}

// Records receiver callbacks and lets a test wait for them.
class Events {
 public:
  ReceiverCallbacks Callbacks() {
    return {
        .on_ready = [this](uint64_t r, uint32_t a) { Record(r, a, std::nullopt); },
        .on_failed = [this](uint64_t r, uint32_t a, const std::string& why) { Record(r, a, why); }};
  }
  bool WaitReady(uint64_t r, uint32_t a, milliseconds timeout = milliseconds(10000)) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return ready_.count({r, a}) > 0; });
  }
  // The first failure reason for (r, a), or nullopt on timeout.
  std::optional<std::string> WaitFailed(uint64_t r, uint32_t a,
                                        milliseconds timeout = milliseconds(10000)) {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return failed_.count({r, a}) > 0; }))
      return std::nullopt;
    return failed_[{r, a}].front();
  }
  int ReadyCount(uint64_t r, uint32_t a) {
    std::lock_guard lock(mu_);
    return ready_.count({r, a}) ? ready_[{r, a}] : 0;
  }
  int FailedCount(uint64_t r, uint32_t a) {
    std::lock_guard lock(mu_);
    return failed_.count({r, a}) ? static_cast<int>(failed_[{r, a}].size()) : 0;
  }
  int TotalReady() {
    std::lock_guard lock(mu_);
    int n = 0;
    for (auto& [k, c] : ready_) n += c;
    return n;
  }

 private:
  void Record(uint64_t r, uint32_t a, std::optional<std::string> why) {
    std::lock_guard lock(mu_);
    if (why) {
      failed_[{r, a}].push_back(*why);
    } else {
      ++ready_[{r, a}];
    }
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::pair<uint64_t, uint32_t>, int> ready_;
  std::map<std::pair<uint64_t, uint32_t>, std::vector<std::string>> failed_;
};

}  // namespace cleave::transport::testing_util
