#!/usr/bin/env bash
# Benchmarks (not part of CI): kernel micro-benchmarks and the single-stream decode benchmark on
# the bundled model. Results print to stdout; record them in bench/results/ with date and commit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
scripts/setup-model.sh
for b in build/bin/*_bench; do
  [ "$(basename "$b")" = decode_bench ] && continue
  echo "=== $b"
  "$b" --benchmark_min_time="${MIN_TIME:-0.2}"
done
echo "=== decode (stories260K, greedy, 256 tokens)"
build/bin/decode_bench models/stories260K 256 7 1 2
