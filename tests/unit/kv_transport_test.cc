// The KV transport contract (cleave/transport/kv_transport.h), run against every backend:
// TCP over loopback and inproc://. Wire-level attacks on the TCP receiver live in
// kv_transport_tcp_test.cc.
//
// Negative checks ("nothing was written", "no callback ran") are made after a later good
// transfer has completed over the same sender: TCP delivers one peer's frames in order, so by
// then every earlier frame has been handled.
#include "cleave/transport/kv_transport.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <random>
#include <thread>

#include "unit/kv_transport_test_util.h"

namespace cleave::transport {
namespace {

using namespace testing_util;  // NOLINT: test helpers only

enum class Backend { kTcp, kInproc };

class KvTransportTest : public ::testing::TestWithParam<Backend> {
 protected:
  void SetUp() override {
    geometry_ = TestGeometry(/*num_layers=*/3, /*num_blocks=*/1024);
    store_ = std::make_unique<TestStore>(geometry_);
    options_.geometry = geometry_;
    options_.connect_timeout_ms = 2000;
    options_.io_timeout_ms = 5000;
    receiver_ = MakeReceiver(*store_);
    ASSERT_NE(receiver_, nullptr);
    peer_ = receiver_->address();
    sender_ = CreateKvSender(options_);
  }

  // Starts over with another geometry: a new store, receiver and sender.
  void UseGeometry(const KvGeometry& g) {
    sender_.reset();
    receiver_.reset();
    geometry_ = g;
    store_ = std::make_unique<TestStore>(geometry_);
    options_.geometry = geometry_;
    receiver_ = MakeReceiver(*store_);
    ASSERT_NE(receiver_, nullptr);
    peer_ = receiver_->address();
    sender_ = CreateKvSender(options_);
  }

  std::unique_ptr<KvReceiver> MakeReceiver(TestStore& store, int port = 0) {
    static std::atomic<int> counter{0};
    TransportOptions o = options_;
    o.listen_port = port;
    const std::string listen = GetParam() == Backend::kTcp
                                   ? "tcp"
                                   : "inproc://kv-test-" + std::to_string(counter.fetch_add(1));
    auto r = CreateKvReceiver(listen, o, store, events_.Callbacks());
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? std::move(*r) : nullptr;
  }

  // Expect, every layer, Finish; then waits for on_ready and checks the bytes.
  void RunGoodTransfer(uint64_t request_id, const std::vector<int32_t>& blocks, uint64_t seed) {
    receiver_->Expect(request_id, 0, blocks);
    for (int layer = 0; layer < geometry_.num_layers; ++layer) {
      ASSERT_TRUE(
          SendOneLayer(*sender_, peer_, geometry_, request_id, 0, layer, blocks, seed).ok());
    }
    ASSERT_TRUE(FinishAndWait(*sender_, peer_, request_id, 0).ok());
    ASSERT_TRUE(events_.WaitReady(request_id, 0));
    for (int layer = 0; layer < geometry_.num_layers; ++layer) {
      EXPECT_TRUE(LayerMatches(*store_, seed, layer, blocks)) << "layer " << layer;
    }
  }

  // Expect (with a state slot), every layer of either kind in a mixed order, Finish; then waits
  // for on_ready and checks the bytes of every KV layer and every state layer.
  void RunGoodHybridTransfer(uint64_t request_id, const std::vector<int32_t>& blocks, int slot,
                             uint64_t seed) {
    receiver_->Expect(request_id, 0, blocks, slot);
    for (int i = 0; i < geometry_.num_layers; ++i) {
      const int layer = geometry_.num_layers - 1 - i;  // last layer first
      const absl::Status st =
          geometry_.is_state_layer(layer)
              ? SendOneState(*sender_, peer_, geometry_, request_id, 0, layer, slot, seed)
              : SendOneLayer(*sender_, peer_, geometry_, request_id, 0, layer, blocks, seed);
      ASSERT_TRUE(st.ok()) << "layer " << layer << ": " << st;
    }
    ASSERT_TRUE(FinishAndWait(*sender_, peer_, request_id, 0).ok());
    ASSERT_TRUE(events_.WaitReady(request_id, 0));
    for (int layer : KvLayers(geometry_)) {
      EXPECT_TRUE(LayerMatches(*store_, seed, layer, blocks)) << "layer " << layer;
    }
    for (int layer : StateLayers(geometry_)) {
      EXPECT_TRUE(StateMatches(*store_, seed, layer, slot)) << "state layer " << layer;
    }
  }

