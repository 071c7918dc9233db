#include "ssm_checks.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "check.h"
#include "cleave/common/status.h"

namespace cleave::kernels::cpu::ssm {
namespace {

absl::Status OpError(const char* op, const std::string& problem) {
  return absl::InvalidArgumentError(absl::StrCat(op, ": ", problem));
}

absl::Status CheckIndex(const char* op, const char* name, const Tensor& t, int64_t n) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, name, t, DType::kI32, {n}));
  return CheckContiguous(op, name, t);
}

// [first, last) bytes spanned by t's elements; empty for a tensor without elements.
struct ByteSpan {
  uintptr_t first = 0, last = 0;
};

ByteSpan SpanOf(const Tensor& t) {
  if (t.empty() || t.numel() == 0) return {};
  int64_t extent = 1;
  for (int i = 0; i < t.ndim(); ++i) extent += (t.dim(i) - 1) * t.stride(i);
  const uintptr_t first = reinterpret_cast<uintptr_t>(t.data());
  return {first, first + static_cast<uintptr_t>(extent) * DTypeSize(t.dtype())};
}

// A tensor the kernel writes must not share memory with anything else it touches.
absl::Status CheckNoOverlap(const char* op, const char* name, const Tensor& written,
                            const NamedTensors& others) {
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

// The sequences' part of CheckOutputsAndReadSequences.
absl::StatusOr<std::vector<SeqWork>> ReadSequences(const char* op, const SsmSequences& s,
                                                   int64_t num_tokens, int64_t num_slots) {
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "query_start_loc", s.query_start_loc, kAny));
  if (s.query_start_loc.dim(0) < 1) {
    return ArgError(op, "query_start_loc", s.query_start_loc, "must have shape [B + 1]");
  }
  const int64_t b = s.query_start_loc.dim(0) - 1;
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "state_slots", s.state_slots, b));
  CLEAVE_RETURN_IF_ERROR(CheckIndex(op, "has_initial_state", s.has_initial_state, b));
  const int32_t* qsl = s.query_start_loc.data_as<const int32_t>();
  const int32_t* slots = s.state_slots.data_as<const int32_t>();
  const int32_t* init = s.has_initial_state.data_as<const int32_t>();
  if (qsl[0] != 0 || qsl[b] != num_tokens) {
    return OpError(op, absl::StrCat("query_start_loc must run from 0 to T = ", num_tokens, ", got ",
                                    qsl[0], " .. ", qsl[b]));
  }
  std::vector<SeqWork> seqs(static_cast<size_t>(b));
  for (int64_t i = 0; i < b; ++i) {
    if (qsl[i + 1] < qsl[i]) {
      return OpError(op, absl::StrCat("query_start_loc decreases at sequence ", i, ": ", qsl[i],
                                      " -> ", qsl[i + 1]));
    }
    if (slots[i] < 0 || slots[i] >= num_slots) {
      return OpError(op, absl::StrCat("state_slots[", i, "] = ", slots[i],
                                      " is outside the pool's ", num_slots, " slots"));
    }
    if (init[i] != 0 && init[i] != 1) {
      return OpError(op, absl::StrCat("has_initial_state[", i, "] = ", init[i], " must be 0 or 1"));
    }
    seqs[i] = {qsl[i], int64_t{qsl[i + 1]} - qsl[i], slots[i], init[i] == 1};
  }
  std::vector<int32_t> sorted(slots, slots + b);
  std::sort(sorted.begin(), sorted.end());
  if (const auto dup = std::adjacent_find(sorted.begin(), sorted.end()); dup != sorted.end()) {
    return OpError(op, absl::StrCat("state slot ", *dup, " is used by two sequences"));
  }
  std::stable_sort(seqs.begin(), seqs.end(),
                   [](const SeqWork& a, const SeqWork& c) { return a.len > c.len; });
  return seqs;
}

}  // namespace

absl::Status CheckRows(const char* op, const char* name, const Tensor& t, int64_t rows,
                       int64_t cols) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, name, t, DType::kF32, {rows, cols}));
  return CheckUnitInnerStride(op, name, t);
}

absl::Status CheckOptionalVector(const char* op, const char* name, const Tensor& t, int64_t c) {
  if (t.empty()) return absl::OkStatus();
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, name, t, DType::kF32, {c}));
  return CheckUnitInnerStride(op, name, t);
}

absl::StatusOr<std::vector<SeqWork>> CheckOutputsAndReadSequences(
    const char* op, const char* state_name, const Tensor& state, int64_t width, const Tensor& out,
    int64_t num_tokens, int64_t channels, const NamedTensors& inputs, const SsmSequences& seqs) {
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, state_name, state, DType::kF32, {kAny, channels, width}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(op, state_name, state));
  CLEAVE_RETURN_IF_ERROR(CheckTensor(op, "out", out, DType::kF32, {num_tokens, channels}));
  CLEAVE_RETURN_IF_ERROR(CheckContiguous(op, "out", out));
  CLEAVE_RETURN_IF_ERROR(CheckNoOverlap(op, state_name, state, inputs));
  NamedTensors all_but_out = inputs;
  all_but_out.push_back({state_name, &state});
  CLEAVE_RETURN_IF_ERROR(CheckNoOverlap(op, "out", out, all_but_out));
  return ReadSequences(op, seqs, num_tokens, state.dim(0));
}

}  // namespace cleave::kernels::cpu::ssm
