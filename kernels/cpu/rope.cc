// CPU rotary embeddings. The frequencies and tables reproduce Hugging Face transformers
// (modeling_rope_utils.py and LlamaRotaryEmbedding.forward) so logits match the reference model.
#include "cleave/kernels/rope.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>

#include "absl/strings/str_cat.h"
#include "check.h"
#include "cleave/common/status.h"
#include "cleave/kernels/cuda_ops.h"
#include "parallel.h"

namespace cleave::kernels {
namespace {

absl::Status CheckConfig(const RopeConfig& c) {
  if (c.rotary_dim <= 0 || c.rotary_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("RopeConfig: rotary_dim must be positive and even, got ", c.rotary_dim));
  }
  if (!(c.theta > 0.0) || !std::isfinite(c.theta)) {
    return absl::InvalidArgumentError(
        absl::StrCat("RopeConfig: theta must be positive, got ", c.theta));
  }
  switch (c.scaling) {
    case RopeScaling::kNone:
      return absl::OkStatus();
    case RopeScaling::kLinear:
      if (!(c.factor > 0.0)) {
        return absl::InvalidArgumentError(
            absl::StrCat("RopeConfig: linear scaling needs factor > 0, got ", c.factor));
      }
      return absl::OkStatus();
    case RopeScaling::kLlama3:
      if (!(c.factor > 0.0) || !(c.low_freq_factor > 0.0) ||
          !(c.high_freq_factor > c.low_freq_factor) || c.original_max_position <= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("RopeConfig: llama3 scaling needs factor > 0, 0 < low_freq_factor < "
                         "high_freq_factor and "
                         "original_max_position > 0; got factor=",
                         c.factor, " low_freq_factor=", c.low_freq_factor, " high_freq_factor=",
                         c.high_freq_factor, " original_max_position=", c.original_max_position));
      }
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError("RopeConfig: unknown scaling");
}

// transformers' _compute_llama3_parameters, one frequency at a time: long wavelengths (beyond
// the original context) are slowed by `factor`, short ones kept, and the band between is a
// linear blend in 1/wavelength.
// transformers' _compute_llama3_parameters, one element at a time, in its f32 tensor arithmetic
// (Python scalars act as f32 operands; the same operation order, no fused multiply-adds: this
// file is built with -ffp-contract=off).
float Llama3Scale(const RopeConfig& c, float inv_freq) {
  const double old_context = static_cast<double>(c.original_max_position);
  const float low_freq_wavelen = static_cast<float>(old_context / c.low_freq_factor);
  const float high_freq_wavelen = static_cast<float>(old_context / c.high_freq_factor);
  const float factor = static_cast<float>(c.factor);
  const float wavelen = static_cast<float>(2.0 * std::numbers::pi) / inv_freq;
  const float llama = wavelen > low_freq_wavelen ? inv_freq / factor : inv_freq;
  const float smooth = (static_cast<float>(old_context) / wavelen - static_cast<float>(c.low_freq_factor)) /
                       static_cast<float>(c.high_freq_factor - c.low_freq_factor);
  const float smoothed = (1.0f - smooth) * llama / factor + smooth * llama;
  const bool is_medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
  return is_medium ? smoothed : llama;
}

// Rotates the pairs (x[i], x[i + half]) of one head by the angles whose cos/sin are given.
void RotateHalves(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    x[i] = x1 * cos[i] - x2 * sin[i];
    x[i + half] = x2 * cos[i] + x1 * sin[i];
  }
}

// Rotates the pairs (x[2i], x[2i + 1]) of one head.
void RotateInterleaved(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = x0 * cos[i] - x1 * sin[i];
    x[2 * i + 1] = x1 * cos[i] + x0 * sin[i];
  }
}

