#!/usr/bin/env bash
# tests/gpu/run.sh [--prebuilt DIR] OUT_DIR — the GPU check, for a machine with an NVIDIA GPU and
# the CUDA toolkit. With --prebuilt, the binaries and libraries that tests/gpu/pack.sh gathered in
# DIR are run instead of building here (for a GPU image without this project's Debian libraries).
#
# Builds the CUDA backend and the GPU test and benchmark binaries (Release, sm_90; only the targets
# needed, so a fresh build fits the budget), then:
#   1. cuda_ops_test: every CUDA op against the CPU reference on fresh random inputs (the seed is
#      printed; CLEAVE_GPU_TEST_SEED=N repeats a run), outputs poisoned before each call;
#   2. the CPU unit tests of the same ops (the forwarding to CUDA must not disturb the CPU paths);
#   3. cuda_ops_bench: kernel throughput as ratios against a device-to-device copy (bandwidth) or
#      cuBLAS's own figure, measured in the same run.
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

if [ -z "$PREBUILT" ]; then
  step configure cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCLEAVE_CUDA=ON -DCLEAVE_BUILD_BENCH=OFF
  step build cmake --build "$BUILD_DIR" --parallel "$JOBS" --target cuda_ops_test cuda_ops_bench norm_test rope_test \
    activation_test embedding_test gemm_test
fi
if [ -x "$BUILD_DIR/bin/cuda_ops_test" ]; then
  step cuda_ops_test "$BUILD_DIR/bin/cuda_ops_test" --gtest_output="json:$OUT/cuda_ops_test.json"
  for t in norm_test rope_test activation_test embedding_test gemm_test; do
    step "cpu_$t" "$BUILD_DIR/bin/$t"
  done
  step cuda_ops_bench "$BUILD_DIR/bin/cuda_ops_bench"
fi

{
  echo
  echo "## tests/gpu/run.sh summary"
  echo
  cat "$OUT/environment.txt"
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  if [ -f "$OUT/cuda_ops_bench.log" ]; then
    echo
    grep '^|' "$OUT/cuda_ops_bench.log" || true
  fi
} | tee "$OUT/summary.md"
exit $FAILED
