// The GPU KV transports between two real processes: this binary is the receiver (decode side)
// and re-runs itself (posix_spawn of /proc/self/exe, the disabled KvTransportGpuChild test) as
// the sender (prefill side), so each side has its own CUDA context as in deployment.
//
//   cuda-ipc: both processes on device 0. nccl: receiver on device 0, sender on device 1 (NCCL
//   refuses two ranks on one GPU), so on a machine with one GPU the NCCL tests are skipped
//   with "NCCL: needs 2 GPUs, not run" (the only skip).
//
// Checked: several KV layers and state layers land byte for byte in the receiver's device
// memory (sources spread over several allocations at various offsets, overwritten by the
// sender right after each send); a frame naming a block that was not agreed fails that transfer
// and writes nothing, and the next transfer works; a sender killed mid-transfer fails the
// receiver's transfer (on_failed) instead of hanging. The payload bytes come from a fixed
// function of (request, layer, block, part), so both processes know them without talking.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "cleave/transport/kv_transport.h"

extern char** environ;

namespace cleave::transport {
namespace {

using std::chrono::seconds;

#define CUDA_OK(expr)                                                         \
  do {                                                                        \
    const cudaError_t e_ = (expr);                                            \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorName(e_);      \
  } while (0)

constexpr char kSecret[] = "kv-gpu-test-secret";
constexpr char kChildFilter[] = "--gtest_filter=KvTransportGpuChild.DISABLED_Sender";

// A Jamba-like hybrid: layers 0 and 2 carry state, 1 and 3 KV. 16 KiB blocks; state sizes
// that are not multiples of each other.
KvGeometry Geometry() {
  KvGeometry g{.num_layers = 4, .block_size = 16, .num_kv_heads = 4, .head_dim = 64,
               .num_blocks = 64};
  g.state_layers = {1, 0, 1, 0};
  g.conv_state_bytes = 3000;
  g.ssm_state_bytes = 20008;
  g.num_state_slots = 8;
  return g;
}
constexpr int kKvLayers[] = {1, 3};
constexpr int kStateLayers[] = {0, 2};

// Part: 0 K, 1 V, 2 conv, 3 SSM. `index` is the block (K/V) or slot (state).
std::vector<std::byte> Pattern(uint64_t request, int layer, int index, int part, size_t n) {
  std::vector<std::byte> out(n);
  uint64_t x = request * 0x9E3779B97F4A7C15ull ^ (uint64_t(layer) << 40) ^
               (uint64_t(index) << 20) ^ (uint64_t(part) << 8);
  for (size_t i = 0; i < n; ++i) {
    x += 0x9E3779B97F4A7C15ull;
    uint64_t z = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    out[i] = static_cast<std::byte>(z >> 56);
  }
  return out;
}

// One transfer of the plan both processes follow.
struct Planned {
  uint64_t id;
  std::vector<int32_t> agreed;  // what the receiver Expects
  std::vector<int32_t> sent;    // what the sender sends
  int slot;                     // state slot, or -1 (then no state frames)
  bool refused;                 // sent names a block outside agreed
};
const std::vector<Planned>& Plan() {
  static const std::vector<Planned> plan = {
      {1, {1, 5, 9, 63}, {63, 1, 9, 5}, 3, false},
      {2, {2, 3}, {2, 4}, -1, true},
      {3, {7, 8, 20}, {7, 8, 20}, 4, false},
  };
  return plan;
}
constexpr uint64_t kStalledId = 5;
const std::vector<int32_t> kStalledBlocks = {10, 11};

// The receiver's KV cache in device memory, every byte 0xEE until written.
class DeviceStore : public KvBlockStore {
 public:
  DeviceStore(const KvGeometry& g, int device) : g_(g), device_(device) {
    kv_bytes_ = size_t(g.num_layers) * 2 * g.num_blocks * g.block_bytes();
    state_bytes_ = size_t(g.num_layers) * g.num_state_slots * SlotBytes();
    ok_ = cudaSetDevice(device) == cudaSuccess && cudaMalloc(&kv_, kv_bytes_) == cudaSuccess &&
          cudaMalloc(&state_, state_bytes_) == cudaSuccess &&
          cudaMemset(kv_, 0xEE, kv_bytes_) == cudaSuccess &&
          cudaMemset(state_, 0xEE, state_bytes_) == cudaSuccess &&
          cudaDeviceSynchronize() == cudaSuccess;
  }
  ~DeviceStore() override {
    cudaFree(kv_);
    cudaFree(state_);
  }
  bool ok() const { return ok_; }
  const KvGeometry& geometry() const override { return g_; }
  int cuda_device() const override { return device_; }
  std::byte* BlockData(int layer, bool is_value, int block) override {
    const size_t idx = (size_t(layer) * 2 + (is_value ? 1 : 0)) * g_.num_blocks + block;
    return static_cast<std::byte*>(kv_) + idx * g_.block_bytes();
  }
  std::byte* StateData(int layer, bool is_ssm, int slot) override {
    if (!g_.is_state_layer(layer)) return nullptr;
    const size_t idx = size_t(layer) * g_.num_state_slots + slot;
    return static_cast<std::byte*>(state_) + idx * SlotBytes() + (is_ssm ? g_.conv_state_bytes : 0);
  }
  std::vector<std::byte> Read(const std::byte* device_ptr, size_t n) {
    std::vector<std::byte> out(n);
    EXPECT_EQ(cudaMemcpy(out.data(), device_ptr, n, cudaMemcpyDeviceToHost), cudaSuccess);
    return out;
  }

