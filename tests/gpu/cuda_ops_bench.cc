// Throughput of the CUDA ops as ratios against baselines measured in the same run on the same
// device: memory-bound ops against a device-to-device copy's bandwidth (bytes each op must move /
// time, over the copy's), the GEMM against a direct cublasGemmEx of the same shape and types.
// Prints a markdown table. Run by tests/gpu/run.sh; needs a CUDA device.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "cleave/kernels/activation.h"
#include "cleave/kernels/embedding.h"
#include "cleave/kernels/gemm.h"
#include "cleave/kernels/norm.h"
#include "cleave/kernels/tensor.h"
#include "gpu_bench_util.h"

namespace cleave::kernels {
namespace {

using namespace gpubench;  // NOLINT: the shared benchmark vocabulary

int Main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "cuda_ops_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s\n\n", prop.name);

  // Baseline bandwidth: a 1 GiB device-to-device copy moves 2 GiB (read + write).
  const size_t copy_bytes = size_t{1} << 30;
  void* a = DeviceAlloc(copy_bytes);
  void* b = DeviceAlloc(copy_bytes);
  const double copy_s = Time([&] { CHECK_CUDA(cudaMemcpyAsync(b, a, copy_bytes, cudaMemcpyDeviceToDevice)); });
  const double copy_bw = 2.0 * copy_bytes / copy_s;
  cudaFree(a);
  cudaFree(b);

  std::printf("| kernel | shape | time (us) | achieved | ratio | baseline |\n|---|---|---|---|---|---|\n");
  std::printf("| D2D copy | 1 GiB | %.1f | %.0f GB/s | 1.00 | itself |\n", copy_s * 1e6, copy_bw / 1e9);
  auto bandwidth_row = [&](const char* name, const std::string& shape, double bytes, double s) {
    std::printf("| %s | %s | %.1f | %.0f GB/s | %.2f | D2D copy bandwidth |\n", name, shape.c_str(), s * 1e6,
                bytes / s / 1e9, bytes / s / copy_bw);
  };

  {  // RmsNorm and AddRmsNorm, a prefill-sized batch.
    const int64_t t = 8192, d = 4096;
    void* x = DeviceAlloc(t * d * 4);
    void* res = DeviceAlloc(t * d * 4);
    void* out = DeviceAlloc(t * d * 4);
    void* w = DeviceAlloc(d * 4);
    Tensor tx = Dev(x, DType::kF32, {t, d}), tres = Dev(res, DType::kF32, {t, d}), tout = Dev(out, DType::kF32, {t, d});
    Tensor tw = Dev(w, DType::kF32, {d});
    bandwidth_row("RmsNorm", "8192 x 4096 f32", 2.0 * t * d * 4,
                  Time([&] { Must(RmsNorm(tx, tw, 1e-6f, tout), "RmsNorm"); }));
    bandwidth_row("AddRmsNorm", "8192 x 4096 f32", 4.0 * t * d * 4,
                  Time([&] { Must(AddRmsNorm(tx, tres, tw, 1e-6f, tout), "AddRmsNorm"); }));
    for (void* p : {x, res, out, w}) cudaFree(p);
  }
  {  // SwiGlu.
    const int64_t t = 8192, f = 11008;
    void* gu = DeviceAlloc(t * 2 * f * 4);
    void* out = DeviceAlloc(t * f * 4);
    Tensor tgu = Dev(gu, DType::kF32, {t, 2 * f}), tout = Dev(out, DType::kF32, {t, f});
    bandwidth_row("SwiGlu", "8192 x 11008 f32", 3.0 * t * f * 4, Time([&] { Must(SwiGlu(tgu, tout), "SwiGlu"); }));
    cudaFree(gu);
    cudaFree(out);
  }
  {  // Embedding (bf16 table; synchronises for its id check, so it includes that round trip).
    const int64_t v = 32000, d = 4096, t = 8192;
    void* table = DeviceAlloc(v * d * 2);
    void* ids = DeviceAlloc(t * 4);
    void* out = DeviceAlloc(t * d * 4);
    Tensor tt = Dev(table, DType::kBF16, {v, d}), ti = Dev(ids, DType::kI32, {t}), to = Dev(out, DType::kF32, {t, d});
    bandwidth_row("EmbeddingLookup", "8192 of 32000 x 4096 bf16", t * d * (2.0 + 4.0),
                  Time([&] { Must(EmbeddingLookup(ti, tt, to), "EmbeddingLookup"); }));
    for (void* p : {table, ids, out}) cudaFree(p);
  }
  {  // Linear with bf16 weights: prefill against a direct cublasGemmEx, decode against the copy.
    const int64_t m = 4096, n = 4096, k = 4096;
    void* x = DeviceAlloc(m * k * 4);
    void* x16 = DeviceAlloc(m * k * 2);
    void* w = DeviceAlloc(n * k * 2);
    void* y = DeviceAlloc(m * n * 4);
    Tensor tw = Dev(w, DType::kBF16, {n, k});
    Tensor tx = Dev(x, DType::kF32, {m, k}), ty = Dev(y, DType::kF32, {m, n});
    const double ours = Time([&] { Must(Linear(tx, tw, nullptr, ty), "Linear"); });
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return 1;
    const float one = 1.0f, zero = 0.0f;
    // y^T [n, m] = w [n, k] . x16^T: column-major A = w^T stored as k x n, op T.
    const double direct = Time([&] {
      cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, w, CUDA_R_16BF, k, x16, CUDA_R_16BF, k, &zero, y,
                   CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    });
    const double flops = 2.0 * m * n * k;
    std::printf("| Linear bf16 (x converted to bf16 + cuBLAS) | %ld x %ld x %ld | %.1f | %.0f TFLOP/s | %.2f | "
                "cublasGemmEx bf16 x bf16 -> f32, same shape (%.0f TFLOP/s) |\n",
                static_cast<long>(m), static_cast<long>(n), static_cast<long>(k), ours * 1e6, flops / ours / 1e12,
                direct / ours, flops / direct / 1e12);
    Tensor tx1 = Dev(x, DType::kF32, {1, k}), ty1 = Dev(y, DType::kF32, {1, n});
    const double decode = Time([&] { Must(Linear(tx1, tw, nullptr, ty1), "Linear decode"); });
    bandwidth_row("Linear bf16, decode (weight bytes)", "1 x 4096 x 4096", 2.0 * n * k, decode);
    cublasDestroy(h);
    for (void* p : {x, x16, w, y}) cudaFree(p);
  }
  return 0;
}

}  // namespace
}  // namespace cleave::kernels

int main() { return cleave::kernels::Main(); }
