// BlockManager and block hashes: allocation, refcounts, prefix-cache hits by chained hash, LRU
// eviction of cached blocks.
#include <gtest/gtest.h>

#include <vector>

#include "cleave/scheduler/block_hash.h"
#include "cleave/scheduler/block_manager.h"

namespace cleave::scheduler {
namespace {

constexpr int kBs = 4;

std::vector<int32_t> Seq(std::initializer_list<int32_t> v) { return std::vector<int32_t>(v); }

std::vector<uint64_t> Hashes(const std::vector<int32_t>& tokens) {
  std::vector<uint64_t> h;
  ExtendBlockHashes(tokens, kBs, 1 << 20, &h);
  return h;
}

// Allocates a table for `tokens`, caches its full blocks, and frees it: the prefix stays cached.
std::vector<int32_t> CacheSequence(BlockManager& bm, const std::vector<int32_t>& tokens) {
  std::vector<int32_t> table;
  const int n = static_cast<int>(tokens.size()) / kBs;
  EXPECT_TRUE(bm.Allocate({}, n, &table));
  bm.Cache(Hashes(tokens), tokens, table, 0, n);
  bm.Free(table);
  return table;
}

TEST(BlockHashTest, ChainedOverFullBlocksOnly) {
  std::vector<uint64_t> h;
  ExtendBlockHashes(Seq({1, 2, 3, 4, 5, 6}), kBs, 10, &h);
  ASSERT_EQ(h.size(), 1u);  // the partial block is not hashed
  EXPECT_EQ(h[0], HashBlock(kRootBlockHash, Seq({1, 2, 3, 4})));
  ExtendBlockHashes(Seq({1, 2, 3, 4, 5, 6, 7, 8, 9}), kBs, 10, &h);
  ASSERT_EQ(h.size(), 2u);
  EXPECT_EQ(h[1], HashBlock(h[0], Seq({5, 6, 7, 8})));
  // Same tokens, different parent: a different hash.
  EXPECT_NE(HashBlock(kRootBlockHash, Seq({5, 6, 7, 8})), h[1]);
  // Capped by num_blocks.
  std::vector<uint64_t> capped;
  ExtendBlockHashes(Seq({1, 2, 3, 4, 5, 6, 7, 8}), kBs, 1, &capped);
  EXPECT_EQ(capped.size(), 1u);
}

TEST(BlockManagerTest, AllocateAndFreeCount) {
  BlockManager bm(8, kBs);
  EXPECT_EQ(bm.num_free(), 8);
  std::vector<int32_t> a;
  ASSERT_TRUE(bm.Allocate({}, 3, &a));
  EXPECT_EQ(a, Seq({0, 1, 2}));
  EXPECT_EQ(bm.num_free(), 5);
  EXPECT_EQ(bm.num_used(), 3);
  std::vector<int32_t> b;
  EXPECT_FALSE(bm.Allocate({}, 6, &b));  // too many: nothing changes
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(bm.num_free(), 5);
  ASSERT_TRUE(bm.Allocate({}, 5, &b));
  EXPECT_EQ(bm.num_free(), 0);
  bm.Free(a);
  bm.Free(b);
  EXPECT_EQ(bm.num_free(), 8);
  EXPECT_EQ(bm.num_used(), 0);
  EXPECT_EQ(bm.num_cached(), 0);
  EXPECT_EQ(bm.num_bad_frees(), 0);
}

TEST(BlockManagerTest, BadFreeIsCountedNotFatal) {
  BlockManager bm(4, kBs);
  std::vector<int32_t> a;
  ASSERT_TRUE(bm.Allocate({}, 1, &a));
  bm.Free(a);
  bm.Free(a);
  bm.Free(Seq({-1, 99}));
  EXPECT_EQ(bm.num_bad_frees(), 3);
  EXPECT_EQ(bm.num_free(), 4);
}

TEST(BlockManagerTest, PrefixHitSharesBlocksWithRefcounts) {
  BlockManager bm(8, kBs);
  const auto tokens = Seq({1, 2, 3, 4, 5, 6, 7, 8, 9});
  std::vector<int32_t> first;
  ASSERT_TRUE(bm.Allocate({}, 3, &first));
  bm.Cache(Hashes(tokens), tokens, first, 0, 2);  // two full blocks computed
  EXPECT_EQ(bm.num_cached(), 2);

  std::vector<int32_t> hit;
  EXPECT_EQ(bm.MatchPrefix(Hashes(tokens), tokens, 10, &hit), 2);
  EXPECT_EQ(hit, Seq({first[0], first[1]}));
  EXPECT_EQ(bm.HeadroomAfter(hit, 3), 5 - 1);  // shared blocks are in use: only one new block
  std::vector<int32_t> second;
  ASSERT_TRUE(bm.Allocate(hit, 1, &second));
  EXPECT_EQ(bm.refs(first[0]), 2);
  EXPECT_EQ(bm.num_used(), 4);

  bm.Free(first);
  EXPECT_EQ(bm.refs(first[0]), 1);
  EXPECT_EQ(bm.num_used(), 3);  // the shared two and second's own block
  bm.Free(second);
  EXPECT_EQ(bm.num_used(), 0);
  EXPECT_EQ(bm.num_free(), 8);
  EXPECT_EQ(bm.num_cached(), 2);  // cached with no user: evictable, counted free
  EXPECT_EQ(bm.num_bad_frees(), 0);
}

TEST(BlockManagerTest, MatchIsCappedAndStopsAtFirstMiss) {
  BlockManager bm(8, kBs);
  const auto tokens = Seq({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12});
  CacheSequence(bm, tokens);
  std::vector<int32_t> hit;
  EXPECT_EQ(bm.MatchPrefix(Hashes(tokens), tokens, 2, &hit), 2);
  auto other = tokens;
  other[5] = 99;  // second block differs: the third cannot match either
  hit.clear();
  EXPECT_EQ(bm.MatchPrefix(Hashes(other), other, 10, &hit), 1);
}

TEST(BlockManagerTest, SameTokensAfterDifferentPrefixDoNotHit) {
  BlockManager bm(8, kBs);
  CacheSequence(bm, Seq({1, 2, 3, 4, 5, 6, 7, 8}));
  const auto other = Seq({9, 9, 9, 9, 5, 6, 7, 8});  // block 1 equal, block 0 not
  std::vector<int32_t> hit;
  EXPECT_EQ(bm.MatchPrefix(Hashes(other), other, 10, &hit), 0);
  // Even looked up directly by the block's own content under another parent.
  std::vector<uint64_t> forged = {HashBlock(kRootBlockHash, Seq({9, 9, 9, 9})),
                                  HashBlock(kRootBlockHash, Seq({5, 6, 7, 8}))};
  hit.clear();
  EXPECT_EQ(bm.MatchPrefix(forged, other, 10, &hit), 0);
}

TEST(BlockManagerTest, HashCollisionNeverReturnsWrongBlock) {
  BlockManager bm(8, kBs);
  const auto a = Seq({1, 2, 3, 4});
  const auto b = Seq({5, 6, 7, 8});
  std::vector<int32_t> table;
  ASSERT_TRUE(bm.Allocate({}, 1, &table));
  bm.Cache(Hashes(a), b, table, 0, 1);  // b's tokens stored under a's hash: a forged collision
  bm.Free(table);
  std::vector<int32_t> hit;
  EXPECT_EQ(bm.MatchPrefix(Hashes(a), a, 1, &hit), 0);  // tokens verified
}

TEST(BlockManagerTest, DuplicateCacheKeepsOlderBlock) {
  BlockManager bm(8, kBs);
  const auto tokens = Seq({1, 2, 3, 4});
  std::vector<int32_t> x, y;
  ASSERT_TRUE(bm.Allocate({}, 1, &x));
  ASSERT_TRUE(bm.Allocate({}, 1, &y));
  bm.Cache(Hashes(tokens), tokens, x, 0, 1);
  bm.Cache(Hashes(tokens), tokens, y, 0, 1);  // computed twice, concurrently
  EXPECT_EQ(bm.num_cached(), 1);
  EXPECT_FALSE(bm.is_cached(y[0]));
  bm.Free(x);
  bm.Free(y);
  EXPECT_EQ(bm.num_free(), 8);
  std::vector<int32_t> hit;
  ASSERT_EQ(bm.MatchPrefix(Hashes(tokens), tokens, 1, &hit), 1);
  EXPECT_EQ(hit[0], x[0]);
}

TEST(BlockManagerTest, AllocationTakesNeverUsedFirstThenEvictsLru) {
  BlockManager bm(6, kBs);
  const auto a = Seq({1, 1, 1, 1, 2, 2, 2, 2});
  const auto b = Seq({3, 3, 3, 3, 4, 4, 4, 4});
  const auto ta = CacheSequence(bm, a);  // blocks 0,1; freed first: least recently used
  const auto tb = CacheSequence(bm, b);  // blocks 2,3
  EXPECT_EQ(bm.num_cached(), 4);
  EXPECT_EQ(bm.num_free(), 6);

  std::vector<int32_t> t;
  ASSERT_TRUE(bm.Allocate({}, 2, &t));  // the two never-used blocks; the cache is intact
  EXPECT_EQ(t, Seq({4, 5}));
  EXPECT_EQ(bm.num_cached(), 4);

  std::vector<int32_t> u;
  ASSERT_TRUE(bm.Allocate({}, 1, &u));  // evicts the LRU block: a's first
  EXPECT_EQ(u[0], ta[0]);
  EXPECT_EQ(bm.num_cached(), 3);
  std::vector<int32_t> hit;
  EXPECT_EQ(bm.MatchPrefix(Hashes(a), a, 10, &hit), 0);  // a's chain is broken at block 0
  hit.clear();
  EXPECT_EQ(bm.MatchPrefix(Hashes(b), b, 10, &hit), 2);

  // A hit refreshes nothing by itself, but taking b's blocks removes them from the LRU list:
  // the next eviction is a's second block.
  std::vector<int32_t> v;
  ASSERT_TRUE(bm.Allocate(hit, 0, &v));
  std::vector<int32_t> w;
  ASSERT_TRUE(bm.Allocate({}, 1, &w));
  EXPECT_EQ(w[0], ta[1]);
  EXPECT_EQ(bm.num_free(), 0);
  std::vector<int32_t> none;
  EXPECT_FALSE(bm.Allocate({}, 1, &none));

  bm.Free(t);
  bm.Free(u);
  bm.Free(v);
  bm.Free(w);
  EXPECT_EQ(bm.num_free(), 6);
  EXPECT_EQ(bm.num_used(), 0);
  EXPECT_EQ(bm.num_bad_frees(), 0);
}

TEST(BlockManagerTest, EvictableHitsCostFreeBlocks) {
  BlockManager bm(4, kBs);
  const auto a = Seq({1, 2, 3, 4, 5, 6, 7, 8});
  CacheSequence(bm, a);
  std::vector<int32_t> hit;
  ASSERT_EQ(bm.MatchPrefix(Hashes(a), a, 10, &hit), 2);
  // 4 free (2 of them the evictable hits); taking 3 blocks, 2 of them the hits, leaves 1.
  EXPECT_EQ(bm.HeadroomAfter(hit, 3), 1);
  EXPECT_EQ(bm.HeadroomAfter(hit, 5), -1);
  std::vector<int32_t> t;
  EXPECT_FALSE(bm.Allocate(hit, 3, &t));
  ASSERT_TRUE(bm.Allocate(hit, 2, &t));
  EXPECT_EQ(bm.num_free(), 0);
  EXPECT_EQ(bm.num_cached(), 2);
  bm.Free(t);
  EXPECT_EQ(bm.num_free(), 4);
}

}  // namespace
}  // namespace cleave::scheduler
