#!/usr/bin/env bash
# tests/gpu/run.sh [--prebuilt DIR] OUT_DIR — the GPU check, for a machine with an NVIDIA GPU and
# the CUDA toolkit. With --prebuilt, the binaries and libraries that tests/gpu/pack.sh gathered in
# DIR are run instead of building here (for a GPU image without this project's Debian libraries).
#
# Builds the CUDA backend, the GPU test and benchmark binaries and `cleave` (Release, sm_90; only
# the targets needed, so a fresh build fits the budget), then:
#   1. every GPU test (tests/gpu/*_test.cc): each CUDA op family against the CPU reference on fresh
#      random inputs (the seed is printed; CLEAVE_GPU_TEST_SEED=N repeats a run), outputs poisoned
#      before each call; whole models on the device against the HF goldens; KV over CUDA IPC
#      between two processes;
#   2. the CPU unit tests of the same ops (the forwarding to CUDA must not disturb the CPU paths);
#   3. P/D serving with prefill and decode as two processes on the GPU, KV over CUDA IPC, greedy
#      output checked against the CPU engine (pd_cuda_ipc.sh);
#   4. the kernel and model benchmarks (tests/gpu/*_bench.cc): ratios against a device-to-device
#      copy's bandwidth, cuBLAS, or (selective scan) a PyTorch loop, measured in the same run.
# Every step's output goes to OUT_DIR/<step>.log; the summary table (step, result, seconds) is
# printed last and written to OUT_DIR/summary.md. Exit status: 0 when every step passed.
# Designed to finish well inside 8 minutes on a 16-core host (most of it the first build).
set -uo pipefail
PREBUILT=""
if [ "${1:-}" = "--prebuilt" ]; then
  PREBUILT=$(cd "${2:?usage: tests/gpu/run.sh [--prebuilt DIR] OUT_DIR}" && pwd)
  shift 2
fi
OUT=${1:?usage: tests/gpu/run.sh [--prebuilt DIR] OUT_DIR}
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUILD_DIR=${BUILD_DIR:-build-gpu}
if [ -n "$PREBUILT" ]; then
  BUILD_DIR=$PREBUILT
  export LD_LIBRARY_PATH="$PREBUILT/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
JOBS=${JOBS:-$(nproc)}

declare -a SUMMARY
FAILED=0
step() {  # step NAME COMMAND...: runs COMMAND with its output in OUT/NAME.log, records the result
  local name=$1
  shift
  local start=$SECONDS
  echo "=== $name: $*" | tee -a "$OUT/run.log"
  if "$@" >"$OUT/$name.log" 2>&1; then
    SUMMARY+=("| $name | ok | $((SECONDS - start)) |")
  else
    SUMMARY+=("| $name | FAILED (exit $?) | $((SECONDS - start)) |")
    FAILED=1
    tail -n 30 "$OUT/$name.log"
  fi
}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
  nvcc --version 2>/dev/null | tail -n 1 || /usr/local/cuda/bin/nvcc --version | tail -n 1
} | tee "$OUT/environment.txt"

# The GPU binaries: every tests/gpu/*_test.cc and *_bench.cc, the CPU unit tests of the ops they
# forward from, and the cleave binary for the P/D run.
GPU_TESTS=(cuda_ops_test cuda_attention_test cuda_moe_test cuda_ssm_test cuda_sampling_test model_device_test
           kv_transport_gpu_test)
CPU_TESTS=(norm_test rope_test activation_test embedding_test gemm_test attention_test moe_test ssm_conv_test
           ssm_scan_test sampling_test)
BENCHES=(cuda_ops_bench cuda_attention_bench cuda_moe_bench cuda_ssm_bench cuda_sampling_bench model_decode_bench)
if [ -z "$PREBUILT" ]; then
  step configure cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCLEAVE_CUDA=ON -DCLEAVE_BUILD_BENCH=OFF
  step build cmake --build "$BUILD_DIR" --parallel "$JOBS" --target "${GPU_TESTS[@]}" "${CPU_TESTS[@]}" "${BENCHES[@]}" cleave
fi
# The bundled model, converted (the P/D run and the stories260K GPU test read models/stories260K).
if [ ! -d models/stories260K ] && [ -x "$BUILD_DIR/bin/cleave" ]; then
  step setup_model env CLEAVE="$BUILD_DIR/bin/cleave" scripts/setup-model.sh
fi
for t in "${GPU_TESTS[@]}"; do
  [ -x "$BUILD_DIR/bin/$t" ] || { SUMMARY+=("| $t | FAILED (not built) | 0 |"); FAILED=1; continue; }
  step "$t" "$BUILD_DIR/bin/$t" --gtest_output="json:$OUT/$t.json"
done
for t in "${CPU_TESTS[@]}"; do
  [ -x "$BUILD_DIR/bin/$t" ] && step "cpu_$t" "$BUILD_DIR/bin/$t"
done
if [ -x "$BUILD_DIR/bin/cleave" ]; then
  step pd_cuda_ipc tests/gpu/pd_cuda_ipc.sh "$BUILD_DIR/bin/cleave" "$OUT/pd_cuda_ipc"
fi
# The selective-scan target is a ratio against a plain PyTorch loop, where PyTorch is installed.
TORCH_ARGS=()
# (On the GPU only: at this shape the loop takes minutes on a CPU.)
if python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  step torch_scan_loop timeout 180 python3 tools/bench_scan_torch.py
  t=$(awk '/^torch_loop_seconds/ {print $2}' "$OUT/torch_scan_loop.log" | tail -n 1)
  [ -n "$t" ] && TORCH_ARGS=(--torch-seconds "$t")
fi
for b in "${BENCHES[@]}"; do
  [ -x "$BUILD_DIR/bin/$b" ] || continue
  if [ "$b" = cuda_ssm_bench ]; then
    step "$b" "$BUILD_DIR/bin/$b" "${TORCH_ARGS[@]}"
  else
    step "$b" "$BUILD_DIR/bin/$b"
  fi
done

{
  echo
  echo "## tests/gpu/run.sh summary"
  echo
  cat "$OUT/environment.txt"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  for b in "${BENCHES[@]}"; do
    [ -f "$OUT/$b.log" ] || continue
    echo
    echo "### $b"
    grep '^|' "$OUT/$b.log" || true
  done
} | tee "$OUT/summary.md"
exit $FAILED
