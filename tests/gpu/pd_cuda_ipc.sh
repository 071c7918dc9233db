#!/usr/bin/env bash
# tests/gpu/pd_cuda_ipc.sh CLEAVE_BIN OUT_DIR — prefill and decode workers as two processes on one
# GPU (configs/gpu-pd.yaml: cuda:0, KV over CUDA IPC), behind the real scheduler and frontend.
# Greedy completions must equal the CPU engine's (`cleave generate --device cpu`) token for token;
# a bad request must get HTTP 400 and the next good one must still be served. Run by
# tests/gpu/run.sh; needs the stories260K model at models/stories260K (scripts/setup-model.sh).
set -euo pipefail
CLEAVE=${1:?usage: pd_cuda_ipc.sh CLEAVE_BIN OUT_DIR}
OUT=${2:?usage: pd_cuda_ipc.sh CLEAVE_BIN OUT_DIR}
cd "$(dirname "$0")/../.."
mkdir -p "$OUT"
MODEL=models/stories260K
[ -d "$MODEL" ] || { echo "pd_cuda_ipc: $MODEL missing (scripts/setup-model.sh)"; exit 1; }

"$CLEAVE" serve --config configs/gpu-pd.yaml >"$OUT/serve.log" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null || true' EXIT

# Ready when the frontend reports the cluster can serve (both workers registered, models loaded).
for _ in $(seq 1 120); do
  if curl -sf localhost:8000/ready >/dev/null 2>&1; then break; fi
  if ! kill -0 $SERVE 2>/dev/null; then echo "serve exited:"; tail -n 40 "$OUT/serve.log"; exit 1; fi
  # A worker that cannot start (no device, out of memory) fails the run at once, not after 60 s.
  if grep -q "exited with status" "$OUT/serve.log"; then echo "a worker exited:"; tail -n 40 "$OUT/serve.log"; exit 1; fi
  sleep 0.5
done
curl -sf localhost:8000/ready >/dev/null || { echo "not ready after 60 s"; tail -n 40 "$OUT/serve.log"; exit 1; }

completion_tokens() {  # prompt -> the completion's text (greedy, 48 tokens, EOS ignored)
  curl -sf localhost:8000/v1/completions -H 'Content-Type: application/json' \
    -d "{\"model\": \"stories260K\", \"prompt\": \"$1\", \"max_tokens\": 48, \"temperature\": 0, \"ignore_eos\": true}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])'
}
reference() {  # the CPU engine's text for the same request
  "$CLEAVE" generate --model "$MODEL" --device cpu --prompt "$1" --max-tokens 48 --temperature 0 --ignore-eos \
    --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["text"])'
}

fail=0
for prompt in "Once upon a time" "The little dog" "Lily wanted to"; do
  got=$(completion_tokens "$prompt")
  want=$(reference "$prompt")
  if [ "$got" == "$want" ]; then
    echo "ok: '$prompt' -> identical greedy text on GPU P/D and the CPU engine"
  else
    echo "MISMATCH for '$prompt':"; echo "  gpu p/d: $got"; echo "  cpu:     $want"; fail=1
  fi
done

# A bad request is refused with a clear error, and the service still serves afterwards.
code=$(curl -s -o "$OUT/bad.json" -w '%{http_code}' localhost:8000/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "stories260K", "prompt": "x", "max_tokens": -3}')
if [ "$code" != 400 ]; then echo "bad request got HTTP $code, want 400"; fail=1; fi
after=$(completion_tokens "Once upon a time")
[ -n "$after" ] || { echo "no completion after the bad request"; fail=1; }

# Both workers really ran on the GPU and KV moved over CUDA IPC.
grep -q "cuda:0" "$OUT/serve.log" || { echo "serve log never mentions cuda:0"; fail=1; }
grep -qi "cuda-ipc" "$OUT/serve.log" || { echo "serve log never mentions cuda-ipc"; fail=1; }
exit $fail
