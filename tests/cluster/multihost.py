"""The client side of tests/cluster/multihost_test.sh: runs inside the test's client namespace and
talks to the cluster only over the test's bridge (the frontend's API, the scheduler's and the
workers' admin HTTP ports).

Each subcommand is one phase of the test. It prints `ok: ...` / `FAIL: ...` lines (the shell
script counts them) and exits 0 only if it printed no FAIL.

  ready     the frontend's /ready is 200 and the scheduler lists every expected worker
  burst     concurrent completions across hosts equal `cleave generate`; KV bytes crossed hosts
  failover  a decode host's link goes down mid-stream: streams end, the worker is dropped, the
            rest serve; the link comes back: the worker re-registers and serves again
"""
import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request

import openai

MODEL = "stories260K"
failures = 0


def ok(msg):
    print(f"ok: {msg}", flush=True)


def bad(msg):
    global failures
    failures += 1
    print(f"FAIL: {msg}", flush=True)


def check(cond, msg, detail=""):
    if cond:
        ok(msg)
    else:
        bad(f"{msg}{': ' + detail if detail else ''}")
    return cond


def get(url, timeout=3):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read().decode()


def stats(sched):
    """The scheduler's /debug/stats (dict); workers keyed by name under "by_name"."""
    s = json.loads(get(f"{sched}/debug/stats")[1])
    s["by_name"] = {w["name"]: w for w in s["workers"]}
    return s


def worker_names(sched):
    try:
        return set(stats(sched)["by_name"])
    except OSError:
        return None  # scheduler unreachable (reported by the caller's timeout)


def metric(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def worker_metrics(sched, name):
    address = stats(sched)["by_name"][name]["http_address"]
    return get(f"http://{address}/metrics")[1]


def client(args, timeout=60):
    return openai.AsyncOpenAI(base_url=f"{args.frontend}/v1", api_key="unused", max_retries=0,
                              timeout=timeout)


# ---------------------------------------------------------------------------------------------

def cmd_ready(args):
    want = set(args.workers.split(","))
    deadline = time.time() + args.timeout
    ready, names = False, None
    while True:
        try:
            ready = ready or get(f"{args.frontend}/ready")[0] == 200
        except OSError:
            pass
        names = worker_names(args.scheduler) if ready else names
        if (ready and names is not None and want <= names) or time.time() > deadline:
            break
        time.sleep(0.2)
    check(ready, f"frontend {args.frontend}/ready is 200 from the client host")
    names = worker_names(args.scheduler) if names is None else names
    check(names is not None and want <= names, f"scheduler lists the {len(want)} workers {sorted(want)}",
          f"it lists {sorted(names or [])}")
    # Every worker's admin port is reachable across the bridge (service discovery gives them).
    try:
        targets = [t for g in json.loads(get(f"{args.scheduler}/discovery/prometheus")[1])
                   for t in g["targets"]]
        reached = [t for t in targets if "cleave_worker_steps_total" in get(f"http://{t}/metrics")[1]]
    except OSError as e:
        targets, reached = [], [str(e)]
    hosts = {t.rsplit(":", 1)[0] for t in targets}
    check(len(targets) == len(want) and len(hosts) == len(want) and reached == targets,
          f"/discovery/prometheus gives {len(want)} worker targets on their own hosts, all scraped",
          f"targets {targets}, scraped {reached}")


async def complete(c, prompt, max_tokens):
    r = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                   extra_body={"ignore_eos": True})
    return r.choices[0].text, r.usage.completion_tokens


def reference(args, prompt, max_tokens):
    out = subprocess.run([args.cleave, "generate", "--model", args.model, "--prompt", prompt,
                          "--max-tokens", str(max_tokens), "--temperature", "0", "--ignore-eos",
                          "--json"], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout)["text"]


def kv_bytes(args, names, direction):
    return {n: metric(worker_metrics(args.scheduler, n), "cleave_worker_kv_transfer_bytes_total",
                      direction=direction) for n in names}


async def burst(args, prompts):
    c = client(args)
    try:
        return await asyncio.wait_for(
            asyncio.gather(*(complete(c, p, args.max_tokens) for p in prompts), return_exceptions=True),
            args.timeout)
    finally:
        await c.close()


