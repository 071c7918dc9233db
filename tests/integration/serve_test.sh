#!/usr/bin/env bash
# `cleave serve` smoke test with curl, also run under ASan+UBSan: the whole process tree starts
# (scheduler, prefill, decode, frontend), serves completions and a streamed chat, refuses bad
# input and keeps serving, and stops cleanly (exit 0) on SIGTERM. The thorough suite is tests/e2e.
set -uo pipefail
CLEAVE=${1:?usage: serve_test.sh path/to/cleave}
TMP=$(mktemp -d)
passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $1"; }
bad() { failed=$((failed + 1)); echo "FAIL: $1"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
HTTP=$(port); GRPC=$(port); SCHED=$(port); SHTTP=$(port)
cat > "$TMP/c.yaml" <<YAML
model: models/stories260K
scheduler: {listen: "127.0.0.1:$SCHED", http: "127.0.0.1:$SHTTP"}
workers:
  - {role: prefill, kv_blocks: 256, threads: 1}
  - {role: decode, kv_blocks: 256, threads: 1}
frontend: {http: "127.0.0.1:$HTTP", grpc: "127.0.0.1:$GRPC"}
YAML
"$CLEAVE" serve --config "$TMP/c.yaml" >"$TMP/out" 2>"$TMP/err" &
PID=$!
trap 'kill -9 $PID 2>/dev/null; rm -rf "$TMP"' EXIT
for _ in $(seq 1 600); do grep -q "cleave: serving" "$TMP/out" && break; sleep 0.1; done
grep -q "cleave: serving" "$TMP/out" && ok "serve announced its URL" || { bad "serve not ready"; cat "$TMP/err"; }
URL=http://127.0.0.1:$HTTP

body='{"model":"stories260K","prompt":"Once upon a time","max_tokens":20,"temperature":0}'
out=$(curl -s -X POST "$URL/v1/completions" -H 'Content-Type: application/json' -d "$body")
ref=$("$CLEAVE" generate --model models/stories260K --prompt "Once upon a time" --max-tokens 20 \
      --temperature 0 --json 2>/dev/null)
text=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["choices"][0]["text"])' "$out" 2>/dev/null)
want=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["text"])' "$ref" 2>/dev/null)
[[ -n "$text" && "$text" == "$want" ]] && ok "completion equals cleave generate" || bad "completion: $out vs $ref"

chat='{"model":"stories260K","messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"stream":true}'
sse=$(curl -sN -X POST "$URL/v1/chat/completions" -H 'Content-Type: application/json' -d "$chat")
[[ "$sse" == *'"chat.completion.chunk"'* && "$(printf '%s' "$sse" | tail -n 2)" == *"data: [DONE]"* ]] \
  && ok "streamed chat ends with [DONE]" || bad "stream: $sse"

code=$(curl -s -o "$TMP/e" -w '%{http_code}' -X POST "$URL/v1/completions" -H 'Content-Type: application/json' \
       -d '{"model":"stories260K","prompt":"x","max_tokens":-4}')
[[ "$code" == 400 ]] && grep -q '"error"' "$TMP/e" && ok "bad max_tokens is 400" || bad "bad input: $code"
out=$(curl -s -X POST "$URL/v1/completions" -H 'Content-Type: application/json' -d "$body")
[[ "$out" == *'"text_completion"'* ]] && ok "served after the bad request" || bad "after bad: $out"

# Every process's /metrics passes promtool: the frontend, the scheduler, each discovered worker.
if command -v promtool >/dev/null; then
  targets="127.0.0.1:$HTTP 127.0.0.1:$SHTTP $(curl -s "http://127.0.0.1:$SHTTP/discovery/prometheus" |
    python3 -c 'import json,sys; print(" ".join(t for g in json.load(sys.stdin) for t in g["targets"]))')"
  n=0
  for t in $targets; do
    curl -s "http://$t/metrics" | promtool check metrics >"$TMP/lint" 2>&1 && n=$((n + 1)) || cat "$TMP/lint"
  done
  [[ $n == 4 ]] && ok "promtool accepts the metrics of all 4 processes" || bad "promtool: $n of 4 ($targets)"
else
  bad "promtool not installed (scripts/install-deps.sh installs the prometheus package)"
fi

used=$(curl -s "$URL/debug/kv" | python3 -c 'import json,sys; print(sum(w["used_blocks"] for w in json.load(sys.stdin)["workers"]))')
[[ "$used" == 0 ]] && ok "no KV blocks in use when idle" || bad "used blocks: $used"

kill -TERM $PID
for _ in $(seq 1 300); do kill -0 $PID 2>/dev/null || break; sleep 0.1; done
if kill -0 $PID 2>/dev/null; then bad "serve still running 30 s after SIGTERM"; else
  wait $PID; rc=$?; [[ $rc == 0 ]] && ok "serve stopped cleanly on SIGTERM" || { bad "serve exit $rc"; tail -20 "$TMP/err"; }
fi
left=$(pgrep -f "127.0.0.1:$SCHED" | wc -l)
[[ "$left" == 0 ]] && ok "no process left behind" || bad "$left processes left"
# Two roles on one fixed port: refused before anything starts.
sed "s/http: \"127.0.0.1:$SHTTP\"/http: \"127.0.0.1:$HTTP\"/" "$TMP/c.yaml" > "$TMP/clash.yaml"
"$CLEAVE" serve --config "$TMP/clash.yaml" >/dev/null 2>"$TMP/clash.err"; rc=$?
[[ $rc != 0 ]] && grep -q "port conflict" "$TMP/clash.err" && ok "a port clash is a config error" \
  || bad "port clash: rc $rc, $(cat "$TMP/clash.err")"
echo "serve_test: $passed passed, $failed failed"
[[ $failed == 0 ]]
