// Internal to the CPU backend's Mamba ops (ssm_conv.cc, ssm_scan.cc): the argument checks both
// host wrappers run before touching memory, and the batch's sequences as the kernels walk them.
//
// Every index (query_start_loc, slots) is checked, and copied, before any memory is written: a bad
// batch fails with InvalidArgument and leaves `out` and the state pools untouched. Messages follow
// check.h: "<op>: <argument> <DebugString()> <problem>".
//
// The checks of shapes, dtypes, strides and overlaps take the op's device (the `...On` functions):
// the CUDA backend (kernels/cuda/ssm/) runs the very same ones with its device; only reading the
// index tensors' values is host-only (ReadSequences), the CUDA backend checks those on the device.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "check.h"
#include "cleave/common/status.h"
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

// ---- Device-agnostic checks (inline: the CUDA backend's kernels/cuda/ssm/ links them too) -----

// An f32 operand read row by row on `dev`: [rows, cols] with packed rows (any row stride).
[[nodiscard]] inline absl::Status CheckRowsOn(const char* op, const char* name, const Tensor& t,
                                              Device dev, int64_t rows, int64_t cols) {
  CLEAVE_RETURN_IF_ERROR(checks::CheckTensor(op, name, t, dev, DType::kF32, {rows, cols}));
  return CheckUnitInnerStride(op, name, t);
}

// An optional f32 [c] vector on `dev`: empty means "none".
[[nodiscard]] inline absl::Status CheckOptionalVectorOn(const char* op, const char* name,
                                                        const Tensor& t, Device dev, int64_t c) {
  if (t.empty()) return absl::OkStatus();
  CLEAVE_RETURN_IF_ERROR(checks::CheckTensor(op, name, t, dev, DType::kF32, {c}));
  return CheckUnitInnerStride(op, name, t);
}

// The operands an op only reads, by argument name (an empty tensor stands for an absent one).
using NamedTensors = std::vector<std::pair<const char*, const Tensor*>>;

// [first, last) bytes spanned by t's elements; empty for a tensor without elements.
struct ByteSpan {
  uintptr_t first = 0, last = 0;
};

inline ByteSpan SpanOf(const Tensor& t) {
  if (t.empty() || t.numel() == 0) return {};
  int64_t extent = 1;
  for (int i = 0; i < t.ndim(); ++i) extent += (t.dim(i) - 1) * t.stride(i);
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.data());
  return {first, first + static_cast<uintptr_t>(extent) * DTypeSize(t.dtype())};
}

// A tensor the kernel writes must not share memory with anything else it touches.
[[nodiscard]] inline absl::Status CheckNoOverlap(const char* op, const char* name,
                                                 const Tensor& written, const NamedTensors& others) {
  const ByteSpan w = SpanOf(written);
  if (w.first == w.last) return absl::OkStatus();
  for (const auto& [other_name, other] : others) {
    const ByteSpan o = SpanOf(*other);
    if (o.first < w.last && w.first < o.last) {
      return ArgError(op, name, written,
                      absl::StrCat("overlaps ", other_name, " ", other->DebugString()));
    }
  }
  return absl::OkStatus();
}

// An index tensor: contiguous i32 [n] on `dev`.
[[nodiscard]] inline absl::Status CheckIndex(const char* op, const char* name, const Tensor& t,
                                             Device dev, int64_t n) {
  CLEAVE_RETURN_IF_ERROR(checks::CheckTensor(op, name, t, dev, DType::kI32, {n}));
  return CheckContiguous(op, name, t);
}

// Everything CheckOutputsAndReadSequences (below) checks except the index tensors' values, on
// `dev`: the state pool and `out` (shape, dtype, contiguity, no overlaps) and the index tensors'
// dtypes and shapes (contiguous i32: query_start_loc [B + 1], state_slots and has_initial_state
// [B]). Returns B.
[[nodiscard]] inline absl::StatusOr<int64_t> CheckOutputsAndIndexShapes(
    const char* op, const char* state_name, const Tensor& state, int64_t width, const Tensor& out,
    int64_t num_tokens, int64_t channels, const NamedTensors& inputs, const SsmSequences& seqs,
    Device dev) {
  CLEAVE_RETURN_IF_ERROR(
      checks::CheckTensor(op, state_name, state, dev, DType::kF32, {kAny, channels, width}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(op, state_name, state));
  CLEAVE_RETURN_IF_ERROR(
      checks::CheckTensor(op, "out", out, dev, DType::kF32, {num_tokens, channels}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(op, "out", out));
  CLEAVE_RETURN_IF_ERROR(CheckNoOverlap(op, state_name, state, inputs));
  NamedTensors all_but_out = inputs;
  all_but_out.push_back({state_name, &state});
  CLEAVE_RETURN_IF_ERROR(CheckNoOverlap(op, "out", out, all_but_out));
  const SsmSequences& s = seqs;
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "query_start_loc", s.query_start_loc, dev, kAny));
  if (s.query_start_loc.dim(0) < 1) {
    return ArgError(op, "query_start_loc", s.query_start_loc, "must have shape [B + 1]");
  }
  const int64_t b = s.query_start_loc.dim(0) - 1;
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "state_slots", s.state_slots, dev, b));
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "has_initial_state", s.has_initial_state, dev, b));
  return b;
}

// ---- CPU ----------------------------------------------------------------------------------------

// CheckRowsOn / CheckOptionalVectorOn on the CPU.
[[nodiscard]] absl::Status CheckRows(const char* op, const char* name, const Tensor& t,
                                     int64_t rows, int64_t cols);
[[nodiscard]] absl::Status CheckOptionalVector(const char* op, const char* name, const Tensor& t,
                                               int64_t c);

// What every op writes, then its batch:
//  - `state` (named state_name), the pool read and updated by slot: f32 [num_slots, C, width],
//    contiguous; `out`: f32 [T, C], contiguous;
//  - neither may share memory with `inputs`, nor `out` with `state`: items would read values
//    other items have already overwritten;
//  - `seqs`: query_start_loc partitions [0, T) in order; slots are in [0, num_slots) and distinct
//    (two sequences on one slot would race on its state); has_initial_state is 0 or 1.
// Returns the sequences longest first, which is the order their work is dealt out in. CPU only.
[[nodiscard]] absl::StatusOr<std::vector<SeqWork>> CheckOutputsAndReadSequences(
    const char* op, const char* state_name, const Tensor& state, int64_t width, const Tensor& out,
    int64_t num_tokens, int64_t channels, const NamedTensors& inputs, const SsmSequences& seqs);

}  // namespace cleave::kernels::cpu::ssm