def cmd_burst(args):
    prompts = [f"Story {i % 4}: once upon a time there was a {['cat', 'dog', 'king', 'girl'][i % 4]}"
               for i in range(args.n)]
    refs = {p: reference(args, p, args.max_tokens) for p in set(prompts)}
    check(all(r is not None for r in refs.values()), "cleave generate gives the reference texts")
    t0 = time.time()
    try:
        results = asyncio.run(burst(args, prompts))
    except asyncio.TimeoutError:
        bad(f"{args.n} concurrent completions not done within {args.timeout} s")
        return
    took = time.time() - t0
    errors = [f"{p!r}: {r!r}" for p, r in zip(prompts, results) if isinstance(r, BaseException)]
    check(not errors, f"{args.n} concurrent completions across hosts answered ({took:.1f} s)",
          "; ".join(errors[:3]))
    short = [n for r in results if not isinstance(r, BaseException) for n in [r[1]] if n != args.max_tokens]
    check(not short, f"each returned its {args.max_tokens} tokens (ignore_eos)", f"counts {short}")
    wrong = [p for p, r in zip(prompts, results)
             if not isinstance(r, BaseException) and r[0] != refs[p]]
    check(not wrong, "greedy texts equal `cleave generate` offline (KV moved intact between hosts)",
          f"{len(wrong)} differ, e.g. {wrong[:1]}")
    prefill = args.prefill.split(",")
    decode = args.decode.split(",")
    sent = kv_bytes(args, prefill, "sent")
    received = kv_bytes(args, decode, "received")
    print(f"  kv bytes sent {sent}, received {received}")
    check(sum(sent.values()) > 0, f"prefill hosts sent KV bytes ({sum(sent.values()):.0f})", str(sent))
    check(sum(received.values()) > 0, f"decode hosts received KV bytes ({sum(received.values()):.0f})",
          str(received))
    check(sum(sent.values()) == sum(received.values()), "every KV byte sent was received",
          f"sent {sum(sent.values())} received {sum(received.values())}")


# ---------------------------------------------------------------------------------------------