  // Every state layer's `slots` hold nothing written.
  bool SlotsUntouched(const std::vector<int>& slots) {
    for (int layer : StateLayers(geometry_)) {
      for (int slot : slots) {
        if (!store_->StateUntouched(layer, slot)) return false;
      }
    }
    return true;
  }

  bool BlocksUntouched(const std::vector<int32_t>& blocks, int first_layer = 0) {
    for (int layer = first_layer; layer < geometry_.num_layers; ++layer) {
      for (int32_t b : blocks) {
        if (!store_->BlockUntouched(layer, false, b) || !store_->BlockUntouched(layer, true, b)) {
          return false;
        }
      }
    }
    return true;
  }

  bool tcp() const { return GetParam() == Backend::kTcp; }

  // Destruction order matters: sender, then receiver (it calls into events_ and store_).
  KvGeometry geometry_;
  TransportOptions options_;
  Events events_;
  std::unique_ptr<TestStore> store_;
  std::unique_ptr<KvReceiver> receiver_;
  std::string peer_;
  std::unique_ptr<KvSender> sender_;
};

TEST_P(KvTransportTest, MultiLayerTransferArrivesByteExact) {
  const std::vector<int32_t> blocks = {5, 9, 17, 2, 40};
  receiver_->Expect(1, 0, blocks);
  // Layers out of order, and layer 1 split over two frames.
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 2, blocks, 11).ok());
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 0, blocks, 11).ok());
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 1, {17, 5}, 11).ok());
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 1, {2, 40, 9}, 11).ok());
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 1, 0).ok());
  ASSERT_TRUE(events_.WaitReady(1, 0));
  for (int layer = 0; layer < geometry_.num_layers; ++layer) {
    EXPECT_TRUE(LayerMatches(*store_, 11, layer, blocks)) << "layer " << layer;
  }
  // A second finish for the same transfer is a late frame, not a second on_ready.
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 1, 0).ok());
  RunGoodTransfer(2, {100, 101}, 12);
  EXPECT_EQ(events_.ReadyCount(1, 0), 1);
  EXPECT_EQ(events_.FailedCount(1, 0), 0);
  std::vector<int32_t> others;
  for (int32_t b = 0; b < geometry_.num_blocks; ++b) {
    if (std::find(blocks.begin(), blocks.end(), b) == blocks.end() && b != 100 && b != 101) {
      others.push_back(b);
    }
  }
  EXPECT_TRUE(BlocksUntouched(others));
}

TEST_P(KvTransportTest, EmptyAgreementIsReadyOnFinish) {
  receiver_->Expect(3, 2, {});  // e.g. a full prefix-cache hit: nothing to move
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 3, 2).ok());
  EXPECT_TRUE(events_.WaitReady(3, 2));
}

TEST_P(KvTransportTest, UnagreedBlockIsRefused) {
  receiver_->Expect(1, 0, {1, 2});
  const absl::Status st = SendOneLayer(*sender_, peer_, geometry_, 1, 0, 0, {1, 3}, 21);
  // TCP can only tell the receiver; inproc runs on the caller's thread and says so.
  EXPECT_EQ(st.code(), tcp() ? absl::StatusCode::kOk : absl::StatusCode::kInvalidArgument) << st;
  const auto why = events_.WaitFailed(1, 0);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("not agreed"), std::string::npos) << *why;
  EXPECT_TRUE(store_->AllUntouched());

  // The transfer is forgotten: its later frames are dropped, its finish is ignored.
  EXPECT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 1, {1, 2}, 21).ok());
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 1, 0).ok());
  RunGoodTransfer(2, {4, 5}, 22);
  EXPECT_TRUE(BlocksUntouched({1, 2, 3}));
  EXPECT_EQ(events_.FailedCount(1, 0), 1);
  EXPECT_EQ(events_.ReadyCount(1, 0), 0);
}

