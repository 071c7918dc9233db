// Where a tensor's memory lives. Kept separate from backend.h so tensors need no backend.
#pragma once

#include <string>

namespace cleave::kernels {

enum class DeviceType : uint8_t { kCpu, kCuda };

struct Device {
  DeviceType type = DeviceType::kCpu;
  int index = 0;

  static constexpr Device Cpu() { return {DeviceType::kCpu, 0}; }
  static constexpr Device Cuda(int i) { return {DeviceType::kCuda, i}; }
  bool is_cpu() const { return type == DeviceType::kCpu; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  std::string ToString() const {
    return type == DeviceType::kCpu ? "cpu" : "cuda:" + std::to_string(index);
  }
};

}  // namespace cleave::kernels
