#!/usr/bin/env bash
# Installs everything building and testing cleave needs on a fresh Debian 12 machine.
# Idempotent and fast when all is present (checks with dpkg before calling apt-get).
# CUDA is not installed here: when a toolkit is present (/usr/local/cuda) the build uses it.
set -euo pipefail

DEB_PACKAGES=(
  build-essential cmake ninja-build pkg-config ccache git curl ca-certificates
  clang-14 libclang-rt-14-dev            # libFuzzer targets
  libabsl-dev libgtest-dev libgmock-dev libbenchmark-dev
  nlohmann-json3-dev libcli11-dev
  libopenblas-dev libsentencepiece-dev libpcre2-dev
)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# No Python packages yet: the test suite runs C++ binaries and bash. The golden-data tools
# (run by hand, never in CI) list theirs in tools/requirements.txt.
echo "install-deps: ok"
