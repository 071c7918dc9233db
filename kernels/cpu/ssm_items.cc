#include "ssm_items.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "parallel.h"

namespace cleave::kernels::cpu::ssm {
namespace {

std::atomic<uint64_t> g_next_call_id{1};

}  // namespace

uint64_t NextCallId() { return g_next_call_id.fetch_add(1, std::memory_order_relaxed); }

ItemList ListItems(const std::vector<SeqWork>& seqs, int64_t channels, const ItemShape& shape) {
  ItemList l;
  l.block_channels = shape.block_channels;
  l.channels = channels;
  l.blocks = (channels + shape.block_channels - 1) / shape.block_channels;
  const int64_t num_seqs = static_cast<int64_t>(seqs.size());
  l.num_long =  // seqs are sorted longest first
      std::find_if(seqs.begin(), seqs.end(), [](const SeqWork& s) { return s.len <= kShortSeq; }) -
      seqs.begin();
  l.num_short = num_seqs - l.num_long;
  for (int64_t i = 0; i < l.num_long; ++i) {
    const int64_t len = seqs[i].len, step = shape.chunk_tokens > 0 ? shape.chunk_tokens : len;
    for (int64_t t0 = 0; t0 < len; t0 += step) l.units.push_back({i, t0, std::min(len, t0 + step)});
  }
  l.long_items = static_cast<int64_t>(l.units.size()) * l.blocks;
  l.num_items = l.long_items + l.num_short * l.blocks;

  // Work in token-channels; an empty sequence still resets or keeps its state: one token.
  const int64_t bc = shape.block_channels;
  int64_t long_work = 0, short_work = 0;
  for (const ItemList::Unit& u : l.units) long_work += (u.t1 - u.t0) * bc * l.blocks;
  for (int64_t i = l.num_long; i < num_seqs; ++i) {
    short_work += std::max<int64_t>(seqs[i].len, 1) * bc * l.blocks;
  }
  const int64_t total = long_work + short_work;
  l.threads = std::min<int64_t>(
      PoolThreads(), std::max<int64_t>(1, total / std::max<int64_t>(1, shape.min_part_work)));
  const int64_t target = std::max<int64_t>(1, total / (l.threads * 4));

  l.cuts = {0};
  int64_t acc = 0, next_item = 0;
  for (const ItemList::Unit& u : l.units) {
    const int64_t c = (u.t1 - u.t0) * bc;
    for (int64_t left = l.blocks; left > 0;) {
      const int64_t take = std::min(left, std::max<int64_t>(1, (target - acc + c - 1) / c));
      acc += take * c;
      next_item += take;
      left -= take;
      if (acc >= target) {
        l.cuts.push_back(next_item);
        acc = 0;
      }
    }
  }
  if (l.cuts.back() != l.long_items) l.cuts.push_back(l.long_items);
  if (l.num_short > 0) {  // short items cost about the same: cut by count
    const int64_t per_grab =
        std::max<int64_t>(1, target * (l.num_items - l.long_items) / short_work);
    for (int64_t i = l.long_items; i < l.num_items; i += per_grab) {
      l.cuts.push_back(std::min(l.num_items, i + per_grab));
    }
  }
  return l;
}

}  // namespace cleave::kernels::cpu::ssm
