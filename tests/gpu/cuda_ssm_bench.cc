// Throughput of the CUDA Mamba ops (cuda_ssm_ops.h), as a markdown table: the selective scan's
// prefill (batch 8 x 4096 tokens, d_inner 2048, d_state 16) in tokens/s and as effective
// bandwidth against a device-to-device copy measured in the same run; a CausalConv1d prefill of
// the same shape; a decode step of 64 sequences. Both ops are blocking (they read back the
// batch check's verdict), so each time includes one stream synchronisation.
//
//   cuda_ssm_bench [--torch-seconds X]
// X: seconds of tools/bench_scan_torch.py's plain per-timestep PyTorch loop on the same shape;
// when given, the speed-up over it is printed too (the target is >= 20x).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cleave/kernels/ssm.h"
#include "cleave/kernels/tensor.h"
#include "gpu_bench_util.h"

namespace cleave::kernels {
namespace {

using namespace gpubench;  // NOLINT: the shared benchmark vocabulary

// Device index tensors for `lens` sequences on slots 0, 1, ...; every other one continuing.
struct DeviceBatch {
  void* qsl = nullptr;
  void* slots = nullptr;
  void* init = nullptr;
  SsmSequences seqs;
  int64_t tokens = 0;

  explicit DeviceBatch(const std::vector<int32_t>& lens) {
    std::vector<int32_t> q{0}, s, i;
    for (size_t b = 0; b < lens.size(); ++b) {
      q.push_back(q.back() + lens[b]);
      s.push_back(static_cast<int32_t>(b));
      i.push_back(static_cast<int32_t>(b % 2));
    }
    tokens = q.back();
    const int64_t n = static_cast<int64_t>(lens.size());
    qsl = Upload(q);
    slots = Upload(s);
    init = Upload(i);
    seqs = {Dev(qsl, DType::kI32, {n + 1}), Dev(slots, DType::kI32, {n}), Dev(init, DType::kI32, {n})};
  }
  ~DeviceBatch() {
    for (void* p : {qsl, slots, init}) cudaFree(p);
  }
  static void* Upload(const std::vector<int32_t>& v) {
    void* p = DeviceAlloc(v.size() * sizeof(int32_t));
    CHECK_CUDA(cudaMemcpy(p, v.data(), v.size() * sizeof(int32_t), cudaMemcpyHostToDevice));
    return p;
  }
};

// The scan's operands for `batch` on a pool of `slots` slots; inputs are zeros except A (-1),
// which the timing does not depend on (no data-dependent branches besides softplus' threshold).
struct ScanSetup {
  std::vector<void*> buffers;
  SelectiveScanArgs args;