absl::Status CheckHeads(const char* name, const Tensor& t, int64_t tokens, int64_t rotary_dim) {
  CLEAVE_RETURN_IF_ERROR(
      cpu::CheckTensor("ApplyRope", name, t, DType::kF32, {tokens, cpu::kAnyDim, cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckUnitInnerStride("ApplyRope", name, t));
  if (t.dim(2) < rotary_dim) {
    return cpu::ArgError("ApplyRope", name, t,
                         absl::StrCat("has head_dim below the tables' rotary_dim ", rotary_dim));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<float>> RopeInvFreq(const RopeConfig& config) {
  CLEAVE_RETURN_IF_ERROR(CheckConfig(config));
  const int half = config.rotary_dim / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) {
    // 1 / theta^(arange(0, dim, 2) / dim), in f32 as transformers computes it: rounding it any
    // other way moves a frequency by a few ulp, i.e. the phase by ~1e-2 rad at position 10^5.
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(config.rotary_dim);
    float f = 1.0f / std::pow(static_cast<float>(config.theta), exponent);
    if (config.scaling == RopeScaling::kLinear) f /= static_cast<float>(config.factor);
    if (config.scaling == RopeScaling::kLlama3) f = Llama3Scale(config, f);
    inv_freq[static_cast<size_t>(i)] = f;
  }
  return inv_freq;
}

absl::Status BuildRopeTables(const RopeConfig& config, Tensor& cos, Tensor& sin) {
  CLEAVE_ASSIGN_OR_RETURN(const std::vector<float> inv_freq, RopeInvFreq(config));
  const int64_t half = static_cast<int64_t>(inv_freq.size());
  CLEAVE_RETURN_IF_ERROR(
      cpu::CheckTensor("BuildRopeTables", "cos", cos, DType::kF32, {cpu::kAnyDim, half}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous("BuildRopeTables", "cos", cos));
  CLEAVE_RETURN_IF_ERROR(
      cpu::CheckTensor("BuildRopeTables", "sin", sin, DType::kF32, {cos.dim(0), half}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous("BuildRopeTables", "sin", sin));
  // Positions are converted to f32 as transformers does; beyond 2^24 they stop being exact.
  if (cos.dim(0) > (int64_t{1} << 24)) {
    return cpu::ArgError("BuildRopeTables", "cos", cos,
                         "has more positions than f32 represents exactly");
  }

  float* cp = cos.data_as<float>();
  float* sp = sin.data_as<float>();
  cpu::ParallelFor(cos.dim(0), std::max<int64_t>(1, 4096 / half), [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      for (int64_t i = 0; i < half; ++i) {
        // transformers forms the angle as an f32 product (inv_freq @ position_ids in float32)
        // and takes cos/sin in f32. Rounding the angle the same way matters: at position 10^5
        // the f32 angle differs from the exact one by up to ~4e-3 rad. cos/sin of that f32
        // angle are then taken in double and rounded once, i.e. correctly rounded f32.
        const float angle = static_cast<float>(pos) * inv_freq[static_cast<size_t>(i)];
        cp[pos * half + i] = static_cast<float>(std::cos(static_cast<double>(angle)));
        sp[pos * half + i] = static_cast<float>(std::sin(static_cast<double>(angle)));
      }
    }
  });
  return absl::OkStatus();
}

absl::Status ApplyRope(const Tensor& positions, const Tensor& cos, const Tensor& sin,
                       RopeStyle style, Tensor& q, Tensor& k, Stream* stream) {
#if CLEAVE_WITH_CUDA
  if (!q.device().is_cpu()) return cuda::ApplyRope(positions, cos, sin, style, q, k, stream);
#endif
  constexpr const char* kOp = "ApplyRope";
  CLEAVE_RETURN_IF_ERROR(cpu::CheckStream(kOp, stream));
  CLEAVE_RETURN_IF_ERROR(
      cpu::CheckTensor(kOp, "positions", positions, DType::kI32, {cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous(kOp, "positions", positions));
  CLEAVE_RETURN_IF_ERROR(
      cpu::CheckTensor(kOp, "cos", cos, DType::kF32, {cpu::kAnyDim, cpu::kAnyDim}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous(kOp, "cos", cos));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckTensor(kOp, "sin", sin, DType::kF32, {cos.dim(0), cos.dim(1)}));
  CLEAVE_RETURN_IF_ERROR(cpu::CheckContiguous(kOp, "sin", sin));
  if (style != RopeStyle::kHalves && style != RopeStyle::kInterleaved) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": unknown RopeStyle ", static_cast<int>(style)));
  }
  const int64_t tokens = positions.dim(0), max_positions = cos.dim(0), half = cos.dim(1);
  CLEAVE_RETURN_IF_ERROR(CheckHeads("q", q, tokens, 2 * half));
  CLEAVE_RETURN_IF_ERROR(CheckHeads("k", k, tokens, 2 * half));

  // All positions are checked before any head is rotated, so a bad request changes nothing.
  const int32_t* pos = positions.data_as<const int32_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    if (pos[t] < 0 || pos[t] >= max_positions) {
      return absl::InvalidArgumentError(absl::StrCat(kOp, ": positions[", t, "] = ", pos[t],
                                                     " is outside the tables' [0, ", max_positions,
                                                     ") (cos ", cos.DebugString(), ")"));
    }
  }
  if (tokens == 0 || half == 0) return absl::OkStatus();

  const float* cp = cos.data_as<const float>();
  const float* sp = sin.data_as<const float>();
  const auto rotate = style == RopeStyle::kHalves ? RotateHalves : RotateInterleaved;
  const int64_t heads = q.dim(1) + k.dim(1);
  const int64_t min_tokens = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, heads * 2 * half));
  cpu::ParallelFor(tokens, min_tokens, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * half;
      const float* s = sp + pos[t] * half;
      for (Tensor* x : {&q, &k}) {
        float* base = x->data_as<float>() + t * x->stride(0);
        for (int64_t h = 0; h < x->dim(1); ++h) rotate(base + h * x->stride(1), c, s, half);
      }
    }
  });
  return absl::OkStatus();
}

}  // namespace cleave::kernels
