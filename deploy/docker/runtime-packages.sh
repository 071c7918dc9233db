#!/usr/bin/env bash
# Prints, one per line, the Debian/Ubuntu packages that hold the shared libraries BINARY links
# (from ldd, resolved with dpkg -S), so that a runtime image of the same distribution installs
# exactly those. Libraries under /usr/local/cuda are left out: the CUDA runtime image has them.
# Fails naming any library that no package owns, or that the loader cannot find.
set -euo pipefail
bin=${1:?usage: runtime-packages.sh BINARY}
libs=$(ldd "$bin")
if grep -q "not found" <<<"$libs"; then
  echo "runtime-packages: unresolved libraries:" >&2
  grep "not found" <<<"$libs" >&2
  exit 1
fi
owner() {
  # Merged /usr: the loader may report /lib/... for a file dpkg knows as /usr/lib/... (or back).
  local f=$1 p
  for p in "$f" "$(readlink -f "$f")" "/usr$f" "${f#/usr}"; do
    dpkg-query -S "$p" 2>/dev/null | head -n1 | cut -d: -f1 && return 0
  done
  echo "runtime-packages: no package owns $f" >&2
  return 1
}
awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$libs" |
  grep -v '^/usr/local/cuda' | sort -u |
  while read -r lib; do owner "$lib"; done | sort -u
