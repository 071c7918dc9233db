#!/usr/bin/env bash
# A longer libFuzzer campaign on every fuzz target (CI runs 20 s each; this defaults to 10 min).
# New corpus entries are written to build-fuzz/corpus/<target>; crashes to build-fuzz/crashes.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_TARGET=${1:-600}
CC=clang-14 CXX=clang++-14 cmake -S . -B build-fuzz -G Ninja -DCLEAVE_FUZZ=ON -DCLEAVE_CUDA=OFF \
  -DCLEAVE_BUILD_BENCH=OFF >/dev/null
cmake --build build-fuzz --parallel "$(nproc)"
mkdir -p build-fuzz/crashes
for f in build-fuzz/bin/*_fuzz; do
  name=$(basename "$f")
  mkdir -p "build-fuzz/corpus/$name"
  echo "=== $name for ${SECONDS_PER_TARGET}s"
  "$f" -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -artifact_prefix=build-fuzz/crashes/ \
    "build-fuzz/corpus/$name" "tests/fuzz/corpus/$name"
done
