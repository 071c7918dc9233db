// KV transport throughput: a prefill->decode transfer of `layers` layers, each layer one frame
// of 16 blocks x (32 KiB K + 32 KiB V) = 1 MiB, against a plain memcpy of the same bytes into
// the same scattered destination blocks.
//
// bytes_per_second counts KV payload bytes (ids and headers excluded). One iteration is one
// whole transfer: Expect, SendLayer per layer, Finish, and (for the transports) waiting for the
// receiver's on_ready, so per-transfer latency is included; more layers amortise it.
//
// The goal: TCP loopback >= 1/2 of memcpy bandwidth for 1 MiB batches. Note TCP loopback
// makes three copies of every byte (SendLayer's copy into its frame, the kernel's copy into
// the socket buffer, the kernel's copy out into the store) where memcpy makes one, and its
// three threads share the machine's cores.
#include <benchmark/benchmark.h>

#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cleave/transport/kv_transport.h"

namespace cleave::transport {
namespace {

constexpr int kBlocksPerLayer = 16;
constexpr int kPoolBlocks = 2 * kBlocksPerLayer;

// 16 tokens x 4 KV heads x 128 dims x f32 = 32 KiB per K (and per V) block.
KvGeometry BenchGeometry(int layers) {
  return KvGeometry{.num_layers = layers,
                    .block_size = 16,
                    .num_kv_heads = 4,
                    .head_dim = 128,
                    .num_blocks = kPoolBlocks};
}

class HostStore : public KvBlockStore {
 public:
  explicit HostStore(const KvGeometry& g)
      : g_(g), data_(static_cast<size_t>(g.num_layers) * 2 * g.num_blocks * g.block_bytes()) {}
  const KvGeometry& geometry() const override { return g_; }
  std::byte* BlockData(int layer, bool is_value, int block) override {
    const size_t idx =
        (static_cast<size_t>(layer) * 2 + (is_value ? 1 : 0)) * g_.num_blocks + block;
    return data_.data() + idx * g_.block_bytes();
  }

 private:
  KvGeometry g_;
  std::vector<std::byte> data_;
};

// The prefill side's memory: per layer, 16 K and 16 V source blocks, going to every other
// pool block (scattered, as a real block table is).
struct Source {
  explicit Source(const KvGeometry& g)
      : bytes(static_cast<size_t>(g.num_layers) * 2 * kBlocksPerLayer * g.block_bytes()) {
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<std::byte>(i * 131 + 7);
    for (int i = 0; i < kBlocksPerLayer; ++i) dst.push_back(2 * i + 1);
    for (int l = 0; l < g.num_layers; ++l) {
      for (int i = 0; i < kBlocksPerLayer; ++i) {
        k[l].push_back(
            &bytes[((static_cast<size_t>(l) * 2) * kBlocksPerLayer + i) * g.block_bytes()]);
        v[l].push_back(
            &bytes[((static_cast<size_t>(l) * 2 + 1) * kBlocksPerLayer + i) * g.block_bytes()]);
      }
    }
  }
  std::vector<std::byte> bytes;
  std::vector<int32_t> dst;
  std::vector<const std::byte*> k[64], v[64];
};

void SetPayloadBytes(benchmark::State& state, const KvGeometry& g) {
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * g.num_layers *
                          kBlocksPerLayer * 2 * static_cast<int64_t>(g.block_bytes()));
}

void BM_Memcpy(benchmark::State& state) {
  const KvGeometry g = BenchGeometry(static_cast<int>(state.range(0)));
  HostStore store(g);
  Source src(g);
  const size_t bb = g.block_bytes();
  for (auto _ : state) {
    for (int l = 0; l < g.num_layers; ++l) {
      for (int i = 0; i < kBlocksPerLayer; ++i) {
        std::memcpy(store.BlockData(l, false, src.dst[i]), src.k[l][i], bb);
        std::memcpy(store.BlockData(l, true, src.dst[i]), src.v[l][i], bb);
      }
    }
    benchmark::ClobberMemory();
  }
  SetPayloadBytes(state, g);
}

// Counts on_ready calls so the loop can wait for each transfer to land.
struct ReadyCounter {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t ready = 0;
  bool failed = false;
  ReceiverCallbacks Callbacks() {
    return {.on_ready =
                [this](uint64_t, uint32_t) {
                  std::lock_guard lock(mu);
                  ++ready;
                  cv.notify_all();
                },
            .on_failed =
                [this](uint64_t, uint32_t, const std::string&) {
                  std::lock_guard lock(mu);
                  failed = true;
                  cv.notify_all();
                }};
  }
  bool WaitFor(uint64_t n) {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return ready >= n || failed; });
    return !failed;
  }
};

void RunTransport(benchmark::State& state, const std::string& listen) {
  const KvGeometry g = BenchGeometry(static_cast<int>(state.range(0)));
  HostStore store(g);
  Source src(g);
  ReadyCounter counter;
  TransportOptions options;
  options.geometry = g;
  auto receiver = CreateKvReceiver(listen, options, store, counter.Callbacks());
  if (!receiver.ok()) {
    state.SkipWithError(std::string(receiver.status().message()).c_str());
    return;
  }
  const std::string peer = (*receiver)->address();
  std::unique_ptr<KvSender> sender = CreateKvSender(options);
  uint64_t request_id = 0;
  for (auto _ : state) {
    ++request_id;
    (*receiver)->Expect(request_id, 0, src.dst);
    for (int l = 0; l < g.num_layers; ++l) {
      KvLayerSend send{.request_id = request_id,
                       .attempt = 0,
                       .layer = l,
                       .dst_blocks = src.dst,
                       .k_src = src.k[l],
                       .v_src = src.v[l]};
      if (absl::Status st = sender->SendLayer(peer, send); !st.ok()) {
        state.SkipWithError(std::string(st.message()).c_str());
        return;
      }
    }
    sender->Finish(peer, request_id, 0, [](absl::Status) {});
    if (!counter.WaitFor(request_id)) {
      state.SkipWithError("transfer failed");
      return;
    }
  }
  SetPayloadBytes(state, g);
}

void BM_TcpLoopback(benchmark::State& state) { RunTransport(state, "tcp"); }
void BM_Inproc(benchmark::State& state) { RunTransport(state, "inproc://bench"); }

// Layers per transfer: 1 (one 1 MiB batch, latency-bound), 8 and 32 (throughput-bound).
BENCHMARK(BM_Memcpy)->Arg(1)->Arg(8)->Arg(32)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Inproc)->Arg(1)->Arg(8)->Arg(32)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_TcpLoopback)->Arg(1)->Arg(8)->Arg(32)->UseRealTime()->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace cleave::transport

BENCHMARK_MAIN();
