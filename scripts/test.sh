#!/usr/bin/env bash
# The whole test suite, as CI runs it: the release build (with CUDA sources compiled when a
# toolkit exists) and every CTest test, then the unit tests under ASan+UBSan, then a short
# libFuzzer smoke run of each fuzz target. Slow suites (long fuzz campaigns, benchmarks) are
# separate: scripts/fuzz.sh, scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-$(nproc)}
start=$(date +%s)
stage() { echo; echo "=== $1 ($(($(date +%s) - start)) s)"; }
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
# Every ctest run's output also goes to $LOG, for the one-line total at the end.
run_ctest() { ctest "$@" 2>&1 | tee -a "$LOG"; }

stage "release build"
scripts/build.sh
stage "bundled model"
scripts/setup-model.sh
stage "tests (release)"
run_ctest --test-dir build --output-on-failure -j "$JOBS"

stage "ASan+UBSan build"
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCLEAVE_SANITIZE=ON -DCLEAVE_CUDA=OFF \
  -DCLEAVE_BUILD_BENCH=OFF >/dev/null
cmake --build build-asan --parallel "$JOBS"
stage "tests (ASan+UBSan)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  run_ctest --test-dir build-asan --output-on-failure -j "$JOBS" -L "unit|integration"

stage "fuzz targets (clang, libFuzzer smoke)"
CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCLEAVE_FUZZ=ON -DCLEAVE_CUDA=OFF -DCLEAVE_BUILD_BENCH=OFF >/dev/null
cmake --build build-fuzz --parallel "$JOBS"
run_ctest --test-dir build-fuzz --output-on-failure -L fuzz

stage "done"
total=$(( $(sed -n 's/.*tests failed out of \([0-9]*\).*/\1/p' "$LOG" | paste -sd+) ))
failed=$(( $(sed -n 's/.*, \([0-9]*\) tests failed out of.*/\1/p' "$LOG" | paste -sd+) ))
echo "tests: $((total - failed)) passed, $((failed)) failed"
