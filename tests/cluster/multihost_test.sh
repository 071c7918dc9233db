#!/usr/bin/env bash
# Multi-host serving on one machine: each role runs on its own "host" (a network namespace with its
# own address), joined by veth pairs to a bridge that lives in a "switch" namespace of its own, so
# nothing touches the host's network. With mTLS on the control plane and the KV cluster secret on:
#   1. the frontend is ready and the scheduler lists all 4 workers; a worker without a client
#      certificate is refused;
#   2. 16 concurrent completions across hosts equal `cleave generate` and KV bytes crossed hosts;
#   3. one decode host's link goes down mid-stream: every stream ends (completed or a clear error)
#      within 30 s, the scheduler drops the worker when its lease lapses, the rest serve;
#   4. the link comes back: the worker re-registers and serves again; no KV block stays held;
#   5. every process stops cleanly on SIGTERM.
# Needs root (ip netns). Usage: multihost_test.sh path/to/cleave (from the repo root; ctest does
# this). CLEAVE_CLUSTER_TLS=0 runs the control plane in plaintext (development only).
set -uo pipefail
CLEAVE=$(realpath "${1:?usage: multihost_test.sh path/to/cleave}")
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT" || exit 1
MODEL=models/stories260K
PY=${CLEAVE_TEST_PYTHON:-$ROOT/.venv/bin/python}
TLS=${CLEAVE_CLUSTER_TLS:-1}
BUDGET_S=${CLEAVE_CLUSTER_BUDGET_S:-280}  # the whole test, start to cleanup
LEASE_MS=3000

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok: $1"; }
bad() { failed=$((failed + 1)); echo "FAIL: $1"; }

# --- hosts --------------------------------------------------------------------------------------
# Names carry this shell's PID so that parallel runs never collide; addresses only live inside
# this run's namespaces, so every run can use the same subnet.
PFX="cl$$"
SW="$PFX-sw"
NET=10.201.0
declare -A IP=([sched]=$NET.2 [fe]=$NET.3 [p0]=$NET.4 [p1]=$NET.5 [d0]=$NET.6 [d1]=$NET.7 [client]=$NET.8)
HOSTS=(sched fe p0 p1 d0 d1 client)
SCHED=${IP[sched]}:50151
SCHED_HTTP=http://${IP[sched]}:8100
FE_HTTP=http://${IP[fe]}:8000
TMP=$(mktemp -d /tmp/multihost.XXXXXX)
mkdir -p "$TMP/logs" "$TMP/certs"
NAMESPACES=()
declare -A PIDS=()  # process name -> pid (of `ip netns exec`, which execs cleave: the same pid)
WATCHDOG=

ns() { echo "$PFX-$1"; }

