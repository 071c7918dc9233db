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
  libopenblas-dev libpcre2-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc   # control plane, gRPC API
  libssl-dev openssl iproute2                                              # KV transport auth, dev certs, tests/cluster
  libboost-dev libboost-system-dev libyaml-cpp-dev                         # Beast HTTP, configs
  prometheus                                                               # promtool for metrics_test (systemd hosts also get its :9090 service)
  curl python3 python3-venv                                                # e2e / integration tests
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

# The e2e suite's real clients (openai SDK, grpcio + tools for a stub from our protos, pytest)
# and the deployment tests' tools (kubectl with kustomize v5, kubernetes-validate, hadolint) go
# into a virtual environment, .venv (git-ignored; Debian's python refuses system-wide pip).
# Skipped when already satisfied. The golden-data tools (run by hand, never in CI) list theirs in
# tools/requirements.txt.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$ROOT/.venv/bin/python" ] || python3 -m venv "$ROOT/.venv"
for REQS in "$ROOT/tests/e2e/requirements.txt" "$ROOT/tests/deploy/requirements.txt"; do
  [ -f "$REQS" ] || continue
  if ! "$ROOT/.venv/bin/python" - "$REQS" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, want = line.split("==")
        assert version(name) == want, name
PY
  then
    echo "install-deps: pip install -r ${REQS#"$ROOT"/} into .venv"
    "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$REQS"
  fi
done
echo "install-deps: ok"