  ScanSetup(const DeviceBatch& batch, int64_t c, int64_t n, int64_t slots) {
    const int64_t t = batch.tokens;
    auto alloc = [&](size_t floats) {
      buffers.push_back(DeviceAlloc(floats * sizeof(float)));
      return buffers.back();
    };
    args.x = Dev(alloc(t * c), DType::kF32, {t, c});
    args.dt = Dev(alloc(t * c), DType::kF32, {t, c});
    args.z = Dev(alloc(t * c), DType::kF32, {t, c});
    args.B = Dev(alloc(t * n), DType::kF32, {t, n});
    args.C = Dev(alloc(t * n), DType::kF32, {t, n});
    args.dt_bias = Dev(alloc(c), DType::kF32, {c});
    args.D = Dev(alloc(c), DType::kF32, {c});
    std::vector<float> a(static_cast<size_t>(c * n), -1.0f);
    void* ap = alloc(c * n);
    CHECK_CUDA(cudaMemcpy(ap, a.data(), a.size() * sizeof(float), cudaMemcpyHostToDevice));
    args.A = Dev(ap, DType::kF32, {c, n});
    args.ssm_state = Dev(alloc(slots * c * n), DType::kF32, {slots, c, n});
    args.out = Dev(alloc(t * c), DType::kF32, {t, c});
    args.seqs = batch.seqs;
  }
  ~ScanSetup() {
    for (void* p : buffers) cudaFree(p);
  }
  // Bytes the op must move: x, dt, z read and out written; B, C read; the touched states read and
  // written.
  double Bytes(int64_t num_seqs) const {
    const double t = static_cast<double>(args.x.dim(0)), c = static_cast<double>(args.x.dim(1));
    const double n = static_cast<double>(args.A.dim(1));
    return 4.0 * (4 * t * c + 2 * t * n + 2.0 * static_cast<double>(num_seqs) * c * n);
  }
};

double ParseTorchSeconds(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--torch-seconds") == 0) return std::atof(argv[i + 1]);
  }
  return 0.0;
}

int Main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "cuda_ssm_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n\n", prop.name);
  const double torch_s = ParseTorchSeconds(argc, argv);
  const double copy_bw = CopyBandwidth(size_t{1} << 30);

  std::printf("| kernel | shape | time (us) | achieved | ratio | baseline |\n|---|---|---|---|---|---|\n");
  std::printf("| D2D copy | 1 GiB | - | %.0f GB/s | 1.00 | itself |\n", copy_bw / 1e9);
  const auto bandwidth_row = [&](const char* name, const char* shape, double bytes, double s) {
    std::printf("| %s | %s | %.1f | %.0f GB/s | %.2f | D2D copy bandwidth |\n", name, shape, s * 1e6, bytes / s / 1e9,
                bytes / s / copy_bw);
  };

  const int64_t b = 8, len = 4096, c = 2048, n = 16;
  {  // Selective scan prefill.
    DeviceBatch batch(std::vector<int32_t>(b, static_cast<int32_t>(len)));
    ScanSetup setup(batch, c, n, b);
    const double s = Time([&] { Must(SelectiveScan(setup.args), "SelectiveScan"); }, 10);
    const char* shape = "B=8 L=4096 d_inner=2048 N=16, dt_bias D z";
    bandwidth_row("SelectiveScan prefill", shape, setup.Bytes(b), s);
    std::printf("| SelectiveScan prefill | %s | %.1f | %.3g tokens/s | - | - |\n", shape, s * 1e6,
                static_cast<double>(b * len) / s);
    if (torch_s > 0) {
      std::printf("| SelectiveScan prefill vs PyTorch loop | %s | %.1f | %.1fx | %.1f | "
                  "tools/bench_scan_torch.py: %.3f s (target >= 20x) |\n",
                  shape, s * 1e6, torch_s / s, torch_s / s, torch_s);
    } else {
      std::printf("| SelectiveScan prefill vs PyTorch loop | %s | - | - | - | not measured (no --torch-seconds) |\n",
                  shape);
    }
  }
  {  // Selective scan decode: 64 sequences, one token each.
    const int64_t seqs = 64;
    DeviceBatch batch(std::vector<int32_t>(seqs, 1));
    ScanSetup setup(batch, c, n, seqs);
    const double s = Time([&] { Must(SelectiveScan(setup.args), "SelectiveScan decode"); }, 50);
    bandwidth_row("SelectiveScan decode", "64 seqs x 1 token, d_inner=2048 N=16", setup.Bytes(seqs), s);
  }
  {  // CausalConv1d prefill, K = 4.
    const int64_t k = 4;
    DeviceBatch batch(std::vector<int32_t>(b, static_cast<int32_t>(len)));
    const int64_t t = batch.tokens;
    void* x = DeviceAlloc(t * c * 4);
    void* out = DeviceAlloc(t * c * 4);
    void* w = DeviceAlloc(c * k * 4);
    void* bias = DeviceAlloc(c * 4);
    void* state = DeviceAlloc(b * c * (k - 1) * 4);
    CausalConv1dArgs a;
    a.x = Dev(x, DType::kF32, {t, c});
    a.weight = Dev(w, DType::kF32, {c, k});
    a.bias = Dev(bias, DType::kF32, {c});
    a.seqs = batch.seqs;
    a.conv_state = Dev(state, DType::kF32, {b, c, k - 1});
    a.out = Dev(out, DType::kF32, {t, c});
    const double s = Time([&] { Must(CausalConv1d(a), "CausalConv1d"); }, 10);
    bandwidth_row("CausalConv1d prefill", "B=8 L=4096 C=2048 K=4, bias silu", 2.0 * t * c * 4, s);
    for (void* p : {x, out, w, bias, state}) cudaFree(p);
  }
  return 0;
}

}  // namespace
}  // namespace cleave::kernels

int main(int argc, char** argv) { return cleave::kernels::Main(argc, argv); }
