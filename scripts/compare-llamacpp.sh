#!/usr/bin/env bash
# compare-llamacpp.sh — compare cleave's single-stream decode speed on stories260K with llama.cpp
# on the same machine. Run by hand (not in CI); it builds llama.cpp, which takes a while.
#
# Usage (from anywhere; paths are relative to the repo root):
#     scripts/compare-llamacpp.sh [WORK_DIR]          # WORK_DIR defaults to /tmp/cleave-llamacpp
#
# Steps (each is skipped when its output already exists, so reruns are cheap):
#   a) llama.cpp source: extracted from the llama-cpp-python sdist (which vendors llama.cpp),
#      taken from $LCPP_SDIST, else WORK_DIR, else /tmp/lcpp, else downloaded with
#      `pip download llama-cpp-python==$LCPP_PY_VERSION --no-binary :all: --no-deps`.
#   b) CPU-only build of just llama-bench and llama-simple (GGML_NATIVE=ON, OpenMP, no CURL /
#      OpenSSL, no tests/server), with `nice -n 19` and $JOBS parallel jobs (default 1).
#   c) models/stories260K (the HF dir written by `cleave convert llama2c`, see
#      scripts/setup-model.sh) -> WORK_DIR/stories260K-f32.gguf with llama.cpp's
#      convert_hf_to_gguf.py --outtype f32 (using llama.cpp's own gguf-py). When the repo has no
#      models/stories260K yet, an equivalent HF dir is made in WORK_DIR/hf-stories260K from
#      ../shared/models/stories260K with the independent converter in tools/make_goldens.py.
#   d) correctness check: llama-simple (greedy) from BOS must start with
#      "Once upon a time, there was a little girl named Lily".
#   e) llama-bench -p 0 -n 256 -t 1,2 -r $REPS (text generation of 256 tokens, tokens/s; once
#      with an f32 KV cache, like cleave's, and once with llama.cpp's default f16 one; each with
#      flash attention off and on), then
#      cleave's `build/bin/decode_bench models/stories260K 256 $REPS 1 2` when that binary exists
#      (before the llama.cpp run, so both numbers end up next to each other at the bottom).
#
# Environment: LCPP_PY_VERSION (0.3.36), LCPP_SDIST (path to the sdist), JOBS (1), REPS (7),
#              NGEN (256), CLEAVE_MODEL (models/stories260K), DECODE_BENCH (build/bin/decode_bench).
# Noise: on a small shared machine the threads=2 numbers swing wildly when other jobs run, since
# llama.cpp's OpenMP workers spin-wait; OMP_WAIT_POLICY=passive (passed through) tames that.
# Compare both engines in the same run, and check the load average printed with the results.
# Requires: cmake, a C++17 compiler, python3 with numpy, torch, transformers, safetensors and
#           sentencepiece (convert_hf_to_gguf.py and the HF-dir fallback use them).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-/tmp/cleave-llamacpp}
LCPP_PY_VERSION=${LCPP_PY_VERSION:-0.3.36}
JOBS=${JOBS:-1}
REPS=${REPS:-7}
NGEN=${NGEN:-256}
CLEAVE_MODEL=${CLEAVE_MODEL:-$REPO/models/stories260K}
DECODE_BENCH=${DECODE_BENCH:-$REPO/build/bin/decode_bench}
SHARED_STORIES=${SHARED_STORIES:-}
EXPECT="Once upon a time, there was a little girl named Lily"

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SDIST_NAME=llama_cpp_python-$LCPP_PY_VERSION.tar.gz
SRC_ROOT=$WORK/llama_cpp_python-$LCPP_PY_VERSION
LCPP=$SRC_ROOT/vendor/llama.cpp
BUILD=$WORK/build
GGUF=$WORK/stories260K-f32.gguf
log() { printf '\n== %s\n' "$*"; }

# ---- a) llama.cpp source ------------------------------------------------------------------
if [ ! -f "$LCPP/CMakeLists.txt" ]; then
  SDIST=${LCPP_SDIST:-}
  for cand in "$WORK/$SDIST_NAME" "/tmp/lcpp/$SDIST_NAME"; do
    if [ -z "$SDIST" ] && [ -f "$cand" ]; then SDIST=$cand; fi
  done
  if [ -z "$SDIST" ]; then
    log "downloading llama-cpp-python==$LCPP_PY_VERSION sdist"
    python3 -m pip download "llama-cpp-python==$LCPP_PY_VERSION" --no-binary :all: --no-deps -d "$WORK"
    SDIST=$WORK/$SDIST_NAME
  fi
  log "extracting $SDIST"
  tar -xzf "$SDIST" -C "$WORK"