 private:
  size_t SlotBytes() const { return g_.conv_state_bytes + g_.ssm_state_bytes; }
  KvGeometry g_;
  int device_;
  void* kv_ = nullptr;
  void* state_ = nullptr;
  size_t kv_bytes_ = 0, state_bytes_ = 0;
  bool ok_ = false;
};

class Events {
 public:
  ReceiverCallbacks Callbacks() {
    ReceiverCallbacks c;
    c.on_ready = [this](uint64_t r, uint32_t) { Record(r, std::nullopt); };
    c.on_failed = [this](uint64_t r, uint32_t, const std::string& why) { Record(r, why); };
    return c;
  }
  // nullopt: timed out; "" ready; else the failure reason.
  std::optional<std::string> Wait(uint64_t r, seconds timeout = seconds(90)) {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, timeout, [&] { return outcome_.count(r) > 0; })) return std::nullopt;
    return outcome_[r];
  }

 private:
  void Record(uint64_t r, std::optional<std::string> why) {
    std::lock_guard lock(mu_);
    outcome_.emplace(r, why ? "failed: " + *why : "");
    cv_.notify_all();
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<uint64_t, std::string> outcome_;
};

// The sender process: its stdout / stderr come back through a pipe.
class Child {
 public:
  Child(const std::string& peer, int device, const std::string& plan) {
    int fds[2];
    if (pipe(fds) != 0) return;
    std::vector<std::string> env = {"CLEAVE_KVGPU_PEER=" + peer,
                                    "CLEAVE_KVGPU_DEVICE=" + std::to_string(device),
                                    "CLEAVE_KVGPU_PLAN=" + plan};
    for (char** e = environ; *e != nullptr; ++e) {
      if (std::strncmp(*e, "CLEAVE_KVGPU_", 13) != 0) env.emplace_back(*e);
    }
    std::vector<char*> envp, argv;
    for (std::string& s : env) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string exe = "/proc/self/exe", filter = kChildFilter,
                disabled = "--gtest_also_run_disabled_tests";
    argv = {exe.data(), filter.data(), disabled.data(), nullptr};
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 1);
    posix_spawn_file_actions_adddup2(&actions, fds[1], 2);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    if (posix_spawn(&pid_, exe.c_str(), &actions, nullptr, argv.data(), envp.data()) != 0) pid_ = -1;
    posix_spawn_file_actions_destroy(&actions);
    close(fds[1]);
    reader_ = std::thread([this, fd = fds[0]] {
      char buf[4096];
      ssize_t n;
      while ((n = read(fd, buf, sizeof(buf))) > 0) {
        std::lock_guard lock(mu_);
        output_.append(buf, size_t(n));
        cv_.notify_all();
      }
      close(fd);
    });
  }
  ~Child() {
    if (pid_ > 0 && !reaped_) {
      kill(pid_, SIGKILL);
      Wait();
    }
    if (reader_.joinable()) reader_.join();
    std::printf("---- sender process output ----\n%s---- end ----\n", Output().c_str());
  }
  bool started() const { return pid_ > 0; }
  bool WaitFor(const std::string& text, seconds timeout) {
    std::unique_lock lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return output_.find(text) != std::string::npos; });
  }
  void Kill() { kill(pid_, SIGKILL); }
  // The exit status (-1 on a signal); gives up after `timeout`, killing it.
  int Wait(seconds timeout = seconds(120)) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    while (waitpid(pid_, &status, WNOHANG) == 0) {
      if (std::chrono::steady_clock::now() > until) kill(pid_, SIGKILL);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    reaped_ = true;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  std::string Output() {
    std::lock_guard lock(mu_);
    return output_;
  }

 private:
  pid_t pid_ = -1;
  bool reaped_ = false;
  std::thread reader_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::string output_;
};

