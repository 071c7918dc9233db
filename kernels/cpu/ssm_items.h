// Internal to the CPU backend's Mamba ops (ssm_conv.cc, ssm_scan.cc): how a call's work is cut
// into items and dealt to the worker pool.
//
// Channels are independent in both ops, so an item is (sequence, token range, channel block); the
// ops choose the sizes (ItemShape). An item owns its rows of `out` and its channels of the slot
// outright: no two items write the same memory and nothing is reduced across items. Inside an
// item the arithmetic runs on 8-channel vectors (ssm_lanes.h) whose lanes never mix. So a
// channel's result depends only on its own sequence - not on the batch, the blocks, the chunks,
// the thread or the order of items (batch invariance, bitwise) - and a decode step runs the same
// code as a one-token prefill, so prefill in any chunking and token-by-token decode give bitwise
// the same outputs and states.
//
// Items go to the pool dynamically, longest sequences first, in grabs of roughly equal work, so a
// long prefill next to many one-token decodes does not leave threads idle; decode items are dealt
// block-major so that consecutive items reuse their block's transposed weights.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "ssm_checks.h"

namespace cleave::kernels::cpu::ssm {

// Each call gets its own id, so that per-thread caches of per-block set-up never outlive a call
// (the next call may bring other weights at the same address). Thread-safe.
uint64_t NextCallId();

// Sequences of at most this many tokens are "short" (decode): their items are dealt block-major,
// so that a thread's consecutive items share a channel block and reuse its set-up (the block's
// weights or A, transposed), which costs about as much as one token of the block.
inline constexpr int64_t kShortSeq = 4;

// How an op cuts its work into items.
struct ItemShape {
  int64_t block_channels = 0;  // channels per item
  int64_t chunk_tokens = 0;    // tokens per item of a long sequence (> kShortSeq); 0: all of them
  int64_t min_part_work = 0;   // token-channels that make waking another thread worth it
};

// The items of one call, in the order they are dealt: the long sequences' items first, longest
// sequence first (so no long item is left for last), unit by unit; then the short sequences'
// items block-major. Grabs are runs of items of about a quarter of a thread's share (a long item
// stays single), taken by the threads from a shared counter.
struct ItemList {
  struct Unit {  // tokens [t0, t1) of seqs[seq], for every block
    int64_t seq, t0, t1;
  };
  int64_t blocks = 0, block_channels = 0, channels = 0;
  int64_t num_long = 0, num_short = 0;  // seqs[0, num_long) are long
  int64_t long_items = 0, num_items = 0;
  std::vector<Unit> units;
  std::vector<int64_t> cuts;  // grab g is items [cuts[g], cuts[g + 1])
  int64_t threads = 1;
};

// `seqs` sorted longest first, as CheckOutputsAndReadSequences returns them.
ItemList ListItems(const std::vector<SeqWork>& seqs, int64_t channels, const ItemShape& shape);

// Runs item(seq, t0, t1, c0, c1) over every sequence's tokens [t0, t1) (relative to its start)
// and channels [c0, c1), on the pool; returns when all are done.
template <typename ItemFn>
void ForEachItem(const std::vector<SeqWork>& seqs, int64_t channels, const ItemShape& shape,
                 const ItemFn& item) {
  if (seqs.empty() || channels == 0) return;
  const ItemList l = ListItems(seqs, channels, shape);
  const auto run_item = [&](int64_t i) {
    if (i < l.long_items) {
      const ItemList::Unit& u = l.units[i / l.blocks];
      const int64_t c0 = (i % l.blocks) * l.block_channels;
      item(seqs[u.seq], u.t0, u.t1, c0, std::min(channels, c0 + l.block_channels));
    } else {
      const SeqWork& s = seqs[l.num_long + (i - l.long_items) % l.num_short];
      const int64_t c0 = (i - l.long_items) / l.num_short * l.block_channels;
      item(s, int64_t{0}, s.len, c0, std::min(channels, c0 + l.block_channels));
    }
  };
  const int64_t grabs = static_cast<int64_t>(l.cuts.size()) - 1;
  const auto run_grab = [&](int64_t g) {
    for (int64_t i = l.cuts[g]; i < l.cuts[g + 1]; ++i) run_item(i);
  };
  const int64_t parts = std::min(l.threads, grabs);
  if (parts <= 1) {
    for (int64_t g = 0; g < grabs; ++g) run_grab(g);
    return;
  }
  std::atomic<int64_t> next{0};
  ParallelFor(parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t g; (g = next.fetch_add(1, std::memory_order_relaxed)) < grabs;) run_grab(g);
    }
  });
}

}  // namespace cleave::kernels::cpu::ssm
