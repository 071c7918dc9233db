// Shared pieces of the KV transport tests: a host-memory block store, a recorder for receiver
// callbacks, deterministic source blocks, and helpers that run one transfer.
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

inline constexpr std::byte kUntouched{0xEE};

// Layout [layer][K|V][block][block_bytes], filled with kUntouched so stray writes show.
class TestStore : public KvBlockStore {
 public:
  explicit TestStore(const KvGeometry& g)
      : g_(g),
        data_(static_cast<size_t>(g.num_layers) * 2 * g.num_blocks * g.block_bytes(), kUntouched) {}
  const KvGeometry& geometry() const override { return g_; }
  std::byte* BlockData(int layer, bool is_value, int block) override {
    const size_t idx =
        (static_cast<size_t>(layer) * 2 + (is_value ? 1 : 0)) * g_.num_blocks + block;
    return data_.data() + idx * g_.block_bytes();
  }
  bool BlockUntouched(int layer, bool is_value, int block) {
    const std::byte* p = BlockData(layer, is_value, block);
    for (size_t i = 0; i < g_.block_bytes(); ++i) {
      if (p[i] != kUntouched) return false;
    }
    return true;
  }
  void Reset() { std::fill(data_.begin(), data_.end(), kUntouched); }
  bool AllUntouched() {
    for (std::byte b : data_) {
      if (b != kUntouched) return false;
    }
    return true;
  }

 private:
  KvGeometry g_;
  std::vector<std::byte> data_;
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
