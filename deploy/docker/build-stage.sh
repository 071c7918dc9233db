#!/usr/bin/env bash
# Runs inside deploy/docker/Dockerfile's build stages (the repository copied to the working
# directory): builds cleave with scripts/build.sh (extra arguments go to cmake), produces the
# bundled model with scripts/setup-model.sh, and stages what the runtime stage copies under $OUT:
#   $OUT/bin/cleave, $OUT/models/stories260K, $OUT/configs/*.yaml,
#   $OUT/runtime-packages (the distribution packages holding every shared library cleave links).
set -euo pipefail
OUT=${OUT:-/out}
BUILD_DIR=${BUILD_DIR:-build}
export BUILD_DIR
# Tests and benchmarks are not shipped; CLEAVE_BUILD_BENCH=OFF skips Google Benchmark targets.
scripts/build.sh -DCLEAVE_BUILD_BENCH=OFF "$@"
# Uses models/stories260K when the build context has it (run scripts/setup-model.sh on the host
# first), else converts the published checkpoint, checked against its sha256.
CLEAVE="$BUILD_DIR/bin/cleave" scripts/setup-model.sh
mkdir -p "$OUT/bin" "$OUT/models" "$OUT/configs"
install -m 0755 "$BUILD_DIR/bin/cleave" "$OUT/bin/cleave"
cp -r models/stories260K "$OUT/models/"
cp configs/*.yaml "$OUT/configs/"
deploy/docker/runtime-packages.sh "$OUT/bin/cleave" > "$OUT/runtime-packages"
echo "build-stage: runtime packages: $(tr '\n' ' ' < "$OUT/runtime-packages")"