TEST_P(KvTransportTest, BadLayerSendsAreRefusedAtTheSender) {
  receiver_->Expect(1, 0, {1});
  for (int layer : {-1, 3, 1000}) {
    const absl::Status st = SendOneLayer(*sender_, peer_, geometry_, 1, 0, layer, {1}, 31);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << "layer " << layer << ": " << st;
  }
  // Mismatched spans and a null source.
  std::vector<std::byte> blk(geometry_.block_bytes());
  const std::vector<int32_t> two = {1, 2};
  const std::vector<const std::byte*> one_ptr = {blk.data()};
  const std::vector<const std::byte*> null_ptrs = {blk.data(), nullptr};
  KvLayerSend bad{.request_id = 1, .dst_blocks = two, .k_src = one_ptr, .v_src = one_ptr};
  EXPECT_EQ(sender_->SendLayer(peer_, bad).code(), absl::StatusCode::kInvalidArgument);
  bad.k_src = null_ptrs;
  bad.v_src = null_ptrs;
  EXPECT_EQ(sender_->SendLayer(peer_, bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(store_->AllUntouched());
  EXPECT_EQ(events_.FailedCount(1, 0), 0);  // nothing reached the receiver
}

TEST_P(KvTransportTest, UnexpectedRequestIsDiscarded) {
  // Never expected, and expected under another attempt: both are late frames, not errors.
  receiver_->Expect(9, 1, {7, 8});
  EXPECT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 8, 0, 0, {1, 2}, 41).ok());
  EXPECT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 9, 0, 0, {7, 8}, 41).ok());
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 8, 0).ok());
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 9, 0).ok());
  RunGoodTransfer(10, {20, 21}, 42);
  EXPECT_TRUE(BlocksUntouched({1, 2, 7, 8}));
  EXPECT_EQ(events_.FailedCount(8, 0) + events_.FailedCount(9, 0) + events_.FailedCount(9, 1), 0);
  EXPECT_EQ(events_.ReadyCount(8, 0) + events_.ReadyCount(9, 0) + events_.ReadyCount(9, 1), 0);
}

TEST_P(KvTransportTest, ForgetMidTransferDiscardsLateFrames) {
  const std::vector<int32_t> blocks = {4, 5, 6};
  receiver_->Expect(3, 0, blocks);
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 3, 0, 0, blocks, 51).ok());
  receiver_->Forget(3, 0);  // cancelled: once this returns nothing more lands for it
  EXPECT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 3, 0, 1, blocks, 51).ok());
  EXPECT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 3, 0, 2, blocks, 51).ok());
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 3, 0).ok());
  RunGoodTransfer(4, {30, 31}, 52);
  EXPECT_TRUE(BlocksUntouched(blocks, /*first_layer=*/1));
  EXPECT_EQ(events_.ReadyCount(3, 0), 0);
  EXPECT_EQ(events_.FailedCount(3, 0), 0);
}

TEST_P(KvTransportTest, ForgetAllDropsEveryAgreement) {
  // The worker lost its scheduler: nothing agreed before may land once it re-registers.
  receiver_->Expect(3, 0, {4, 5});
  receiver_->Expect(6, 0, {9});
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 3, 0, 0, {4, 5}, 61).ok());
  receiver_->ForgetAll();
  EXPECT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 3, 0, 1, {4, 5}, 61).ok());
  EXPECT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 6, 0, 0, {9}, 61).ok());
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 3, 0).ok());
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 6, 0).ok());
  RunGoodTransfer(7, {30, 31}, 62);
  EXPECT_TRUE(BlocksUntouched({4, 5}, /*first_layer=*/1));
  EXPECT_TRUE(BlocksUntouched({9}));
  EXPECT_EQ(events_.ReadyCount(3, 0) + events_.ReadyCount(6, 0), 0);
}

TEST_P(KvTransportTest, UnknownTransferStallsItsConnectionOnlyOnce) {
  // Frames of a transfer this receiver never agreed to (an ExpectKv lost with a scheduler, a
  // healed partition) wait for the agreement once; the rest of them are dropped at once, so the
  // transfers queued behind them on the same connection are not held for a wait per frame.
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t layer = 0; layer < static_cast<uint64_t>(geometry_.num_layers); ++layer) {
    ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 11, 0, layer, {1, 2}, 63).ok());
  }
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 11, 0).ok());
  RunGoodTransfer(12, {20, 21}, 64);
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(took, 2.0 * geometry_.num_layers) << "every unknown frame waited for an agreement";
  EXPECT_TRUE(BlocksUntouched({1, 2}));
  EXPECT_EQ(events_.ReadyCount(11, 0) + events_.FailedCount(11, 0), 0);
}

