#include "cleave/scheduler/block_hash.h"

#include <algorithm>

namespace cleave::scheduler {
namespace {

// splitmix64's finaliser: a full-avalanche 64-bit mix.
inline uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace

uint64_t HashBlock(uint64_t parent, std::span<const int32_t> tokens) {
  uint64_t h = Mix(parent ^ (0x9e3779b97f4a7c15ULL * (tokens.size() + 1)));
  for (int32_t t : tokens) {
    h = (h ^ static_cast<uint32_t>(t)) * 0x100000001b3ULL;
    h = (h << 23) | (h >> 41);
  }
  return Mix(h);
}

void ExtendBlockHashes(std::span<const int32_t> tokens, int block_size, int num_blocks,
                       std::vector<uint64_t>* hashes) {
  const size_t full = std::min<size_t>(num_blocks, tokens.size() / block_size);
  while (hashes->size() < full) {
    const size_t i = hashes->size();
    const uint64_t parent = i == 0 ? kRootBlockHash : (*hashes)[i - 1];
    hashes->push_back(HashBlock(parent, tokens.subspan(i * block_size, block_size)));
  }
}

}  // namespace cleave::scheduler
