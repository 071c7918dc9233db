#!/usr/bin/env bash
# `cleave convert` + `cleave generate` as a user runs them: the real binary, real files.
# Every failure case is followed by a normal run proving the binary still works.
set -uo pipefail
CLEAVE=${1:?usage: generate_test.sh path/to/cleave}
SHARED=../shared/models/stories260K
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $1"; }
bad() { failed=$((failed + 1)); echo "FAIL: $1"; }
expect_fail() {  # name, expected message fragment, command...
  local name=$1 frag=$2
  shift 2
  if "$@" >"$TMP/out" 2>"$TMP/err"; then
    bad "$name: exited 0"
  elif ! grep -q -- "$frag" "$TMP/err"; then
    bad "$name: stderr lacks '$frag': $(head -c 300 "$TMP/err")"
  else
    ok "$name"
  fi
}
GOLDEN_START="Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
normal_run() {  # proves the binary still works after a failure case
  local out
  out=$("$CLEAVE" generate --model "$TMP/m" --temperature 0 --max-tokens 40 2>/dev/null)
  [[ "$out" == "$GOLDEN_START"* ]] && ok "normal run after: $1" || bad "normal run after $1: '$out'"
}

"$CLEAVE" convert llama2c --checkpoint "$SHARED/stories260K.bin" --tokenizer "$SHARED/tok512.model" \
  --out "$TMP/m" 2>"$TMP/err" && ok "convert" || bad "convert: $(cat "$TMP/err")"

# Greedy from BOS: the story begins as the reference implementation's does; summary on stderr.
out=$("$CLEAVE" generate --model "$TMP/m" --temperature 0 --max-tokens 60 2>"$TMP/err")
[[ "$out" == "$GOLDEN_START"* ]] && ok "greedy story start" || bad "greedy story start: '$out'"
grep -Eq 'prompt_tokens=1 generated_tokens=[0-9]+ time_to_first_token_ms=[0-9.]+ decode_tokens_per_s=[0-9.]+' "$TMP/err" &&
  ok "summary line" || bad "summary line: $(cat "$TMP/err")"

# A prompt is echoed and continued; a fixed seed reproduces a sampled completion.
out=$("$CLEAVE" generate --model "$TMP/m" --prompt "Tom had a red ball" --temperature 0 --max-tokens 20 2>/dev/null)
[[ "$out" == "Tom had a red ball"* && ${#out} -gt 25 ]] && ok "prompt continued" || bad "prompt continued: '$out'"
a=$("$CLEAVE" generate --model "$TMP/m" --prompt "Once" --temperature 0.9 --top-p 0.9 --top-k 40 --seed 7 --max-tokens 50 2>/dev/null)
b=$("$CLEAVE" generate --model "$TMP/m" --prompt "Once" --temperature 0.9 --top-p 0.9 --top-k 40 --seed 7 --max-tokens 50 2>/dev/null)
c=$("$CLEAVE" generate --model "$TMP/m" --prompt "Once" --temperature 0.9 --top-p 0.9 --top-k 40 --seed 8 --max-tokens 50 2>/dev/null)
[[ "$a" == "$b" && -n "$a" ]] && ok "seed reproduces" || bad "seed reproduces: '$a' vs '$b'"
[[ "$a" != "$c" ]] && ok "different seeds differ" || bad "different seeds gave the same text"

# Errors: clear message, non-zero exit, never a crash.
expect_fail "missing model dir" "does not exist" "$CLEAVE" generate --model "$TMP/nope" --prompt hi
normal_run "missing model dir"
mkdir -p "$TMP/empty"
expect_fail "no config.json" "config.json" "$CLEAVE" generate --model "$TMP/empty" --prompt hi
cp -r "$TMP/m" "$TMP/badcfg" && echo '{"architectures": ["LlamaForCausalLM"], "hidden_size": "x"' >"$TMP/badcfg/config.json"
expect_fail "malformed config.json" "config" "$CLEAVE" generate --model "$TMP/badcfg" --prompt hi
cp -r "$TMP/m" "$TMP/arch" && sed -i 's/LlamaForCausalLM/GPTBigCodeForCausalLM/' "$TMP/arch/config.json"
expect_fail "unsupported architecture" "unsupported architecture" "$CLEAVE" generate --model "$TMP/arch" --prompt hi
normal_run "unsupported architecture"
cp -r "$TMP/m" "$TMP/trunc" && truncate -s 5000 "$TMP/trunc/model.safetensors"
expect_fail "truncated safetensors" "model.safetensors" "$CLEAVE" generate --model "$TMP/trunc" --prompt hi
long=$(printf 'the cat sat on the mat and %.0s' $(seq 1 200))
expect_fail "prompt longer than context" "context" "$CLEAVE" generate --model "$TMP/m" --prompt "$long"
normal_run "prompt longer than context"
expect_fail "bad temperature" "temperature" "$CLEAVE" generate --model "$TMP/m" --prompt hi --temperature -1
expect_fail "bad top_p" "top_p" "$CLEAVE" generate --model "$TMP/m" --prompt hi --top-p 0
normal_run "bad sampling parameters"
expect_fail "bad checkpoint" "header" "$CLEAVE" convert llama2c --checkpoint "$TMP/m/config.json" --out "$TMP/x"

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
