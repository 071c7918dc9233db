// Tensor: a non-owning view (pointer, dtype, shape, strides, device). Ownership of the memory
// stays with whoever allocated it (a Buffer, a mmap'ed weight file, a std::vector in a test).
// Views are cheap value types; they are not thread-safe to mutate, but any number of threads may
// read through copies of the same view.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "cleave/kernels/device.h"
#include "cleave/kernels/dtype.h"

namespace cleave::kernels {

inline constexpr int kMaxDims = 6;

class Tensor {
 public:
  Tensor() = default;
  // Contiguous (row-major) view over `data`.
  Tensor(void* data, DType dtype, std::initializer_list<int64_t> shape, Device device = Device::Cpu());
  Tensor(void* data, DType dtype, const int64_t* shape, int ndim, Device device = Device::Cpu());

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const { return static_cast<T*>(data_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  int ndim() const { return ndim_; }
  int64_t dim(int i) const { return shape_[i < 0 ? i + ndim_ : i]; }
  int64_t stride(int i) const { return strides_[i < 0 ? i + ndim_ : i]; }  // in elements
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }
  bool is_contiguous() const;
  bool empty() const { return data_ == nullptr; }

  // View of rows [begin, end) along dim 0; no copy.
  Tensor Slice0(int64_t begin, int64_t end) const;
  // View of [start, start + length) along `dim` (strides kept, so rows may become
  // non-contiguous: e.g. the q columns of a fused [T, q + 2 * kv] projection).
  Tensor Narrow(int dim, int64_t start, int64_t length) const;
  // Same memory, new contiguous shape with the same numel (requires is_contiguous()).
  Tensor Reshape(std::initializer_list<int64_t> shape) const;
  // "f32[4, 8]" for error messages.
  std::string DebugString() const;

 private:
  void SetContiguousStrides();

  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Device device_ = Device::Cpu();
  int ndim_ = 0;
  std::array<int64_t, kMaxDims> shape_{};
  std::array<int64_t, kMaxDims> strides_{};
};

}  // namespace cleave::kernels
