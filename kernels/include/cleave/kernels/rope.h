// Rotary position embeddings.
#pragma once

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// Which elements form a rotated pair.
enum class RopeStyle {
  kHalves,       // Hugging Face Llama: (x[i], x[i + rotary_dim/2])  ("rotate_half")
  kInterleaved,  // original RoFormer / llama2.c / GPT-J: (x[2i], x[2i+1])
};

enum class RopeScaling {
  kNone,
  kLinear,  // position interpolation: inv_freq / factor
  kLlama3,  // Llama 3.1 frequency-dependent scaling (factor, low/high_freq_factor, original max)
};

struct RopeConfig {
  int rotary_dim = 0;  // usually head_dim; must be even
  double theta = 10000.0;
  RopeStyle style = RopeStyle::kHalves;
  RopeScaling scaling = RopeScaling::kNone;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int original_max_position = 8192;
};

// inv_freq[i] for i in [0, rotary_dim/2), after scaling — bit for bit what transformers computes
// (its f32 tensor arithmetic, tests/data/rope_inv_freq.json).
[[nodiscard]] absl::StatusOr<std::vector<float>> RopeInvFreq(const RopeConfig& config);

// Fills cos/sin tables, f32 [max_positions, rotary_dim/2], with cos/sin(pos * inv_freq[i]).
[[nodiscard]] absl::Status BuildRopeTables(const RopeConfig& config, Tensor& cos, Tensor& sin);

// Rotates q [T, Hq, head_dim] and k [T, Hk, head_dim] (f32) in place; only the first
// rotary_dim dims of each head are rotated. positions: i32 [T], each < max_positions of the
// tables (InvalidArgument otherwise). cos/sin from BuildRopeTables.
[[nodiscard]] absl::Status ApplyRope(const Tensor& positions, const Tensor& cos, const Tensor& sin,
                                     RopeStyle style, Tensor& q, Tensor& k, Stream* stream = nullptr);

}  // namespace cleave::kernels
