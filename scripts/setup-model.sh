#!/usr/bin/env bash
# Produces models/stories260K (git-ignored), the model cleave ships and serves by default, by
# converting the llama2.c checkpoint with `cleave convert llama2c`. The checkpoint comes from
# ../shared/models/stories260K when that folder exists, else from the published copy on the
# Hugging Face hub (karpathy/tinyllamas), checked against its sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
CLEAVE=${CLEAVE:-build/bin/cleave}
OUT=models/stories260K
SRC=../shared/models/stories260K
CKPT_SHA=b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696
TOK_SHA=fec6aa960a1fb3ebf71d26f9b0e486afcbd76c34cf0fbfb93e21126ca9f778d3

if [ -f "$OUT/model.safetensors" ] && [ -f "$OUT/config.json" ] && [ -f "$OUT/tokenizer.model" ]; then
  echo "setup-model: $OUT is ready"
  exit 0
fi
if [ ! -d "$SRC" ]; then
  SRC=.cache/stories260K
  mkdir -p "$SRC"
  base=https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K
  for f in stories260K.bin tok512.model; do
    [ -f "$SRC/$f" ] || curl -fL --retry 3 -o "$SRC/$f" "$base/$f"
  done
fi
echo "$CKPT_SHA  $SRC/stories260K.bin" | sha256sum -c --quiet
echo "$TOK_SHA  $SRC/tok512.model" | sha256sum -c --quiet
"$CLEAVE" convert llama2c --checkpoint "$SRC/stories260K.bin" --tokenizer "$SRC/tok512.model" --out "$OUT"
echo "setup-model: wrote $OUT"
