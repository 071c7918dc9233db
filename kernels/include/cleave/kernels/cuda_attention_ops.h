// CUDA implementations of the ops of attention.h, behind the same calls: kernels::WriteKvCache,
// kernels::PagedAttentionPrefill and kernels::PagedAttentionDecode forward here when their output
// (the caches for WriteKvCache, `out` otherwise) is on a CUDA device, in builds with CUDA
// (CLEAVE_WITH_CUDA). Model code never calls these directly.
//
// Contracts are the CPU ops' (attention.h: shapes, the paged layout, GQA, sliding window, the
// varlen query_start_loc / seq_lens / block_tables batch, InvalidArgument on a bad argument), plus:
//   * every tensor of a call is on the same CUDA device; `stream` null means that device's legacy
//     default stream;
//   * the caches may also be bf16 (DType::kBF16, same [num_blocks, block_size, Hk, Dh] layout, both
//     caches the same dtype): half the bytes per decode step. k, v, q and out stay f32; keys and
//     values are widened to f32 on load and every sum is accumulated in f32. WriteKvCache rounds
//     to bf16 to nearest-even, bit for bit as F32ToBf16 (dtype.h) does;
//   * head_dim <= 256 (every current model); larger is InvalidArgument;
//   * blocking: the batch metadata (query_start_loc, seq_lens, block ids, slots) lives on the device,
//     so it is validated there, and each op synchronises `stream` once, after its kernels, to read
//     the verdict back (the RoPE / Embedding pattern). The kernels never read or write out of bounds
//     on bad metadata: they skip what they cannot place. Unlike the CPU ops, which touch nothing on
//     a bad batch, the CUDA ops still compute the well-formed sequences (write the valid slots) and
//     leave the output rows of a bad sequence unspecified; the call returns InvalidArgument with
//     the CPU op's message.
//
// Numerics (tolerances: tests/gpu/cuda_attention_test.cc): scores are (q . k) * scale in f32 and the
// softmax uses expf (IEEE, no fast math). Results match the CPU reference to rounding, not bitwise:
// summation order differs, and decode's split of a context into partitions depends on the batch's
// shape (the CPU's fixed partitions make it batch-invariant; these ops are not, beyond rounding).
#pragma once

#include "absl/status/status.h"
#include "cleave/kernels/attention.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cuda {

// k, v: f32 [T, Hk, Dh] (unit inner stride); slot_mapping: i32 [T] contiguous; caches f32 or bf16.
// One thread per 4 elements (float4 loads where aligned). A slot < 0 is skipped; a slot past the
// cache is skipped, reported as InvalidArgument after the other rows were written. Blocking.
[[nodiscard]] absl::Status WriteKvCache(const Tensor& k, const Tensor& v, const Tensor& slot_mapping,
                                        Tensor& k_cache, Tensor& v_cache, Stream* stream);

// Flash-style tiles: a block takes 64 query rows (token x head of one KV head's group; 32 at
// head_dim 256) and walks the keys they may see in tiles of 32 with an online softmax, in f32 on
// the CUDA cores. Blocking.
[[nodiscard]] absl::Status PagedAttentionPrefill(const PagedAttentionArgs& args, Stream* stream);

// Flash-decoding: a block reads one partition of one sequence's context for one KV head and all (up
// to 8) query heads of its group, so K/V are read from memory once per group; a second kernel
// merges the partitions' (max, sum, output). Blocking.
[[nodiscard]] absl::Status PagedAttentionDecode(const PagedAttentionArgs& args, Stream* stream);

}  // namespace cleave::kernels::cuda