TEST_P(KvTransportTest, IncompleteTransferFailsOnFinish) {
  receiver_->Expect(5, 0, {1, 2, 3});
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 5, 0, 0, {1, 2, 3}, 61).ok());
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 5, 0, 1, {1, 2}, 61).ok());
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 5, 0).ok());
  const auto why = events_.WaitFailed(5, 0);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("incomplete"), std::string::npos) << *why;
  EXPECT_EQ(events_.ReadyCount(5, 0), 0);
}

TEST_P(KvTransportTest, GeometryMismatchIsRefused) {
  receiver_->Expect(1, 0, {1});
  for (auto change :
       {+[](KvGeometry& g) { g.num_layers = 4; }, +[](KvGeometry& g) { g.head_dim = 16; }}) {
    TransportOptions bad = options_;
    change(bad.geometry);
    std::unique_ptr<KvSender> s = CreateKvSender(bad);
    const absl::Status st = SendOneLayer(*s, peer_, bad.geometry, 1, 0, 0, {1}, 71);
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    EXPECT_NE(st.message().find("mismatch"), std::string::npos) << st;
    EXPECT_FALSE(FinishAndWait(*s, peer_, 1, 0).ok());
  }
  EXPECT_TRUE(store_->AllUntouched());
  RunGoodTransfer(1, {1}, 72);  // the agreement was never touched by the refused senders
}

TEST_P(KvTransportTest, ReceiverGoneFailsTheSenderAndALaterOneIsReached) {
  receiver_->Expect(1, 0, {1, 2});
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 0, {1, 2}, 81).ok());
  const std::string old_peer = peer_;
  receiver_.reset();  // the peer dies mid-transfer
  (void)SendOneLayer(*sender_, peer_, geometry_, 1, 0, 1, {1, 2}, 81);  // may fail already
  const absl::Status st = FinishAndWait(*sender_, peer_, 1, 0);
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.code(), absl::StatusCode::kDeadlineExceeded) << "hung: " << st;

  // A receiver back at the same address is reached again (TCP re-dials).
  int port = 0;
  if (tcp()) port = std::stoi(old_peer.substr(old_peer.rfind(':') + 1));
  store_ = std::make_unique<TestStore>(geometry_);
  if (tcp()) {
    receiver_ = MakeReceiver(*store_, port);
  } else {
    auto r = CreateKvReceiver(old_peer, options_, *store_, events_.Callbacks());
    ASSERT_TRUE(r.ok()) << r.status();
    receiver_ = std::move(*r);
  }
  ASSERT_NE(receiver_, nullptr);
  ASSERT_EQ(receiver_->address(), old_peer);
  RunGoodTransfer(2, {3, 4}, 82);
}

TEST_P(KvTransportTest, TinyQueueStillDeliversEverything) {
  options_.max_queued_bytes_per_peer = 1;  // every frame waits for the one before it
  sender_ = CreateKvSender(options_);
  for (uint64_t r = 1; r <= 5; ++r) RunGoodTransfer(r, {static_cast<int32_t>(r), 200}, 90 + r);
}

TEST_P(KvTransportTest, ManyConcurrentTransfersFromTwoThreads) {
  constexpr int kPerThread = 100;
  constexpr int kBlocksPer = 4;
  std::atomic<int> done_ok{0}, done_err{0};
  auto run = [&](int t) {
    std::mt19937 rng(1234 + t);
    for (int i = 0; i < kPerThread; ++i) {
      const uint64_t req = 1000u * (t + 1) + i;
      const int base = (t * kPerThread + i) * kBlocksPer;
      std::vector<int32_t> blocks = {base + 3, base, base + 2, base + 1};
      receiver_->Expect(req, 0, blocks);
      std::vector<int> layers = {0, 1, 2};
      std::shuffle(layers.begin(), layers.end(), rng);
      for (int layer : layers) {
        ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, req, 0, layer, blocks, req).ok());
      }
      sender_->Finish(peer_, req, 0, [&](absl::Status s) { (s.ok() ? done_ok : done_err)++; });
    }
  };
  std::thread a(run, 0), b(run, 1);
  a.join();
  b.join();
  for (int t = 0; t < 2; ++t) {
    for (int i = 0; i < kPerThread; ++i) {
      const uint64_t req = 1000u * (t + 1) + i;
      ASSERT_TRUE(events_.WaitReady(req, 0)) << req;
      const int base = (t * kPerThread + i) * kBlocksPer;
      for (int layer = 0; layer < 3; ++layer) {
        EXPECT_TRUE(LayerMatches(*store_, req, layer, {base, base + 1, base + 2, base + 3})) << req;
      }
    }
  }
  EXPECT_EQ(events_.TotalReady(), 2 * kPerThread);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (done_ok + done_err < 2 * kPerThread && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(5));
  }
  EXPECT_EQ(done_ok.load(), 2 * kPerThread);
  EXPECT_EQ(done_err.load(), 0);
  sender_.reset();  // its callbacks point at this frame's counters
}

