#!/usr/bin/env bash
# tests/gpu/pack.sh [BUILD_DIR] [DEST] — for a GPU machine whose image has the CUDA toolkit, CMake
# and ninja but not this project's Debian libraries (Abseil, GoogleTest, OpenBLAS, gRPC...): the
# GPU test binaries built here, plus every shared library they load that is neither glibc's nor
# CUDA's, copied into DEST (default .gpu-carry, git-ignored) so that the whole folder can travel
# to the machine, packed as DEST.tar.xz. There: `tar xJf .gpu-carry.tar.xz && tests/gpu/run.sh
# --prebuilt .gpu-carry OUT_DIR`.
#
# CUDA's own libraries (libcudart, libcublas, libcublasLt: the last alone is 0.5 GB) are not
# copied: the binaries look for them in /usr/local/cuda/lib, as the toolkit lays them out.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD_DIR=${1:-build-gpu}
DEST=${2:-.gpu-carry}
# The lists of tests/gpu/run.sh.
eval "$(sed -n '/^GPU_TESTS=(/,/^BENCHES=(.*)$/p' tests/gpu/run.sh)"
BINS=("${GPU_TESTS[@]}" "${CPU_TESTS[@]}" "${BENCHES[@]}" cleave)
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCLEAVE_CUDA=ON -DCLEAVE_BUILD_BENCH=OFF >/dev/null
cmake --build "$BUILD_DIR" --parallel "${JOBS:-$(nproc)}" --target "${BINS[@]}"
rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/lib"
for b in "${BINS[@]}"; do
  cp "$BUILD_DIR/bin/$b" "$DEST/bin/"
  ldd "$BUILD_DIR/bin/$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*|libcuda.so.*|libcudart.so.*|libcublas*.so.*|libnccl.so.*) ;;
      *) cp -Ln "$lib" "$DEST/lib/" ;;
    esac
  done
done
# The tests read golden data by relative path from the repository root, which travels anyway; the
# converted model (models/stories260K, git-ignored) must be carried next to .gpu-carry.
# libnccl (218 MB) is not copied either: the transport loads it at run time (dlopen) and the NCCL
# path reports Unavailable where the image lacks it; CUDA IPC needs only the CUDA runtime.
# Symbols are not needed to run; an archive travels in a quarter of the space (the device
# carry limit is 64 MiB in all): there, `tar xJf .gpu-carry.tar.xz` first.
strip -s "$DEST"/bin/* "$DEST"/lib/* 2>/dev/null || true
tar -cJf "$DEST.tar.xz" "$DEST"
du -sh "$DEST" "$DEST.tar.xz"
grep -qx '/.gpu-carry*' .git/info/exclude 2>/dev/null || echo '/.gpu-carry*' >>.git/info/exclude
