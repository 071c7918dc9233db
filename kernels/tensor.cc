#include "cleave/kernels/tensor.h"

#include <cassert>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace cleave::kernels {

Tensor::Tensor(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device)
    : data_(data), dtype_(dtype), device_(device), ndim_(static_cast<int>(shape.size())) {
  assert(ndim_ <= kMaxDims);
  int i = 0;
  for (int64_t d : shape) shape_[i++] = d;
  SetContiguousStrides();
}

Tensor::Tensor(void* data, DType dtype, const int64_t* shape, int ndim, Device device)
    : data_(data), dtype_(dtype), device_(device), ndim_(ndim) {
  assert(ndim_ <= kMaxDims);
  for (int i = 0; i < ndim; ++i) shape_[i] = shape[i];
  SetContiguousStrides();
}

void Tensor::SetContiguousStrides() {
  int64_t s = 1;
  for (int i = ndim_ - 1; i >= 0; --i) {
    strides_[i] = s;
    s *= shape_[i];
  }
}

int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim_; ++i) n *= shape_[i];
  return n;
}

bool Tensor::is_contiguous() const {
  int64_t s = 1;
  for (int i = ndim_ - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != s) return false;
    s *= shape_[i];
  }
  return true;
}

Tensor Tensor::Slice0(int64_t begin, int64_t end) const {
  Tensor t = *this;
  t.shape_[0] = end - begin;
  t.data_ = static_cast<char*>(data_) + begin * strides_[0] * static_cast<int64_t>(DTypeSize(dtype_));
  return t;
}

Tensor Tensor::Narrow(int dim, int64_t start, int64_t length) const {
  if (dim < 0) dim += ndim_;
  assert(dim >= 0 && dim < ndim_ && start >= 0 && start + length <= shape_[dim]);
  Tensor t = *this;
  t.shape_[dim] = length;
  t.data_ = static_cast<char*>(data_) + start * strides_[dim] * static_cast<int64_t>(DTypeSize(dtype_));
  return t;
}

Tensor Tensor::Reshape(std::initializer_list<int64_t> shape) const {
  assert(is_contiguous());
  Tensor t(data_, dtype_, shape, device_);
  assert(t.numel() == numel());
  return t;
}

std::string Tensor::DebugString() const {
  std::vector<int64_t> dims(shape_.begin(), shape_.begin() + ndim_);
  return absl::StrCat(std::string(DTypeName(dtype_)), "[", absl::StrJoin(dims, ", "), "]");
}

}  // namespace cleave::kernels
