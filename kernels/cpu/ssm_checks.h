// Internal to the CPU backend's Mamba ops (ssm_conv.cc, ssm_scan.cc): the argument checks both
// host wrappers run before touching memory, and the batch's sequences as the kernels walk them.
//
// Every index (query_start_loc, slots) is checked, and copied, before any memory is written: a bad
// batch fails with InvalidArgument and leaves `out` and the state pools untouched. Messages follow
// check.h: "<op>: <argument> <DebugString()> <problem>".
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "check.h"
#include "cleave/kernels/ssm.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels::cpu::ssm {

inline constexpr int64_t kAny = kAnyDim;

// One sequence of the batch, as the kernels walk it (copied out of the index tensors, so writes
// to `out` or the pools cannot change the plan halfway).
struct SeqWork {
  int64_t start = 0;  // first row in [T, ...]
  int64_t len = 0;    // rows
  int64_t slot = 0;   // validated: in [0, num_slots), distinct within the batch
  bool has_initial_state = false;
};

// An f32 operand read row by row: [rows, cols] with packed rows (any row stride).
[[nodiscard]] absl::Status CheckRows(const char* op, const char* name, const Tensor& t,
                                     int64_t rows, int64_t cols);

// An optional f32 [c] vector: empty means "none".
[[nodiscard]] absl::Status CheckOptionalVector(const char* op, const char* name, const Tensor& t,
                                               int64_t c);

// The operands an op only reads, by argument name (an empty tensor stands for an absent one).
using NamedTensors = std::vector<std::pair<const char*, const Tensor*>>;

// What every op writes, then its batch:
//  - `state` (named state_name), the pool read and updated by slot: f32 [num_slots, C, width],
//    contiguous; `out`: f32 [T, C], contiguous;
//  - neither may share memory with `inputs`, nor `out` with `state`: items would read values
//    other items have already overwritten;
//  - `seqs`: query_start_loc partitions [0, T) in order; slots are in [0, num_slots) and distinct
//    (two sequences on one slot would race on its state); has_initial_state is 0 or 1.
// Returns the sequences longest first, which is the order their work is dealt out in.
[[nodiscard]] absl::StatusOr<std::vector<SeqWork>> CheckOutputsAndReadSequences(
    const char* op, const char* state_name, const Tensor& state, int64_t width, const Tensor& out,
    int64_t num_tokens, int64_t channels, const NamedTensors& inputs, const SsmSequences& seqs);

}  // namespace cleave::kernels::cpu::ssm