// ---- Mamba state (hybrid and pure-state geometries) ----

TEST_P(KvTransportTest, HybridTransferLandsByteExactInTheAgreedSlot) {
  UseGeometry(HybridGeometry(/*num_blocks=*/64, /*num_state_slots=*/8));
  const std::vector<int32_t> blocks = {3, 9, 12};
  receiver_->Expect(1, 0, blocks, /*state_slot=*/5);
  // Kinds interleaved, KV layer 1 split over two frames.
  ASSERT_TRUE(SendOneState(*sender_, peer_, geometry_, 1, 0, 2, 5, 11).ok());
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 3, blocks, 11).ok());
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 1, {12}, 11).ok());
  ASSERT_TRUE(SendOneState(*sender_, peer_, geometry_, 1, 0, 0, 5, 11).ok());
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 1, {3, 9}, 11).ok());
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 1, 0).ok());
  ASSERT_TRUE(events_.WaitReady(1, 0));
  for (int layer : {1, 3}) EXPECT_TRUE(LayerMatches(*store_, 11, layer, blocks)) << layer;
  for (int layer : {0, 2}) EXPECT_TRUE(StateMatches(*store_, 11, layer, 5)) << layer;

  RunGoodHybridTransfer(2, {20}, 6, 12);
  EXPECT_TRUE(StateMatches(*store_, 11, 0, 5));  // the earlier slot is left alone
  EXPECT_TRUE(SlotsUntouched({0, 1, 2, 3, 4, 7}));
  std::vector<int32_t> all, others;
  for (int32_t b = 0; b < geometry_.num_blocks; ++b) {
    all.push_back(b);
    if (b != 3 && b != 9 && b != 12 && b != 20) others.push_back(b);
  }
  EXPECT_TRUE(BlocksUntouched(others));
  for (int layer : {0, 2}) {  // a state layer's KV pool is never written
    for (int32_t b : all) {
      EXPECT_TRUE(store_->BlockUntouched(layer, false, b) && store_->BlockUntouched(layer, true, b))
          << "layer " << layer << " block " << b;
    }
  }
  EXPECT_EQ(events_.FailedCount(1, 0) + events_.FailedCount(2, 0), 0);
}

TEST_P(KvTransportTest, PureStateTransferNeedsOnlyState) {
  UseGeometry(PureStateGeometry(/*num_state_slots=*/4));
  ASSERT_EQ(geometry_.block_bytes(), 0u);
  RunGoodHybridTransfer(1, {}, 2, 21);
  EXPECT_TRUE(SlotsUntouched({0, 1, 3}));
  // Blocks in the agreement mean nothing without KV layers: state alone completes it.
  RunGoodHybridTransfer(2, {7, 8}, 3, 22);
  EXPECT_TRUE(StateMatches(*store_, 21, 1, 2));
  // No slot agreed: nothing to wait for.
  receiver_->Expect(3, 0, {});
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 3, 0).ok());
  EXPECT_TRUE(events_.WaitReady(3, 0));
  // A LAYER send has nowhere to go.
  std::vector<std::byte> blk(16);
  const std::vector<int32_t> one = {0};
  const std::vector<const std::byte*> ptr = {blk.data()};
  const KvLayerSend layer{
      .request_id = 4, .layer = 0, .dst_blocks = one, .k_src = ptr, .v_src = ptr};
  EXPECT_EQ(sender_->SendLayer(peer_, layer).code(), absl::StatusCode::kInvalidArgument);

  // An unused KV shape differing between the two ends is no mismatch.
  TransportOptions other = options_;
  other.geometry.block_size = 16, other.geometry.num_kv_heads = 4, other.geometry.head_dim = 64;
  sender_ = CreateKvSender(other);
  RunGoodHybridTransfer(5, {}, 0, 23);
}

