// A decoder on a CUDA device: the weights copied there at load, the workspace's scratch and the
// pass's plan in device memory (device_workspace.h). The decoder's code is the same on every
// backend: each kernel entry point runs where its output tensor lives.
#include <cstring>
#include <functional>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "cleave/common/status.h"
#include "cleave/model/decoder.h"
#include "decoder_internal.h"
#include "device_workspace.h"

namespace cleave::model {

using kernels::DType;
using kernels::Tensor;

namespace {

// The bytes of `t` (contiguous) converted to `to` on the host, ready for one upload.
absl::StatusOr<std::vector<uint8_t>> Converted(const Tensor& t, DType to) {
  CLEAVE_CHECK_ARG(t.is_contiguous(), absl::StrCat("weight ", t.DebugString(), " is not contiguous"));
  const int64_t n = t.numel();
  std::vector<uint8_t> out(static_cast<size_t>(n) * kernels::DTypeSize(to));
  if (t.dtype() == to) {
    std::memcpy(out.data(), t.data(), out.size());
    return out;
  }
  auto widen = [&](int64_t i) -> float {
    switch (t.dtype()) {
      case DType::kF32: return t.data_as<const float>()[i];
      case DType::kBF16: return kernels::Bf16ToF32(t.data_as<const uint16_t>()[i]);
      case DType::kF16: return kernels::F16ToF32(t.data_as<const uint16_t>()[i]);
      default: return 0.0f;
    }
  };
  CLEAVE_CHECK_ARG(t.dtype() == DType::kF32 || t.dtype() == DType::kBF16 || t.dtype() == DType::kF16,
                   absl::StrCat("weight ", t.DebugString(), " has no float type"));
  if (to == DType::kBF16) {
    uint16_t* o = reinterpret_cast<uint16_t*>(out.data());
    for (int64_t i = 0; i < n; ++i) o[i] = kernels::F32ToBf16(widen(i));
  } else if (to == DType::kF32) {
    float* o = reinterpret_cast<float*>(out.data());
    for (int64_t i = 0; i < n; ++i) o[i] = widen(i);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("cannot convert weights to ", std::string(kernels::DTypeName(to))));
  }
  return out;
}

}  // namespace

absl::Status DecoderModel::UploadWeights() {
  const kernels::Device dev = options_.device;
  if (dev.is_cpu()) return absl::OkStatus();
  CLEAVE_CHECK_ARG(options_.part == LoadOptions::Part::kAll,
                   "attention-FFN disaggregation runs on the CPU backend only (no device weights for "
                   "a partial model yet)");
  CLEAVE_ASSIGN_OR_RETURN(backend_, kernels::GetBackend(dev));
  const bool bf16 = options_.device_weights == LoadOptions::DeviceWeights::kBF16;
  // Host data -> its device copy, so a tensor bound twice (tied embeddings: lm_head_ is embed_)
  // is uploaded once.
  absl::flat_hash_map<const void*, Tensor> uploaded;
  auto upload = [&](Tensor& t, bool matrix) -> absl::Status {
    if (t.empty()) return absl::OkStatus();
    if (auto it = uploaded.find(t.data()); it != uploaded.end()) {
      t = it->second;
      return absl::OkStatus();
    }
    const DType to = !matrix ? DType::kF32 : bf16 ? DType::kBF16 : t.dtype();
    CLEAVE_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, Converted(t, to));
    CLEAVE_ASSIGN_OR_RETURN(auto buf, backend_->Allocate(bytes.size()));
    CLEAVE_RETURN_IF_ERROR(backend_->CopyFromHost(bytes.data(), buf->data(), bytes.size(), nullptr));
    int64_t shape[kernels::kMaxDims];
    for (int i = 0; i < t.ndim(); ++i) shape[i] = t.dim(i);
    Tensor d(buf->data(), to, shape, t.ndim(), dev);
    device_weight_bytes_ += bytes.size();
    device_buffers_.push_back(std::move(buf));
    uploaded.emplace(t.data(), d);
    t = d;
    return absl::OkStatus();
  };
  auto matrix = [&](Tensor& t) { return upload(t, true); };
  auto vector = [&](Tensor& t) { return upload(t, false); };

  CLEAVE_RETURN_IF_ERROR(matrix(embed_));
  CLEAVE_RETURN_IF_ERROR(matrix(lm_head_));
  CLEAVE_RETURN_IF_ERROR(vector(final_norm_));
  CLEAVE_RETURN_IF_ERROR(vector(rope_cos_t_));
  CLEAVE_RETURN_IF_ERROR(vector(rope_sin_t_));
  for (Layer& L : layers_) {
    for (Tensor* t : {&L.input_norm, &L.post_norm, &L.attn.bq, &L.attn.bk, &L.attn.bv,
                      &L.mamba.in_proj_bias, &L.mamba.conv_w, &L.mamba.conv_b, &L.mamba.dt_bias,
                      &L.mamba.a, &L.mamba.d, &L.mamba.out_proj_bias, &L.mamba.dt_norm,
                      &L.mamba.b_norm, &L.mamba.c_norm,
                      // Routing decisions flip on small changes: router and gate stay f32.
                      &L.moe.router, &L.moe.shared_gate}) {
      CLEAVE_RETURN_IF_ERROR(vector(*t));
    }
    for (Tensor* t : {&L.attn.wq, &L.attn.wk, &L.attn.wv, &L.attn.wo, &L.mamba.in_proj,
                      &L.mamba.x_proj, &L.mamba.dt_proj, &L.mamba.out_proj, &L.mlp.w_gate,
                      &L.mlp.w_up, &L.mlp.w_down, &L.moe.shared.w_gate, &L.moe.shared.w_up,
                      &L.moe.shared.w_down}) {
      CLEAVE_RETURN_IF_ERROR(matrix(*t));
    }
    for (std::vector<Tensor>* experts : {&L.moe.experts.gate, &L.moe.experts.up, &L.moe.experts.down}) {
      for (Tensor& t : *experts) CLEAVE_RETURN_IF_ERROR(matrix(t));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> DecoderModel::Scratch(Workspace& ws, std::vector<float>& host, int64_t rows,
                                             int64_t cols) const {
  if (backend_ == nullptr) {
    internal::Grow(host, static_cast<size_t>(rows * cols));
    return internal::F32(host, rows, cols);
  }
  if (ws.device == nullptr) ws.device = std::make_shared<internal::DeviceWorkspace>(*backend_);
  return ws.device->F32(&host, rows, cols);
}

internal::BatchTensors DecoderModel::Plan(const ForwardBatch& batch, const Workspace& ws) const {
  if (backend_ == nullptr || ws.device == nullptr) return internal::HostBatchTensors(batch);
  return ws.device->batch();
}

}  // namespace cleave::model
