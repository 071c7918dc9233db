#include "device_workspace.h"

#include <algorithm>
#include <initializer_list>

#include "cleave/common/status.h"

namespace cleave::model::internal {

using kernels::DType;
using kernels::Tensor;

namespace {

Tensor I32View(const std::vector<int32_t>& v) {
  return Tensor(const_cast<int32_t*>(v.data()), DType::kI32, {static_cast<int64_t>(v.size())});
}

}  // namespace

BatchTensors HostBatchTensors(const ForwardBatch& b) {
  BatchTensors t;
  t.token_ids = I32View(b.token_ids);
  t.positions = I32View(b.positions);
  t.query_start_loc = I32View(b.query_start_loc);
  t.seq_lens = I32View(b.seq_lens);
  t.block_tables = Tensor(const_cast<int32_t*>(b.block_tables.data()), DType::kI32,
                          {b.num_seqs(), b.max_blocks_per_seq});
  t.slot_mapping = I32View(b.slot_mapping);
  t.logits_indices = I32View(b.logits_indices);
  t.state_slots = I32View(b.state_slots);
  t.has_initial_state = I32View(b.has_initial_state);
  return t;
}

absl::StatusOr<Tensor> DeviceWorkspace::F32(const void* key, int64_t rows, int64_t cols) {
  const size_t need = static_cast<size_t>(std::max<int64_t>(rows * cols, 1));
  Slot& slot = slots_[key];
  if (slot.floats < need) {
    slot.buffer.reset();  // free first: the old contents are not needed and memory may be tight
    CLEAVE_ASSIGN_OR_RETURN(slot.buffer, backend_.Allocate(need * sizeof(float)));
    slot.floats = need;
  }
  return Tensor(slot.buffer->data(), DType::kF32, {rows, cols}, backend_.device());
}

absl::Status DeviceWorkspace::Upload(const ForwardBatch& b) {
  // Every vector of the plan, packed back to back; offsets remembered to build the views.
  const std::initializer_list<const std::vector<int32_t>*> parts = {
      &b.token_ids, &b.positions,      &b.query_start_loc, &b.seq_lens,          &b.block_tables,
      &b.slot_mapping, &b.logits_indices, &b.state_slots, &b.has_initial_state};
  staging_.clear();
  std::vector<size_t> offsets;
  for (const std::vector<int32_t>* p : parts) {
    offsets.push_back(staging_.size());
    staging_.insert(staging_.end(), p->begin(), p->end());
  }
  const size_t bytes = std::max<size_t>(staging_.size(), 1) * sizeof(int32_t);
  if (plan_ == nullptr || plan_->size() < bytes) {
    plan_.reset();
    // Grown with headroom so a batch a few tokens larger does not reallocate.
    CLEAVE_ASSIGN_OR_RETURN(plan_, backend_.Allocate(bytes * 2));
  }
  CLEAVE_RETURN_IF_ERROR(backend_.CopyFromHost(staging_.data(), plan_->data(), bytes, nullptr));
  int32_t* base = static_cast<int32_t*>(plan_->data());
  const kernels::Device dev = backend_.device();
  auto view = [&](size_t i, const std::vector<int32_t>& v) {
    return Tensor(base + offsets[i], DType::kI32, {static_cast<int64_t>(v.size())}, dev);
  };
  batch_.token_ids = view(0, b.token_ids);
  batch_.positions = view(1, b.positions);
  batch_.query_start_loc = view(2, b.query_start_loc);
  batch_.seq_lens = view(3, b.seq_lens);
  batch_.block_tables = Tensor(base + offsets[4], DType::kI32, {b.num_seqs(), b.max_blocks_per_seq}, dev);
  batch_.slot_mapping = view(5, b.slot_mapping);
  batch_.logits_indices = view(6, b.logits_indices);
  batch_.state_slots = view(7, b.state_slots);
  batch_.has_initial_state = view(8, b.has_initial_state);
  return absl::OkStatus();
}

}  // namespace cleave::model::internal