TEST_P(KvTransportTest, ReadyOnlyAfterEveryStateLayerAndFinish) {
  UseGeometry(HybridGeometry());
  receiver_->Expect(1, 0, {4}, 1);
  for (int layer : {1, 3})
    ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 1, 0, layer, {4}, 31).ok());
  ASSERT_TRUE(SendOneState(*sender_, peer_, geometry_, 1, 0, 0, 1, 31).ok());
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(events_.ReadyCount(1, 0), 0);
  ASSERT_TRUE(SendOneState(*sender_, peer_, geometry_, 1, 0, 2, 1, 31).ok());
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(events_.ReadyCount(1, 0), 0);  // everything is there, but no finish yet
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 1, 0).ok());
  ASSERT_TRUE(events_.WaitReady(1, 0));

  // A state layer missing at finish fails the transfer, as a missing block does.
  receiver_->Expect(2, 0, {5}, 2);
  for (int layer : {1, 3})
    ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 2, 0, layer, {5}, 32).ok());
  ASSERT_TRUE(SendOneState(*sender_, peer_, geometry_, 2, 0, 2, 2, 32).ok());
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 2, 0).ok());
  const auto why = events_.WaitFailed(2, 0);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("incomplete"), std::string::npos) << *why;
  EXPECT_NE(why->find("1 of 2 state layers"), std::string::npos) << *why;
  EXPECT_EQ(events_.ReadyCount(2, 0), 0);

  // So do missing blocks when every state layer arrived.
  receiver_->Expect(3, 0, {6}, 3);
  ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 3, 0, 1, {6}, 33).ok());
  for (int layer : {0, 2})
    ASSERT_TRUE(SendOneState(*sender_, peer_, geometry_, 3, 0, layer, 3, 33).ok());
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 3, 0).ok());
  ASSERT_TRUE(events_.WaitFailed(3, 0).has_value());

  // Without a slot in the agreement, the KV layers alone complete a hybrid transfer.
  receiver_->Expect(4, 0, {7});
  for (int layer : {1, 3})
    ASSERT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 4, 0, layer, {7}, 34).ok());
  ASSERT_TRUE(FinishAndWait(*sender_, peer_, 4, 0).ok());
  EXPECT_TRUE(events_.WaitReady(4, 0));
}

TEST_P(KvTransportTest, BadStateFramesAreRefusedAndTheReceiverCarriesOn) {
  UseGeometry(HybridGeometry());
  const auto refused = tcp() ? absl::StatusCode::kOk : absl::StatusCode::kInvalidArgument;
  // A slot other than the agreed one.
  receiver_->Expect(1, 0, {1}, 2);
  absl::Status st = SendOneState(*sender_, peer_, geometry_, 1, 0, 0, 3, 41);
  EXPECT_EQ(st.code(), refused) << st;
  auto why = events_.WaitFailed(1, 0);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("state slot 3 was not agreed"), std::string::npos) << *why;
  // Forgotten: its later frames (even good ones) land nowhere, its finish is ignored.
  EXPECT_TRUE(SendOneState(*sender_, peer_, geometry_, 1, 0, 2, 2, 41).ok());
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 1, 0).ok());

  // State for a transfer that agreed no slot.
  receiver_->Expect(2, 0, {1});
  st = SendOneState(*sender_, peer_, geometry_, 2, 0, 0, 0, 42);
  EXPECT_EQ(st.code(), refused) << st;
  why = events_.WaitFailed(2, 0);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("no state slot"), std::string::npos) << *why;

  // A slot the receiver's pool does not have (the sender names no pool size).
  TransportOptions poolless = options_;
  poolless.geometry.num_state_slots = 0;
  std::unique_ptr<KvSender> s = CreateKvSender(poolless);
  receiver_->Expect(3, 0, {1}, 4);
  st = SendOneState(*s, peer_, geometry_, 3, 0, 0, 8, 43);
  EXPECT_EQ(st.code(), refused) << st;
  why = events_.WaitFailed(3, 0);
  ASSERT_TRUE(why.has_value());
  EXPECT_NE(why->find("out of range"), std::string::npos) << *why;
  EXPECT_TRUE(FinishAndWait(*s, peer_, 3, 0).ok());

  // Not expected (any more): dropped silently.
  receiver_->Expect(4, 0, {1}, 5);
  receiver_->Forget(4, 0);
  EXPECT_TRUE(SendOneState(*sender_, peer_, geometry_, 4, 0, 0, 5, 44).ok());
  EXPECT_TRUE(SendOneState(*sender_, peer_, geometry_, 5, 0, 0, 6, 45).ok());  // never expected
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 4, 0).ok());
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 5, 0).ok());

  EXPECT_TRUE(store_->AllUntouched());
  RunGoodHybridTransfer(10, {30, 31}, 7, 46);
  EXPECT_TRUE(SlotsUntouched({0, 1, 2, 3, 4, 5, 6}));
  for (uint64_t r = 1; r <= 5; ++r) {
    EXPECT_EQ(events_.ReadyCount(r, 0), 0) << r;
    EXPECT_EQ(events_.FailedCount(r, 0), r <= 3 ? 1 : 0) << r;
  }
}