std::unique_ptr<KvReceiver> StartReceiver(const char* scheme, DeviceStore& store, Events& events) {
  TransportOptions o;
  o.secret = kSecret;
  o.io_timeout_ms = 20000;
  auto r = CreateKvReceiver(scheme, o, store, events.Callbacks());
  EXPECT_TRUE(r.ok()) << r.status();
  if (!r.ok()) return nullptr;
  EXPECT_EQ((*r)->address().rfind(std::string(scheme) + "://", 0), 0u) << (*r)->address();
  return *std::move(r);
}

void ExpectLanded(DeviceStore& store, const Planned& t) {
  const size_t bb = store.geometry().block_bytes();
  for (int layer : kKvLayers) {
    for (int32_t b : t.agreed) {
      for (int part : {0, 1}) {
        EXPECT_EQ(store.Read(store.BlockData(layer, part == 1, b), bb), Pattern(t.id, layer, b, part, bb))
            << "request " << t.id << " layer " << layer << " block " << b << " part " << part;
      }
    }
  }
  const KvGeometry& g = store.geometry();
  for (int layer : kStateLayers) {
    for (int part : {2, 3}) {
      const size_t n = part == 2 ? g.conv_state_bytes : g.ssm_state_bytes;
      EXPECT_EQ(store.Read(store.StateData(layer, part == 3, t.slot), n), Pattern(t.id, layer, t.slot, part, n))
          << "request " << t.id << " state layer " << layer << " part " << part;
    }
  }
}

bool Untouched(DeviceStore& store, int layer, int block) {
  const size_t bb = store.geometry().block_bytes();
  for (bool v : {false, true}) {
    for (std::byte x : store.Read(store.BlockData(layer, v, block), bb)) {
      if (x != std::byte{0xEE}) return false;
    }
  }
  return true;
}

void RunTransfers(const char* scheme, int recv_device, int send_device) {
  DeviceStore store(Geometry(), recv_device);
  ASSERT_TRUE(store.ok());
  Events events;
  std::unique_ptr<KvReceiver> receiver = StartReceiver(scheme, store, events);
  ASSERT_NE(receiver, nullptr);
  for (const Planned& t : Plan()) receiver->Expect(t.id, 0, t.agreed, t.slot);
  Child child(receiver->address(), send_device, "transfers");
  ASSERT_TRUE(child.started());
  for (const Planned& t : Plan()) {
    const std::optional<std::string> outcome = events.Wait(t.id);
    ASSERT_TRUE(outcome.has_value()) << "request " << t.id << ": the receiver hung";
    if (t.refused) {
      EXPECT_NE(outcome->find("block 4 was not agreed"), std::string::npos) << *outcome;
    } else {
      EXPECT_EQ(*outcome, "") << "request " << t.id;
    }
  }
  EXPECT_EQ(child.Wait(), 0) << "the sender process failed";
  ExpectLanded(store, Plan()[0]);
  ExpectLanded(store, Plan()[2]);
  for (int32_t b : {2, 3, 4}) EXPECT_TRUE(Untouched(store, kKvLayers[0], b)) << "block " << b;
}

void RunKilledSender(const char* scheme, int recv_device, int send_device) {
  DeviceStore store(Geometry(), recv_device);
  ASSERT_TRUE(store.ok());
  Events events;
  std::unique_ptr<KvReceiver> receiver = StartReceiver(scheme, store, events);
  ASSERT_NE(receiver, nullptr);
  receiver->Expect(kStalledId, 0, kStalledBlocks, -1);
  Child child(receiver->address(), send_device, "stall");
  ASSERT_TRUE(child.started());
  ASSERT_TRUE(child.WaitFor("SENT", seconds(90))) << "the sender never sent its first layer";
  child.Kill();
  EXPECT_EQ(child.Wait(), -1);
  const auto start = std::chrono::steady_clock::now();
  const std::optional<std::string> outcome = events.Wait(kStalledId, seconds(60));
  ASSERT_TRUE(outcome.has_value()) << "a dead sender left the receiver's transfer hanging";
  EXPECT_EQ(outcome->rfind("failed: ", 0), 0u) << *outcome;
  std::printf("killed sender: transfer failed after %.2f s: %s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(),
              outcome->c_str());
}

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

