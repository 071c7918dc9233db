// libFuzzer target: arbitrary bytes as a safetensors file. Parsing must fail cleanly or yield
// entries whose byte ranges lie inside the buffer; every accepted tensor's bytes are read so
// that ASan flags any range the validator let through wrongly.
#include <cstddef>
#include <cstdint>
#include <string>

#include "cleave/model/safetensors.h"
#include "cleave/model/weight_store.h"

namespace {

volatile uint8_t g_sink;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using cleave::model::SafetensorsFile;
  using cleave::model::TensorEntry;
  auto file = SafetensorsFile::FromBuffer(std::string(reinterpret_cast<const char*>(data), size));
  if (!file.ok()) return 0;

  uint8_t acc = 0;
  for (const TensorEntry& t : (*file)->tensors()) {
    for (size_t i = 0; i < t.nbytes; ++i) acc ^= t.data[i];
    // Invariants the rest of cleave relies on.
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) __builtin_trap();
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * cleave::kernels::DTypeSize(t.dtype) != t.nbytes) __builtin_trap();
    if ((*file)->Find(t.name) != &t) __builtin_trap();
  }
  g_sink = acc;

  // The store's checks (shape, dtype, alignment) on whatever parsed.
  auto store = cleave::model::WeightStore::FromFile(*std::move(file));
  if (!store.ok()) return 0;
  for (const std::string& name : (*store)->Names()) {
    const TensorEntry* e = (*store)->Find(name);
    auto t = (*store)->Get(name, e->shape);
    if (t.ok() && t->nbytes() != e->nbytes) __builtin_trap();
  }
  return 0;
}