# Every exit path (success, failure, set -u error, Ctrl-C, the watchdog): kill every process this
# test started, then delete every namespace it made (which deletes the veths and the bridge in
# them), then report.
cleanup() {
  local rc=$?
  trap - EXIT
  trap '' INT TERM  # a second Ctrl-C must not cut the cleanup short
  if [[ -n "$WATCHDOG" ]]; then
    # The watchdog first, then its sleep: a sleep that ended first would let it fire.
    local sleeper
    sleeper=$(pgrep -P "$WATCHDOG")
    kill -KILL "$WATCHDOG" 2>/dev/null
    [[ -n "$sleeper" ]] && kill -KILL $sleeper 2>/dev/null
  fi
  local name pid n
  exec 3>&2 2>/dev/null  # no "Killed" job notices
  for name in "${!PIDS[@]}"; do kill -KILL "${PIDS[$name]}" 2>/dev/null; done
  # Anything else still inside our namespaces (a helper, a stray child).
  for n in "${NAMESPACES[@]}"; do
    for pid in $(ip netns pids "$n" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
  done
  wait
  exec 2>&3 3>&-
  for n in "${NAMESPACES[@]}"; do ip netns delete "$n"; done
  local left
  left=$(ip netns list 2>/dev/null | awk -v p="$PFX-" 'index($1, p) == 1' | wc -l)
  [[ "$left" == 0 ]] || bad "$left namespaces left behind: $(ip netns list | grep "^$PFX-")"
  if [[ $failed != 0 || $rc != 0 ]]; then
    for f in "$TMP"/logs/*.log; do
      [[ -s "$f" ]] || continue
      echo "---- $(basename "$f" .log) (last 25 lines of $f)"
      tail -n 25 "$f"
    done
    echo "logs kept in $TMP"
  else
    rm -rf "$TMP"
  fi
  echo "multihost_test: $passed passed, $failed failed"
  [[ $failed == 0 && $rc == 0 ]] && exit 0
  exit 1
}
trap cleanup EXIT
trap 'bad "interrupted"; exit 130' INT TERM

if [[ $(id -u) != 0 ]]; then
  bad "needs root for network namespaces (CI runs as root)"
  exit 1
fi
[[ -f "$MODEL/config.json" ]] || { bad "$MODEL missing: run scripts/setup-model.sh"; exit 1; }
[[ -x "$PY" ]] || { bad "$PY missing: the e2e virtualenv (tests/e2e/requirements.txt)"; exit 1; }

# The whole test is bounded: past the budget the watchdog ends it (cleanup runs as on any exit).
( sleep "$BUDGET_S" && echo "FAIL: over the ${BUDGET_S} s budget" && kill -TERM $$ ) &
WATCHDOG=$!
disown "$WATCHDOG"  # no job notice when cleanup kills it
T0=$SECONDS

make_hosts() {
  ip netns add "$SW" || return 1
  NAMESPACES+=("$SW")
  ip -n "$SW" link set lo up && ip -n "$SW" link add br0 type bridge && ip -n "$SW" link set br0 up ||
    return 1
  local h
  for h in "${HOSTS[@]}"; do
    ip netns add "$(ns "$h")" || return 1
    NAMESPACES+=("$(ns "$h")")
    # The switch-side end is b-HOST, the host-side end eth0: created in place, never in the
    # host's namespace.
    ip -n "$SW" link add "b-$h" type veth peer name eth0 netns "$(ns "$h")" &&
      ip -n "$SW" link set "b-$h" master br0 up &&
      ip -n "$(ns "$h")" link set lo up &&
      ip -n "$(ns "$h")" addr add "${IP[$h]}/24" dev eth0 &&
      ip -n "$(ns "$h")" link set eth0 up || return 1
  done
}
if make_hosts; then
  ok "7 hosts on a bridge in namespaces $PFX-*"
else
  bad "could not build the namespaces"
  exit 1
fi

# --- security -----------------------------------------------------------------------------------
SCHED_TLS=() FE_TLS=() WORKER_TLS=() WORKER_SECRET=()
if [[ "$TLS" == 1 ]]; then
  if ! "$CLEAVE" worker --help 2>&1 | grep -q -- --tls-ca; then
    bad "cleave worker has no --tls-ca: mTLS is not built (CLEAVE_CLUSTER_TLS=0 runs plaintext)"
    exit 1
  fi
  sans=()
  for h in "${HOSTS[@]}"; do sans+=(--san "IP:${IP[$h]}"); done
  if ! bash scripts/dev-certs.sh "$TMP/certs" "${sans[@]}" >"$TMP/logs/dev-certs.log" 2>&1; then
    bad "scripts/dev-certs.sh failed"
    exit 1
  fi
  head -c 32 /dev/urandom >"$TMP/certs/kv.secret"
  C=$TMP/certs
  SCHED_TLS=(--tls-ca "$C/ca.crt" --tls-cert "$C/scheduler.crt" --tls-key "$C/scheduler.key")
  FE_TLS=(--tls-ca "$C/ca.crt" --tls-cert "$C/frontend.crt" --tls-key "$C/frontend.key")
  WORKER_TLS=(--tls-ca "$C/ca.crt" --tls-cert "$C/worker.crt" --tls-key "$C/worker.key")
  WORKER_SECRET=(--kv-secret-file "$C/kv.secret")
  ok "mTLS certificates (SANs: every host) and a KV cluster secret"
else
  echo "note: CLEAVE_CLUSTER_TLS=0: plaintext control plane, no KV secret"
fi

# --- processes ----------------------------------------------------------------------------------
# start NAME HOST ARGS...: `cleave ARGS` on HOST, its output in logs/NAME.log.
start() {
  local name=$1 host=$2
  shift 2
  ip netns exec "$(ns "$host")" "$CLEAVE" "$@" >"$TMP/logs/$name.log" 2>&1 &
  PIDS[$name]=$!
}
printf 'scheduler:\n  lease_ms: %d\n  heartbeat_ms: 500\n' "$LEASE_MS" >"$TMP/scheduler.yaml"
start scheduler sched scheduler --config "$TMP/scheduler.yaml" --listen "$SCHED" \
  --http "${IP[sched]}:8100" "${SCHED_TLS[@]}"
worker() {  # worker NAME HOST ROLE
  local ip=${IP[$2]}
  local advertise=()
  [[ "$TLS" == 1 ]] && advertise=(--kv-advertise-host "$ip")
  start "$1" "$2" worker --role "$3" --name "$1" --scheduler "$SCHED" --model "$MODEL" \
    --kv-blocks 256 --threads 1 --kv-host "$ip" --http "$ip:9100" --drain-grace-s 5 \
    "${WORKER_TLS[@]}" "${WORKER_SECRET[@]}" "${advertise[@]}"
}
worker prefill-0 p0 prefill
worker prefill-1 p1 prefill
worker decode-0 d0 decode
worker decode-1 d1 decode
start frontend fe frontend --scheduler "$SCHED" --model "$MODEL" --http "${IP[fe]}:8000" \
  --grpc "${IP[fe]}:50051" --drain-grace-s 5 "${FE_TLS[@]}"

# client PHASE ARGS...: the Python helper in the client namespace; its ok/FAIL lines count here.
client() {
  local phase=$1 limit=$2
  shift 2
  # In the background: `wait` returns at once on Ctrl-C or the watchdog's TERM (a foreground
  # child would hold the trap until it ended).
  ip netns exec "$(ns client)" timeout "$limit" "$PY" tests/cluster/multihost.py "$phase" \
    --frontend "$FE_HTTP" --scheduler "$SCHED_HTTP" "$@" >"$TMP/logs/client-$phase.out" 2>&1 &
  wait $!
  local rc=$?
  cat "$TMP/logs/client-$phase.out"
  passed=$((passed + $(grep -c '^ok: ' "$TMP/logs/client-$phase.out")))
  failed=$((failed + $(grep -c '^FAIL: ' "$TMP/logs/client-$phase.out")))
  if [[ $rc == 124 ]]; then bad "client $phase phase over its $limit s limit"; fi
  if [[ $rc != 0 ]] && ! grep -q '^FAIL: ' "$TMP/logs/client-$phase.out"; then
    bad "client $phase phase exited $rc"
  fi
  return "$rc"
}

alive() {  # every process still running
  local name dead=()
  for name in "${!PIDS[@]}"; do kill -0 "${PIDS[$name]}" 2>/dev/null || dead+=("$name"); done
  if [[ ${#dead[@]} == 0 ]]; then ok "all 6 processes running $1"; else bad "exited $1: ${dead[*]}"; fi
}

client ready 60 --timeout 45 || { alive "at start"; exit 1; }
alive "after start"

# mTLS is enforced: a worker without a client certificate does not get registered.
if [[ "$TLS" == 1 ]]; then
  n=$(grep -l "mutual TLS to the scheduler, KV transport authenticated" "$TMP"/logs/{prefill,decode}-*.log |
      wc -l)
  [[ $n == 4 ]] && grep -q "(mutual TLS)" "$TMP/logs/scheduler.log" &&
    ok "scheduler and all 4 workers report mutual TLS, the workers an authenticated KV transport" ||
    bad "$n of 4 workers log 'mutual TLS to the scheduler, KV transport authenticated' (or the scheduler no '(mutual TLS)')"
  start rogue client worker --role decode --name rogue --scheduler "$SCHED" --model "$MODEL" \
    --kv-blocks 16 --threads 1 --kv-host "${IP[client]}" --http off
  sleep 4 & wait $!
  if curl -s --max-time 3 "$SCHED_HTTP/debug/stats" | grep -q '"rogue"'; then
    bad "a worker without a client certificate registered"
  elif ! grep -q "cannot register with scheduler" "$TMP/logs/rogue.log"; then
    bad "the worker without a client certificate never tried to register (see rogue.log)"
  else
    ok "a worker without a client certificate is refused by the scheduler"
  fi
  kill -KILL "${PIDS[rogue]}" 2>/dev/null
  wait "${PIDS[rogue]}" 2>/dev/null
  unset 'PIDS[rogue]'
fi

client burst 120 --cleave "$CLEAVE" --model "$MODEL" --n 16 --max-tokens 64 --timeout 60

# Unplug decode-0's cable at the switch; plug it back in later.
client failover 150 --lease-ms "$LEASE_MS" --victim decode-0 --streams 24 --stream-tokens 400 \
  --stream-bound 30 --rejoin-bound 15 \
  --down "ip -n $SW link set b-d0 down" --up "ip -n $SW link set b-d0 up"
ip -n "$SW" link set b-d0 up 2>/dev/null  # whatever the phase did
# Every host's TCP sockets (retransmits, unacked bytes, timers): printed with the logs on failure.
for h in "${HOSTS[@]}"; do ip netns exec "$(ns "$h")" ss -tnoi >"$TMP/logs/ss-$h.log" 2>&1; done
alive "after the partition"

# Clean stop, frontend first, as `cleave serve` does it.
stop() {  # stop NAME...: SIGTERM, then each must exit 0 within 15 s
  local name pid rc
  for name in "$@"; do kill -TERM "${PIDS[$name]}" 2>/dev/null; done
  for name in "$@"; do
    pid=${PIDS[$name]}
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      bad "$name still running 15 s after SIGTERM"
      continue
    fi
    wait "$pid"
    rc=$?
    unset "PIDS[$name]"
    [[ $rc == 0 ]] && ok "$name stopped cleanly on SIGTERM" || bad "$name exited $rc on SIGTERM"
  done
}
stop frontend
stop prefill-0 prefill-1 decode-0 decode-1
stop scheduler
echo "multihost_test: ran in $((SECONDS - T0)) s"