TEST(KvTransportGpu, CudaIpcTransfersLayersAndStateBetweenProcesses) {
  ASSERT_GE(DeviceCount(), 1) << "no CUDA device";
  RunTransfers("cuda-ipc", 0, 0);
}

TEST(KvTransportGpu, CudaIpcKilledSenderFailsTheTransfer) {
  ASSERT_GE(DeviceCount(), 1) << "no CUDA device";
  RunKilledSender("cuda-ipc", 0, 0);
}

TEST(KvTransportGpu, NcclTransfersLayersAndStateBetweenProcesses) {
  if (DeviceCount() < 2) {
    std::printf("NCCL: needs 2 GPUs, not run\n");
    GTEST_SKIP() << "NCCL: needs 2 GPUs (NCCL refuses two ranks on one device), not run";
  }
  RunTransfers("nccl", 0, 1);
}

TEST(KvTransportGpu, NcclKilledSenderFailsTheTransfer) {
  if (DeviceCount() < 2) {
    std::printf("NCCL: needs 2 GPUs, not run\n");
    GTEST_SKIP() << "NCCL: needs 2 GPUs (NCCL refuses two ranks on one device), not run";
  }
  RunKilledSender("nccl", 0, 1);
}

// ---- the sender process ------------------------------------------------------------------------

// Source memory spread over several allocations: K of every layer in one, V in another, state
// in a third, so descriptors carry different handles and offsets. Never freed while the sender
// lives: a cuda-ipc receiver keeps them mapped.
struct Sources {
  explicit Sources(const KvGeometry& g) : g(g) {
    cudaMalloc(&k, size_t(g.num_layers) * g.num_blocks * g.block_bytes());
    cudaMalloc(&v, size_t(g.num_layers) * g.num_blocks * g.block_bytes());
    cudaMalloc(&state, size_t(g.num_layers) * g.num_state_slots * 2 * SlotBytes());
  }
  size_t SlotBytes() const { return g.conv_state_bytes + g.ssm_state_bytes; }
  std::byte* Block(int part, int layer, int block) {
    auto* base = static_cast<std::byte*>(part == 0 ? k : v);
    return base + (size_t(layer) * g.num_blocks + block) * g.block_bytes();
  }
  // Deliberately not the receiver's slot layout: an odd offset inside the allocation.
  std::byte* State(int part, int layer, int slot) {
    return static_cast<std::byte*>(state) + (size_t(layer) * g.num_state_slots + slot) * 2 * SlotBytes() +
           8 + (part == 3 ? g.conv_state_bytes : 0);
  }
  KvGeometry g;
  void* k = nullptr;
  void* v = nullptr;
  void* state = nullptr;
};

void Fill(std::byte* dst, const std::vector<std::byte>& bytes) {
  ASSERT_EQ(cudaMemcpy(dst, bytes.data(), bytes.size(), cudaMemcpyHostToDevice), cudaSuccess);
}

absl::Status Finish(KvSender& sender, const std::string& peer, uint64_t id) {
  std::promise<absl::Status> p;
  sender.Finish(peer, id, 0, [&p](absl::Status s) { p.set_value(std::move(s)); });
  std::future<absl::Status> f = p.get_future();
  if (f.wait_for(seconds(60)) != std::future_status::ready) {
    return absl::DeadlineExceededError("Finish's done never ran");
  }
  return f.get();
}

