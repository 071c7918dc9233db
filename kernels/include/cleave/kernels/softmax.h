// Softmax computed online (one pass for max and sum, Milakov & Gimelshein 2018) — the same
// recurrence the attention kernels use tile by tile.
#pragma once

#include <cmath>
#include <limits>

#include "absl/status/status.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"

namespace cleave::kernels {

// Running (max, sum of exp(x - max)) over a stream of scores. Merge() combines two partial
// states, which is what split-K attention does across KV chunks.
struct OnlineSoftmaxState {
  float max = -std::numeric_limits<float>::infinity();
  float sum = 0.0f;

  void Add(float x) {
    if (x == -std::numeric_limits<float>::infinity()) return;  // masked: adds nothing
    if (x > max) {
      sum = sum * std::exp(max - x) + 1.0f;
      max = x;
    } else {
      sum += std::exp(x - max);
    }
  }
  void Merge(const OnlineSoftmaxState& o) {
    if (o.max == -std::numeric_limits<float>::infinity()) return;
    if (o.max > max) {
      sum = sum * std::exp(max - o.max) + o.sum;
      max = o.max;
    } else {
      sum += o.sum * std::exp(o.max - max);
    }
  }
};

// out[r, :] = softmax(x[r, :]).  x, out: f32 [R, C]; out may alias x.
[[nodiscard]] absl::Status Softmax(const Tensor& x, Tensor& out, Stream* stream = nullptr);

// out[r, :] = log_softmax(x[r, :]).  Same shapes.
[[nodiscard]] absl::Status LogSoftmax(const Tensor& x, Tensor& out, Stream* stream = nullptr);

}  // namespace cleave::kernels