fi
# The sdist has no git metadata; the llama.cpp commit is named in its CHANGELOG.
LCPP_COMMIT=$(grep -m1 -o 'ggml-org/llama.cpp@[0-9a-f]*' "$SRC_ROOT/CHANGELOG.md" | cut -d@ -f2 || true)
LCPP_COMMIT=${LCPP_COMMIT:-unknown}
echo "llama.cpp: $LCPP (llama-cpp-python $LCPP_PY_VERSION, llama.cpp commit $LCPP_COMMIT)"

# Workaround: llama-bench's -ctk/-ctv parser knows only f16/bf16/quantized names, not f32 (the
# library itself supports an f32 KV cache). Teach it "f32" so the KV cache can match cleave's.
BENCH_CPP=$LCPP/tools/llama-bench/llama-bench.cpp
if ! grep -q 'cleave: f32 KV' "$BENCH_CPP"; then
  sed -i 's|^static ggml_type ggml_type_from_name(const std::string & s) {$|&\n    if (s == "f32") { return GGML_TYPE_F32; }  // cleave: f32 KV|' "$BENCH_CPP"
  grep -q 'cleave: f32 KV' "$BENCH_CPP" || { echo "patching $BENCH_CPP failed" >&2; exit 1; }
  rm -f "$BUILD/bin/llama-bench"
fi

# ---- b) build llama-bench + llama-simple --------------------------------------------------
if [ ! -x "$BUILD/bin/llama-bench" ] || [ ! -x "$BUILD/bin/llama-simple" ]; then
  log "building llama.cpp (CPU only; nice -n 19, -j$JOBS)"
  t0=$(date +%s)
  if [ ! -f "$BUILD/CMakeCache.txt" ]; then
    # LLAMA_BUILD_COMMIT/NUMBER: there is no .git in the sdist (its vendor/llama.cpp/.git file
    # points at a missing gitdir), so pass the commit explicitly for llama-bench's build_commit.
    nice -n 19 cmake -S "$LCPP" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
      -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF \
      -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
      -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=ON \
      -DLLAMA_BUILD_COMMIT="$LCPP_COMMIT" -DLLAMA_BUILD_NUMBER=0
  fi
  nice -n 19 cmake --build "$BUILD" -j "$JOBS" --target llama-bench llama-simple
  echo "build took $(( $(date +%s) - t0 )) s"
fi

# ---- c) HF dir -> F32 GGUF ----------------------------------------------------------------
HF=$CLEAVE_MODEL
if [ ! -f "$HF/config.json" ] || [ ! -f "$HF/model.safetensors" ] || [ ! -f "$HF/tokenizer.model" ]; then
  HF=$WORK/hf-stories260K
  if [ ! -f "$HF/model.safetensors" ] || [ ! -f "$HF/tokenizer.model" ]; then
    if [ -z "$SHARED_STORIES" ]; then
      for cand in "$REPO/../shared/models/stories260K" /work/shared/models/stories260K; do
        if [ -z "$SHARED_STORIES" ] && [ -f "$cand/stories260K.bin" ]; then SHARED_STORIES=$cand; fi
      done
    fi
    [ -n "$SHARED_STORIES" ] || { echo "stories260K checkpoint not found" >&2; exit 1; }
    log "no $CLEAVE_MODEL yet: writing an equivalent HF dir to $HF (tools/make_goldens.py converter)"
    REPO="$REPO" SRC="$SHARED_STORIES" OUT="$HF" python3 - <<'EOF'
import os, shutil, sys
from pathlib import Path
sys.path.insert(0, os.path.join(os.environ["REPO"], "tools"))
from make_goldens import load_llama2c
src, out = Path(os.environ["SRC"]), Path(os.environ["OUT"])
model, meta = load_llama2c(src / "stories260K.bin")
out.mkdir(parents=True, exist_ok=True)
model.save_pretrained(out, safe_serialization=True)
shutil.copyfile(src / "tok512.model", out / "tokenizer.model")
print("wrote", out, meta)
EOF
  fi