TEST_P(KvTransportTest, BadStateSendsAreRefusedAtTheSender) {
  UseGeometry(HybridGeometry());
  receiver_->Expect(1, 0, {1}, 1);
  for (int layer : {-1, 1, 3, 4, 1000}) {  // out of range, or a KV layer
    const absl::Status st = SendOneState(*sender_, peer_, geometry_, 1, 0, layer, 1, 51);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << "layer " << layer << ": " << st;
  }
  for (int slot : {-1, 8, 1 << 30}) {
    const absl::Status st = SendOneState(*sender_, peer_, geometry_, 1, 0, 0, slot, 51);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << "slot " << slot << ": " << st;
  }
  std::vector<std::byte> buf(1024);
  KvStateSend null_src{.request_id = 1, .layer = 0, .dst_slot = 1, .ssm_src = buf.data()};
  EXPECT_EQ(sender_->SendState(peer_, null_src).code(), absl::StatusCode::kInvalidArgument);
  null_src.conv_src = buf.data(), null_src.ssm_src = nullptr;
  EXPECT_EQ(sender_->SendState(peer_, null_src).code(), absl::StatusCode::kInvalidArgument);
  // KV data for a state layer.
  EXPECT_EQ(SendOneLayer(*sender_, peer_, geometry_, 1, 0, 0, {1}, 51).code(),
            absl::StatusCode::kInvalidArgument);
  // A sender of a model without state has no state layer to send.
  TransportOptions kv_only = options_;
  kv_only.geometry = TestGeometry(4, 64);
  std::unique_ptr<KvSender> s = CreateKvSender(kv_only);
  EXPECT_EQ(SendOneState(*s, peer_, geometry_, 1, 0, 0, 1, 51).code(),
            absl::StatusCode::kInvalidArgument);
  // A geometry claiming state layers without a state size is unusable.
  TransportOptions sizeless = options_;
  sizeless.geometry.conv_state_bytes = sizeless.geometry.ssm_state_bytes = 0;
  s = CreateKvSender(sizeless);
  KvStateSend any{
      .request_id = 1, .layer = 0, .dst_slot = 1, .conv_src = buf.data(), .ssm_src = buf.data()};
  EXPECT_EQ(s->SendState(peer_, any).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(store_->AllUntouched());
  EXPECT_EQ(events_.FailedCount(1, 0), 0);  // nothing reached the receiver
  RunGoodHybridTransfer(1, {1}, 1, 52);     // the agreement is intact
}

TEST_P(KvTransportTest, StateLayoutMismatchIsRefused) {
  UseGeometry(HybridGeometry());
  receiver_->Expect(1, 0, {1}, 1);
  // Other state layers (same count, more, none), other conv or SSM sizes, an extra layer.
  std::vector<KvGeometry> others(6, geometry_);
  others[0].state_layers = {0, 1, 0, 1};
  others[1].state_layers = {1, 1, 1, 0};
  others[2].state_layers.clear();
  others[3].conv_state_bytes += 4;
  others[4].ssm_state_bytes -= 8;
  others[5].num_layers = 5, others[5].state_layers.push_back(1);
  for (const KvGeometry& other : others) {
    TransportOptions bad = options_;
    bad.geometry = other;
    std::unique_ptr<KvSender> s = CreateKvSender(bad);
    const int kv_layer = KvLayers(bad.geometry).front();
    absl::Status st = SendOneLayer(*s, peer_, bad.geometry, 1, 0, kv_layer, {1}, 61);
    EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    EXPECT_NE(st.message().find("mismatch"), std::string::npos) << st;
    if (!StateLayers(bad.geometry).empty()) {
      st = SendOneState(*s, peer_, bad.geometry, 1, 0, StateLayers(bad.geometry).front(), 1, 61);
      EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition) << st;
    }
    EXPECT_FALSE(FinishAndWait(*s, peer_, 1, 0).ok());
  }
  EXPECT_TRUE(store_->AllUntouched());
  EXPECT_EQ(events_.FailedCount(1, 0), 0);
  RunGoodHybridTransfer(1, {1}, 1, 62);
}

