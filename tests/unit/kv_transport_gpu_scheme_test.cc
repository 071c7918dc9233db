// The nccl:// and cuda-ipc:// schemes where no GPU can be used: scheme dispatch on both sides,
// and clean errors (never a crash or a hang) from a build without CUDA ("built without CUDA",
// FailedPrecondition), from a CUDA build on a machine without a device (Unavailable), and from
// missing device settings (FailedPrecondition). The transfers themselves are covered by
// tests/gpu/kv_transport_gpu_test.cc on a GPU machine. On a machine with a GPU, creating a
// receiver succeeds, and the test checks the address it reports instead.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cleave/transport/kv_transport.h"
#include "unit/kv_transport_test_util.h"

namespace cleave::transport {
namespace {

using namespace testing_util;  // NOLINT: test helpers only

// A host store that claims to be device memory: only ever handed to receivers that fail to
// start here, or that start and are never connected to (so nothing is written through it).
class ClaimsDeviceStore : public TestStore {
 public:
  using TestStore::TestStore;
  int cuda_device() const override { return 0; }
};

const char* const kGpuSchemes[] = {"nccl", "cuda-ipc"};

bool MentionsNoCuda(const absl::Status& s) {
  return s.message().find("built without CUDA") != std::string::npos;
}

TEST(KvTransportGpuScheme, HostMemoryStoreIsRefused) {
  TestStore store(TestGeometry());
  for (const char* scheme : kGpuSchemes) {
    SCOPED_TRACE(scheme);
    auto r = CreateKvReceiver(scheme, TransportOptions{}, store, {});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
    if (KvGpuTransportsBuilt()) {
      EXPECT_NE(r.status().message().find("cuda_device"), std::string::npos) << r.status();
    } else {
      EXPECT_TRUE(MentionsNoCuda(r.status())) << r.status();
    }
  }
}

TEST(KvTransportGpuScheme, DeviceStoreNeedsCudaAndADevice) {
  ClaimsDeviceStore store(TestGeometry());
  for (const char* scheme : kGpuSchemes) {
    SCOPED_TRACE(scheme);
    auto r = CreateKvReceiver(scheme, TransportOptions{}, store, {});
    if (!KvGpuTransportsBuilt()) {
      ASSERT_FALSE(r.ok());
      EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
      EXPECT_TRUE(MentionsNoCuda(r.status())) << r.status();
    } else if (!r.ok()) {
      // A CUDA build on a machine without a usable GPU (driver or device).
      EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
      EXPECT_NE(r.status().message().find("cudaGetDeviceCount"), std::string::npos) << r.status();
    } else {
      // A machine with a GPU: the receiver listens on TCP and names its scheme.
      const std::string address = (*r)->address();
      EXPECT_EQ(address.rfind(std::string(scheme) + "://127.0.0.1:", 0), 0u) << address;
    }
  }
}

TEST(KvTransportGpuScheme, UnknownListenSpecNamesTheChoices) {
  TestStore store(TestGeometry());
  auto r = CreateKvReceiver("rdma", TransportOptions{}, store, {});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  for (const char* word : {"tcp", "nccl", "cuda-ipc", "inproc://"}) {
    EXPECT_NE(r.status().message().find(word), std::string::npos) << r.status();
  }
}

TEST(KvTransportGpuScheme, TcpAddressKeepsNoScheme) {
  TestStore store(TestGeometry());
  auto r = CreateKvReceiver("tcp", TransportOptions{}, store, {});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ((*r)->address().find("://"), std::string::npos) << (*r)->address();
}

// Sender: the scheme is dispatched on the peer's address; each failure is a status on the
// call (SendLayer, SendState, Finish's done), and the TCP path of the same sender still works.
TEST(KvTransportGpuScheme, SenderFailsCleanlyAndTcpStillWorks) {
  const KvGeometry g = HybridGeometry();
  TestStore store(g);
  Events events;
  auto receiver = CreateKvReceiver("tcp", TransportOptions{}, store, events.Callbacks());
  ASSERT_TRUE(receiver.ok()) << receiver.status();

  for (int device : {-1, 0}) {
    TransportOptions o;
    o.geometry = g;
    o.cuda_device = device;
    o.connect_timeout_ms = 500;
    std::unique_ptr<KvSender> sender = CreateKvSender(o);
    for (const char* scheme : kGpuSchemes) {
      SCOPED_TRACE(std::string(scheme) + " device " + std::to_string(device));
      // Port 1: nothing listens there, so even a machine with a GPU fails (to connect).
      const std::string peer = std::string(scheme) + "://127.0.0.1:1";
      const absl::Status layer = SendOneLayer(*sender, peer, g, 1, 0, 1, {3, 4}, 7);
      ASSERT_FALSE(layer.ok());
      const absl::Status state = SendOneState(*sender, peer, g, 1, 0, 0, 2, 7);
      ASSERT_FALSE(state.ok());
      const absl::Status done = FinishAndWait(*sender, peer, 1, 0);
      ASSERT_FALSE(done.ok());
      EXPECT_NE(done.code(), absl::StatusCode::kDeadlineExceeded) << done;  // never hangs
      for (const absl::Status& s : {layer, state, done}) {
        if (!KvGpuTransportsBuilt()) {
          EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
          EXPECT_TRUE(MentionsNoCuda(s)) << s;
          EXPECT_NE(s.message().find(std::string(scheme) + "://"), std::string::npos) << s;
        } else if (device < 0) {
          EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
          EXPECT_NE(s.message().find("cuda_device"), std::string::npos) << s;
        } else {
          // No device here (Unavailable), or a GPU machine where port 1 refuses (Unavailable).
          EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
        }
      }
    }
    // A malformed GPU address is the caller's error whatever the build.
    const absl::Status bad = SendOneLayer(*sender, "nccl://no-port", g, 2, 0, 1, {3}, 7);
    EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument) << bad;

    // The same sender still speaks TCP.
    const uint64_t id = 10 + static_cast<uint64_t>(device + 1);
    (*receiver)->Expect(id, 0, {5, 6}, /*state_slot=*/1);
    for (int layer : KvLayers(g)) {
      ASSERT_TRUE(SendOneLayer(*sender, (*receiver)->address(), g, id, 0, layer, {5, 6}, id).ok());
    }
    for (int layer : StateLayers(g)) {
      ASSERT_TRUE(SendOneState(*sender, (*receiver)->address(), g, id, 0, layer, 1, id).ok());
    }
    ASSERT_TRUE(FinishAndWait(*sender, (*receiver)->address(), id, 0).ok());
    ASSERT_TRUE(events.WaitReady(id, 0));
    for (int layer : KvLayers(g)) EXPECT_TRUE(LayerMatches(store, id, layer, {5, 6}));
    for (int layer : StateLayers(g)) EXPECT_TRUE(StateMatches(store, id, layer, 1));
  }
}

}  // namespace
}  // namespace cleave::transport