fi
echo "HF model dir: $HF"
if [ ! -f "$GGUF" ] || [ "$HF/model.safetensors" -nt "$GGUF" ]; then
  log "converting $HF -> $GGUF (f32)"
  # Use llama.cpp's own gguf-py, which matches this convert_hf_to_gguf.py.
  PYTHONPATH="$LCPP/gguf-py${PYTHONPATH:+:$PYTHONPATH}" nice -n 19 \
    python3 "$LCPP/convert_hf_to_gguf.py" "$HF" --outtype f32 --outfile "$GGUF.tmp"
  mv "$GGUF.tmp" "$GGUF"
fi

# ---- d) greedy output check ----------------------------------------------------------------
log "greedy check: llama-simple, empty prompt (BOS only), 64 tokens"
# llama-simple always uses a greedy sampler; with an empty prompt it feeds only BOS.
SIMPLE_OUT=$("$BUILD/bin/llama-simple" -m "$GGUF" -n 64 "" 2>"$WORK/llama-simple.log")
echo "$SIMPLE_OUT"
if printf '%s' "$SIMPLE_OUT" | sed 's/^<s>//; s/^ *//' | tr '\n' ' ' | grep -qF "$EXPECT"; then
  echo "greedy check: OK (starts with \"$EXPECT\")"
else
  echo "greedy check: FAILED, expected \"$EXPECT\" (see $WORK/llama-simple.log)" >&2
  exit 1
fi

# ---- e) benchmarks -------------------------------------------------------------------------
CLEAVE_OUT=""
if [ -x "$DECODE_BENCH" ]; then
  log "cleave: decode_bench $CLEAVE_MODEL $NGEN $REPS 1 2"
  CLEAVE_OUT=$(cd "$REPO" && "$DECODE_BENCH" "$CLEAVE_MODEL" "$NGEN" "$REPS" 1 2 2>&1) || \
    CLEAVE_OUT="decode_bench failed: $CLEAVE_OUT"
else
  CLEAVE_OUT="(no $DECODE_BENCH yet: cleave not benchmarked)"
fi

# Two KV-cache types: f32 matches cleave's f32 KV cache; f16 is llama-bench's default. Flash
# attention both off and on: the default (auto) turns it on for CPU, which is slower on this tiny
# model, especially with an f32 KV cache.
LCPP_TABLE=""
for kv in f32 f16; do
  log "llama.cpp: llama-bench -m stories260K-f32.gguf -p 0 -n $NGEN -t 1,2 -r $REPS -ctk $kv -ctv $kv -fa 0,1"
  "$BUILD/bin/llama-bench" -m "$GGUF" -p 0 -n "$NGEN" -t 1,2 -r "$REPS" -ctk "$kv" -ctv "$kv" \
    -fa 0,1 -o json >"$WORK/llama-bench-kv$kv.json" 2>"$WORK/llama-bench-kv$kv.log"
  # llama-bench reports avg +- stddev; the per-repetition samples in its JSON give the median.
  LCPP_TABLE+=$(python3 - "$WORK/llama-bench-kv$kv.json" <<'EOF'
import json, statistics, sys
for r in json.load(open(sys.argv[1])):
    ts = r.get("samples_ts") or [r["avg_ts"]]
    print(f"llama.cpp threads={r['n_threads']}  KV {r.get('type_k', '?')}  tokens/s median "
          f"{statistics.median(ts):.0f}  (min {min(ts):.0f}, max {max(ts):.0f}; mean "
          f"{r['avg_ts']:.0f} +- {r.get('stddev_ts', 0):.0f}; {len(ts)} runs of "
          f"{r['n_gen']} tokens; flash_attn {r.get('flash_attn', '?')})")
EOF
)$'\n'
done

log "single-stream decode, stories260K f32, $NGEN tokens (load average: $(cut -d' ' -f1-3 /proc/loadavg))"
echo "--- llama.cpp ($LCPP_COMMIT via llama-cpp-python $LCPP_PY_VERSION), $(nproc) CPUs"
printf '%s' "$LCPP_TABLE"
echo "--- cleave"
echo "$CLEAVE_OUT"