TEST_P(KvTransportTest, ForgetMidTransferDiscardsLateStateFrames) {
  UseGeometry(HybridGeometry());
  receiver_->Expect(3, 0, {4}, 1);
  ASSERT_TRUE(SendOneState(*sender_, peer_, geometry_, 3, 0, 0, 1, 71).ok());
  receiver_->Forget(3, 0);  // from here the slot may belong to another request
  EXPECT_TRUE(SendOneState(*sender_, peer_, geometry_, 3, 0, 2, 1, 71).ok());
  EXPECT_TRUE(SendOneLayer(*sender_, peer_, geometry_, 3, 0, 1, {4}, 71).ok());
  EXPECT_TRUE(FinishAndWait(*sender_, peer_, 3, 0).ok());
  RunGoodHybridTransfer(4, {30}, 2, 72);
  EXPECT_TRUE(store_->StateUntouched(2, 1));
  EXPECT_TRUE(store_->BlockUntouched(1, false, 4) && store_->BlockUntouched(1, true, 4));
  EXPECT_EQ(events_.ReadyCount(3, 0) + events_.FailedCount(3, 0), 0);
}

TEST_P(KvTransportTest, HybridTransfersFromTwoThreadsThroughATinyQueue) {
  constexpr int kPerThread = 40;
  UseGeometry(HybridGeometry(/*num_blocks=*/256, /*num_state_slots=*/2 * kPerThread));
  for (size_t queue : {size_t{1}, size_t{64} << 20}) {  // queued-only, then mostly direct
    options_.max_queued_bytes_per_peer = queue;
    sender_ = CreateKvSender(options_);
    store_->Reset();
    auto run = [&](int t) {
      for (int i = 0; i < kPerThread; ++i) {
        const uint64_t req = 1000u * (t + 1) + i + (queue == 1 ? 0 : 100);
        const int slot = t * kPerThread + i;
        const std::vector<int32_t> blocks = {2 * slot + 1, 2 * slot};
        receiver_->Expect(req, 0, blocks, slot);
        for (int layer : {2, 1, 0, 3}) {
          const absl::Status st =
              geometry_.is_state_layer(layer)
                  ? SendOneState(*sender_, peer_, geometry_, req, 0, layer, slot, req)
                  : SendOneLayer(*sender_, peer_, geometry_, req, 0, layer, blocks, req);
          ASSERT_TRUE(st.ok()) << st;
        }
        sender_->Finish(peer_, req, 0, [](absl::Status s) { EXPECT_TRUE(s.ok()) << s; });
      }
    };
    std::thread a(run, 0), b(run, 1);
    a.join();
    b.join();
    for (int t = 0; t < 2; ++t) {
      for (int i = 0; i < kPerThread; ++i) {
        const uint64_t req = 1000u * (t + 1) + i + (queue == 1 ? 0 : 100);
        const int slot = t * kPerThread + i;
        ASSERT_TRUE(events_.WaitReady(req, 0)) << req;
        for (int layer : {1, 3}) {
          EXPECT_TRUE(LayerMatches(*store_, req, layer, {2 * slot, 2 * slot + 1})) << req;
        }
        for (int layer : {0, 2}) EXPECT_TRUE(StateMatches(*store_, req, layer, slot)) << req;
      }
    }
  }
  sender_.reset();  // flushes every pending done callback
}

INSTANTIATE_TEST_SUITE_P(Backends, KvTransportTest,
                         ::testing::Values(Backend::kTcp, Backend::kInproc), [](const auto& info) {
                           return info.param == Backend::kTcp ? "Tcp" : "Inproc";
                         });

}  // namespace
}  // namespace cleave::transport