async def stream(c, i, started, max_tokens):
    """("ok" | "short" | "error", tokens, detail, end time)."""
    n, finish = 0, None
    try:
        s = await c.completions.create(model=MODEL, prompt=f"Story number {i}: once upon a time",
                                       max_tokens=max_tokens, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
        async for chunk in s:
            if chunk.choices:
                n += 1
                finish = chunk.choices[0].finish_reason or finish
                started.set()
        kind = "ok" if n == max_tokens and finish == "length" else "short"
        return (kind, n, f"finish_reason {finish}", time.time())
    except (openai.APIError, openai.APIConnectionError) as e:
        return ("error", n, f"{type(e).__name__}: {e}", time.time())


async def wait_until(pred, timeout, period=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if await asyncio.to_thread(pred):
            return True
        await asyncio.sleep(period)
    return False


def run_ip(cmd):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        bad(f"`{cmd}` failed: {r.stderr.strip()}")
    return r.returncode == 0


class LinkCutter(threading.Thread):
    """Cuts the victim's link the moment the scheduler shows it running a request. A thread of its
    own: the event loop is busy reading 24 streams, and the tiny model finishes a request in about
    a second, so polling from the loop would cut the link too late to catch one mid-flight."""

    def __init__(self, args):
        super().__init__(daemon=True)
        self.args, self.stop, self.down_at, self.snapshot, self.error = args, threading.Event(), None, None, None

    def run(self):
        deadline = time.time() + 30
        while not self.stop.is_set() and time.time() < deadline:
            try:
                w = stats(self.args.scheduler)["by_name"].get(self.args.victim)
            except OSError:
                w = None
            if w is not None and w["running"] > 0:
                r = subprocess.run(self.args.down, shell=True, capture_output=True, text=True, timeout=10)
                self.down_at = time.time()
                self.snapshot = w
                self.error = None if r.returncode == 0 else r.stderr.strip() or f"exit {r.returncode}"
                return
            time.sleep(0.002)


async def link_down_mid_stream(args):
    before = get(f"{args.scheduler}/metrics")[1]
    cutter = LinkCutter(args)
    cutter.start()
    c = client(args, timeout=120)
    started = asyncio.Event()
    t0 = time.time()
    tasks = [asyncio.create_task(stream(c, i, started, args.stream_tokens)) for i in range(args.streams)]
    try:
        await asyncio.to_thread(cutter.join, 35)
        w = cutter.snapshot or {}
        mid = sum(1 for t in tasks if not t.done())
        if not check(cutter.down_at and not cutter.error,
                     f"link cut while {args.victim} ran {w.get('running')} requests "
                     f"({w.get('used_blocks')} KV blocks), {mid} of {args.streams} streams open",
                     cutter.error or f"{args.victim} never ran a request"):
            return None
        down_at = cutter.down_at
        print(f"  link down {down_at - t0:.2f} s after the streams started: {args.down}", flush=True)
        lease_s = args.lease_ms / 1000
        gone = await wait_until(lambda: args.victim not in (worker_names(args.scheduler) or {args.victim}),
                                lease_s + 6)
        check(gone, f"scheduler dropped {args.victim} {time.time() - down_at:.1f} s after its link went down "
              f"(lease {lease_s:.0f} s)", f"still listed after {lease_s + 6:.0f} s")
        done, pending = await asyncio.wait(tasks, timeout=max(0.1, down_at + args.stream_bound - time.time()))
        check(not pending, f"every stream ended within {args.stream_bound:.0f} s of the link going down "
              f"(last {max((t.result()[3] for t in done), default=down_at) - down_at:.1f} s)",
              f"{len(pending)} still open")
        for t in pending:
            t.cancel()
        results = [t.result() for t in done]
        kinds = {k: sum(1 for r in results if r[0] == k) for k in ("ok", "error", "short")}
        print(f"  streams: {kinds['ok']} complete, {kinds['error']} ended with an error, "
              f"{kinds['short']} cut short without one", flush=True)
        errors = [r for r in results if r[0] == "error"]
        for r in errors[:3]:
            print(f"    e.g. error after {r[1]} tokens, {r[3] - down_at:+.1f} s from link down: {r[2][:160]}")
        check(kinds["short"] == 0, "no stream ended silently short (each completed or gave a clear error)",
              "; ".join(f"{r[1]} tokens, {r[2]}" for r in results if r[0] == "short")[:400])
        check(all(r[2] for r in errors), "every failed stream carries a message")
        check(kinds["ok"] > 0, "streams on the surviving hosts completed")
        after = get(f"{args.scheduler}/metrics")[1]
        expiries, reruns = (metric(after, m) - metric(before, m)
                            for m in ("cleave_scheduler_lease_expiries_total", "cleave_scheduler_reruns_total"))
        check(expiries == 1, "the scheduler counted one lease expiry", f"{expiries:.0f}")
        check(kinds["error"] + reruns > 0,
              f"{args.victim}'s requests in flight ended with an error ({kinds['error']}) or re-ran elsewhere "
              f"({reruns:.0f})", "none did")
        return down_at
    finally:
        cutter.stop.set()
        for t in tasks:
            t.cancel()
        await c.close()


def snapshot(args):
    """What the scheduler and each worker say about work in flight (for a failure's report)."""
    lines = []
    try:
        for w in stats(args.scheduler)["workers"]:
            text = get(f"http://{w['http_address']}/metrics")[1]
            transfers = {line.split("{", 1)[1].rsplit("}", 1)[0] + " " + line.rsplit(" ", 1)[1]
                         for line in text.splitlines() if line.startswith("cleave_worker_kv_transfers_total{")}
            lines.append(f"    {w['name']}: running {w['running']} waiting {w['waiting']} used blocks "
                         f"{w['used_blocks']}; transfers {sorted(transfers)}")
    except OSError as e:
        lines.append(f"    (no snapshot: {e})")
    return "\n".join(lines)


async def served(args, n, max_tokens, tag, bound=30):
    """n concurrent completions; returns None for each that returned max_tokens, else the error.
    One still open after `bound` s is a hang: the scheduler's and workers' view is printed."""
    c = client(args, timeout=bound + 15)
    tasks = [asyncio.create_task(complete(c, f"{tag} {i}: the little bird", max_tokens)) for i in range(n)]
    try:
        done, pending = await asyncio.wait(tasks, timeout=bound)
        if pending:
            print(f"  {len(pending)} of {n} requests still open after {bound} s; now:\n{snapshot(args)}",
                  flush=True)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await c.close()
    out = []
    for t in tasks:
        if t in pending:
            out.append(f"no answer within {bound} s")
        elif t.exception() is not None:
            out.append(t.exception())
        else:
            out.append(None if t.result()[1] == max_tokens else f"{t.result()[1]} tokens")
    return out


def cmd_failover(args):
    everyone = set(args.workers.split(","))
    if asyncio.run(link_down_mid_stream(args)) is None:
        return
    errs = [e for e in asyncio.run(served(args, 8, 32, "After the partition")) if e]
    check(not errs, f"8 new requests served by the remaining hosts while {args.victim} is cut off",
          "; ".join(map(repr, errs[:3])))
    names = worker_names(args.scheduler) or set()
    check(names == everyone - {args.victim}, f"the other {len(everyone) - 1} workers stay registered",
          str(sorted(names)))

    received_before = None  # the victim's metrics are unreachable while its link is down
    if not run_ip(args.up):
        return
    up_at = time.time()
    print(f"  link up: {args.up}", flush=True)
    back = asyncio.run(wait_until(lambda: args.victim in (worker_names(args.scheduler) or set()),
                                  args.rejoin_bound, period=0.1))
    check(back, f"{args.victim} re-registered {time.time() - up_at:.1f} s after its link came back",
          f"not listed after {args.rejoin_bound} s")
    if not back:
        return
    received_before = metric(worker_metrics(args.scheduler, args.victim),
                             "cleave_worker_kv_transfer_bytes_total", direction="received")
    steps_before = metric(worker_metrics(args.scheduler, args.victim), "cleave_worker_steps_total")
    served_again, errs = False, []
    for round_ in range(6):
        errs += [e for e in asyncio.run(served(args, 8, 32, f"Back again round {round_}")) if e]
        text = worker_metrics(args.scheduler, args.victim)
        got = metric(text, "cleave_worker_kv_transfer_bytes_total", direction="received") - received_before
        steps = metric(text, "cleave_worker_steps_total") - steps_before
        if got > 0 and steps > 0:
            served_again = True
            break
    check(not errs, "requests after the link came back all served", "; ".join(map(repr, errs[:3])))
    check(served_again, f"{args.victim} serves again (received KV and ran decode steps)")
    # Whatever happened to the requests caught by the partition, no KV block stays held.
    idle = asyncio.run(wait_until(
        lambda: all(w["used_blocks"] == 0 for w in stats(args.scheduler)["workers"]), 15, period=0.2))
    check(idle, "no KV block held on any worker once idle",
          str({w["name"]: w["used_blocks"] for w in stats(args.scheduler)["workers"]}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["ready", "burst", "failover"])
    p.add_argument("--frontend", required=True, help="http://HOST:PORT of the frontend")
    p.add_argument("--scheduler", required=True, help="http://HOST:PORT of the scheduler's admin port")
    p.add_argument("--workers", default="prefill-0,prefill-1,decode-0,decode-1")
    p.add_argument("--prefill", default="prefill-0,prefill-1")
    p.add_argument("--decode", default="decode-0,decode-1")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--cleave", help="the cleave binary (burst: reference texts)")
    p.add_argument("--model", default="models/stories260K")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--victim", default="decode-0")
    p.add_argument("--down", help="shell command that takes the victim's link down")
    p.add_argument("--up", help="shell command that brings it back")
    p.add_argument("--lease-ms", type=int, default=3000)
    p.add_argument("--streams", type=int, default=24)
    p.add_argument("--stream-tokens", type=int, default=400)
    p.add_argument("--stream-bound", type=float, default=30)
    p.add_argument("--rejoin-bound", type=float, default=15)
    args = p.parse_args()
    try:
        {"ready": cmd_ready, "burst": cmd_burst, "failover": cmd_failover}[args.phase](args)
    except Exception as e:  # an unexpected error is one failure, reported, not a traceback only
        import traceback
        traceback.print_exc()
        bad(f"{args.phase} phase raised {type(e).__name__}: {e}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
