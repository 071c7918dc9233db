// Chained hashes of full KV blocks: the key of the prefix cache. Block i of a token sequence hashes
// (hash of block i-1, the block_size token ids of block i), so equal hashes mean equal whole
// prefixes, not merely equal blocks: the same tokens after a different prefix never match.
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace cleave::scheduler {

// The parent of block 0.
inline constexpr uint64_t kRootBlockHash = 0x6a09e667f3bcc908ULL;

// Hash of one full block: tokens holds exactly block_size ids.
uint64_t HashBlock(uint64_t parent, std::span<const int32_t> tokens);

// Extends *hashes (the chained hashes of the leading full blocks of `tokens`, possibly empty) so it
// covers min(num_blocks, tokens.size() / block_size) blocks. Never shrinks it.
void ExtendBlockHashes(std::span<const int32_t> tokens, int block_size, int num_blocks,
                       std::vector<uint64_t>* hashes);

}  // namespace cleave::scheduler
