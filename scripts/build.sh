#!/usr/bin/env bash
# Configures and builds cleave into build/ (Release-with-debug-info, CUDA when a toolkit exists).
# Extra arguments go to cmake's configure step, e.g. scripts/build.sh -DCLEAVE_CUDA=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja "$@" >/dev/null
cmake --build "$BUILD_DIR" --parallel "${JOBS:-$(nproc)}"
