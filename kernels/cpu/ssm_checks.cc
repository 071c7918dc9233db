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

// The sequences' values (host memory): the rest of CheckOutputsAndReadSequences.
absl::StatusOr<std::vector<SeqWork>> ReadSequences(const char* op, const SsmSequences& s,
                                                   int64_t b, int64_t num_tokens,
                                                   int64_t num_slots) {
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
  return CheckRowsOn(op, name, t, Device::Cpu(), rows, cols);
}

absl::Status CheckOptionalVector(const char* op, const char* name, const Tensor& t, int64_t c) {
  return CheckOptionalVectorOn(op, name, t, Device::Cpu(), c);
}

absl::StatusOr<std::vector<SeqWork>> CheckOutputsAndReadSequences(
    const char* op, const char* state_name, const Tensor& state, int64_t width, const Tensor& out,
    int64_t num_tokens, int64_t channels, const NamedTensors& inputs, const SsmSequences& seqs) {
  CLEAVE_ASSIGN_OR_RETURN(const int64_t b,
                          CheckOutputsAndIndexShapes(op, state_name, state, width, out, num_tokens,
                                                     channels, inputs, seqs, Device::Cpu()));
  return ReadSequences(op, seqs, b, num_tokens, state.dim(0));
}

}  // namespace cleave::kernels::cpu::ssm