// Sends one KV layer of `t`, then overwrites its source (the contract allows it).
absl::Status SendLayer(KvSender& sender, const std::string& peer, Sources& src, uint64_t id,
                       int layer, const std::vector<int32_t>& blocks) {
  const size_t bb = src.g.block_bytes();
  std::vector<const std::byte*> k, v;
  for (int32_t b : blocks) {
    for (int part : {0, 1}) {
      std::byte* p = src.Block(part, layer, b);
      Fill(p, Pattern(id, layer, b, part, bb));
      (part == 0 ? k : v).push_back(p);
    }
  }
  const absl::Status st = sender.SendLayer(
      peer, {.request_id = id, .attempt = 0, .layer = layer, .dst_blocks = blocks, .k_src = k, .v_src = v});
  for (size_t i = 0; i < blocks.size(); ++i) {
    cudaMemset(const_cast<std::byte*>(k[i]), 0, bb);
    cudaMemset(const_cast<std::byte*>(v[i]), 0, bb);
  }
  cudaDeviceSynchronize();
  return st;
}

absl::Status SendState(KvSender& sender, const std::string& peer, Sources& src, uint64_t id,
                       int layer, int slot) {
  const KvGeometry& g = src.g;
  std::byte* conv = src.State(2, layer, slot);
  std::byte* ssm = src.State(3, layer, slot);
  Fill(conv, Pattern(id, layer, slot, 2, g.conv_state_bytes));
  Fill(ssm, Pattern(id, layer, slot, 3, g.ssm_state_bytes));
  const absl::Status st = sender.SendState(
      peer, {.request_id = id, .attempt = 0, .layer = layer, .dst_slot = slot, .conv_src = conv, .ssm_src = ssm});
  cudaMemset(conv, 0, g.conv_state_bytes);
  cudaMemset(ssm, 0, g.ssm_state_bytes);
  cudaDeviceSynchronize();
  return st;
}

// Run only by the tests above, in a child process (its environment names the receiver).
TEST(KvTransportGpuChild, DISABLED_Sender) {
  const char* peer_env = std::getenv("CLEAVE_KVGPU_PEER");
  const char* device_env = std::getenv("CLEAVE_KVGPU_DEVICE");
  const char* plan_env = std::getenv("CLEAVE_KVGPU_PLAN");
  ASSERT_TRUE(peer_env && device_env && plan_env) << "run only as the sender process";
  const std::string peer = peer_env, plan = plan_env;
  const int device = std::atoi(device_env);
  const bool ipc = peer.rfind("cuda-ipc://", 0) == 0;
  CUDA_OK(cudaSetDevice(device));

  TransportOptions o;
  o.geometry = Geometry();
  o.geometry.num_blocks = 0;  // the receiver's pool: it checks the ids
  o.geometry.num_state_slots = 0;
  o.cuda_device = device;
  o.secret = kSecret;
  o.io_timeout_ms = 20000;
  std::unique_ptr<KvSender> sender = CreateKvSender(o);
  Sources src(o.geometry);
  ASSERT_TRUE(src.k && src.v && src.state) << "cudaMalloc failed";

  if (plan == "stall") {
    ASSERT_TRUE(SendLayer(*sender, peer, src, kStalledId, kKvLayers[0], kStalledBlocks).ok());
    std::printf("SENT\n");
    std::fflush(stdout);
    std::this_thread::sleep_for(seconds(300));  // until the parent kills us
    return;
  }
  for (const Planned& t : Plan()) {
    SCOPED_TRACE("request " + std::to_string(t.id));
    if (t.refused) {
      const absl::Status st = SendLayer(*sender, peer, src, t.id, kKvLayers[0], t.sent);
      // cuda-ipc answers every frame, so the refusal reaches the sender; NCCL (like TCP) tells
      // only the receiver's on_failed.
      if (ipc) {
        EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
        EXPECT_FALSE(Finish(*sender, peer, t.id).ok());
      } else {
        EXPECT_TRUE(st.ok()) << st;
        EXPECT_TRUE(Finish(*sender, peer, t.id).ok());
      }
      continue;
    }
    for (int layer : kKvLayers) {
      const absl::Status st = SendLayer(*sender, peer, src, t.id, layer, t.sent);
      EXPECT_TRUE(st.ok()) << "layer " << layer << ": " << st;
    }
    for (int layer : kStateLayers) {
      const absl::Status st = SendState(*sender, peer, src, t.id, layer, t.slot);
      EXPECT_TRUE(st.ok()) << "state layer " << layer << ": " << st;
    }
    const absl::Status done = Finish(*sender, peer, t.id);
    EXPECT_TRUE(done.ok()) << done;
  }
  std::printf("sender done\n");
}

}  // namespace
}  // namespace cleave::transport
