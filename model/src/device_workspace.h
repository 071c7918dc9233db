// Internal to the model library: the device half of a Workspace, for a model whose weights live
// on a CUDA device (LoadOptions::device). The decoder names its scratch by the host vectors of
// Workspace (ws.q, ws.attn, ...); on a device each of those stands for one device buffer of this
// class, keyed by the vector's address, so the same decoder code runs on either backend. The
// host vectors themselves stay empty.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "cleave/kernels/backend.h"
#include "cleave/kernels/tensor.h"
#include "cleave/model/forward_batch.h"

namespace cleave::model::internal {

// The i32 plan of one pass as the kernels read it: views of the ForwardBatch's vectors on the
// CPU, of one uploaded copy on a device.
struct BatchTensors {
  kernels::Tensor token_ids, positions, query_start_loc, seq_lens, block_tables, slot_mapping,
      logits_indices, state_slots, has_initial_state;
};

// Views of `batch`'s own vectors (CPU execution).
BatchTensors HostBatchTensors(const ForwardBatch& batch);

class DeviceWorkspace {
 public:
  explicit DeviceWorkspace(kernels::Backend& backend) : backend_(backend) {}

  // An f32 [rows, cols] view of the device buffer standing for `key`, grown (contents dropped)
  // when smaller than rows * cols floats. Growth happens at the start of a pass (Reserve), so a
  // live buffer is never dropped mid-pass.
  [[nodiscard]] absl::StatusOr<kernels::Tensor> F32(const void* key, int64_t rows, int64_t cols);

  // Copies the pass's plan to the device in one transfer; `batch()` views it until the next call.
  [[nodiscard]] absl::Status Upload(const ForwardBatch& batch);
  const BatchTensors& batch() const { return batch_; }

  kernels::Backend& backend() { return backend_; }

 private:
  struct Slot {
    std::unique_ptr<kernels::Buffer> buffer;
    size_t floats = 0;
  };
  kernels::Backend& backend_;
  absl::flat_hash_map<const void*, Slot> slots_;
  std::vector<int32_t> staging_;                 // the packed plan, host side
  std::unique_ptr<kernels::Buffer> plan_;        // the packed plan, device side
  BatchTensors batch_;
};

}  // namespace cleave::model::internal
