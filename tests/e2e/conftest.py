"""Fixtures for the end-to-end suite: real `cleave serve` process trees on loopback.

Every cluster gets free ports and a config written to a temp dir; tests talk to it with real
clients (the openai SDK, a gRPC stub generated from our protos, raw HTTP). After each test the
KV blocks in use on every worker must be back to zero (no leaked block, whatever the test did).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLEAVE = os.environ.get("CLEAVE_BIN", str(ROOT / "build" / "bin" / "cleave"))
MODEL = str(ROOT / "models" / "stories260K")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(workers, sched_port, http_port, grpc_port, model=MODEL, sched_http_port=0,
                frontend=None, top=None, **sched):
    """top: extra top-level YAML text (e.g. a tls: section), inserted verbatim."""
    lines = [f"model: {model}"] + ([top.rstrip("\n")] if top else []) + ["scheduler:", f"  listen: 127.0.0.1:{sched_port}",
             f"  http: 127.0.0.1:{sched_http_port}", "  lease_ms: 2000", "  heartbeat_ms: 300"]
    for k, v in sched.items():
        lines.append(f"  {k}: {v}")
    lines.append("workers:")
    for w in workers:
        lines.append(f"  - role: {w['role']}")
        for k, v in w.items():
            if k != "role":
                lines.append(f"    {k}: {v}")
    lines += ["frontend:", f"  http: 127.0.0.1:{http_port}", f"  grpc: 127.0.0.1:{grpc_port}",
              "  threads: 2"]
    for k, v in (frontend or {}).items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines) + "\n"


PD = [dict(role="prefill", replicas=1, kv_blocks=512, threads=1),
      dict(role="decode", replicas=1, kv_blocks=1024, threads=1)]
PD2 = [dict(role="prefill", replicas=2, kv_blocks=512, threads=1),
       dict(role="decode", replicas=2, kv_blocks=1024, threads=1)]
# Decode pools that hold two long requests each, so requests queue on the decode side.
PD2_TIGHT = [dict(role="prefill", replicas=2, kv_blocks=512, threads=1),
             dict(role="decode", replicas=2, kv_blocks=64, threads=1)]
COLOCATED = [dict(role="colocated", replicas=1, kv_blocks=1024, threads=1)]


class Cluster:
    def __init__(self, tmp, workers, model=MODEL, frontend=None, top=None, api_key=None, **sched):
        """frontend: extra keys of the config's frontend: section (e.g. drain_grace_s); top: extra
        top-level YAML (tls:, kv_secret_file); api_key: sent by get() when the frontend needs one."""
        self.api_key = api_key
        self.http_port, self.grpc_port, self.sched_port = free_port(), free_port(), free_port()
        # The scheduler's HTTP port: /metrics, /health, /ready, /discovery/prometheus.
        self.sched_http_port = free_port()
        self.config = Path(tmp) / "cleave.yaml"
        self.config.write_text(config_text(workers, self.sched_port, self.http_port, self.grpc_port,
                                           model=model, sched_http_port=self.sched_http_port,
                                           frontend=frontend, top=top, **sched))
        self.log = open(Path(tmp) / "serve.log", "w+")
        self.proc = subprocess.Popen([CLEAVE, "serve", "--config", str(self.config)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        ready = threading.Event()
        self.banner = []

        def read_stdout():
            for line in self.proc.stdout:
                self.banner.append(line)
                if "cleave: serving" in line:
                    ready.set()
        threading.Thread(target=read_stdout, daemon=True).start()
        if not ready.wait(60):
            self.stop()
            raise RuntimeError("cleave serve did not become ready:\n" + self.logs())
        # /ready needs one prefill + one decode worker; tests want every worker of the config.
        want = sum(w.get("replicas", 1) for w in workers)
        deadline = time.time() + 30
        while len(self.kv()["workers"]) < want:
            if time.time() > deadline:
                self.stop()
                raise RuntimeError(f"only {len(self.kv()['workers'])} of {want} workers registered")
            time.sleep(0.05)

    def logs(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-8000:]

    def log_text(self):
        """Everything the tree logged so far (serve's stderr, which its children share)."""
        self.log.flush()
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def request_done(self, request_id=None, timeout=10):
        """The frontend's request_done records (dicts), in order; with request_id, waits for that
        request's record and returns it alone."""
        deadline = time.time() + timeout
        while True:
            # Complete lines only: a line being written while the log is read ends without its
            # newline (and its JSON cut short); it is read whole on the next pass.
            records = [json.loads(line.split("request_done ", 1)[1])
                       for line in self.log_text().splitlines(keepends=True)
                       if "request_done {" in line and line.endswith("\n")]
            if request_id is None:
                return records
            mine = [r for r in records if r["request_id"] == request_id]
            if mine:
                assert len(mine) == 1, mine
                return mine[0]
            if time.time() > deadline:
                raise AssertionError(f"no request_done line for {request_id!r}:\n{self.logs()}")
            time.sleep(0.05)

    def get(self, path, timeout=10):
        req = urllib.request.Request(self.url + path)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")

    def kv(self):
        return self.get("/debug/kv")[1]

    def used_blocks(self):
        return {w["name"]: w["used_blocks"] for w in self.kv()["workers"]}

    def free_blocks(self):
        return {w["name"]: w["free_blocks"] for w in self.kv()["workers"]}

    def wait_idle(self, timeout=10):
        """Until no worker holds a block and nothing runs; returns the last stats."""
        deadline = time.time() + timeout
        while True:
            stats = self.kv()
            busy = [w for w in stats["workers"]
                if w["used_blocks"] != 0 or w.get("free_state_slots", 0) != w.get("num_state_slots", 0)]
            if not busy and stats.get("num_running", 0) == 0 and stats.get("num_waiting", 0) == 0:
                return stats
            if time.time() > deadline:
                raise AssertionError(f"KV blocks still in use after {timeout}s: {stats}")
            time.sleep(0.05)

    def worker_pids(self, name_prefix):
        """PIDs of this cluster's worker processes whose --name starts with name_prefix."""
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
                status = (p / "status").read_text()
            except OSError:
                continue
            ppid = next((int(l.split()[1]) for l in status.splitlines() if l.startswith("PPid:")), 0)
            if ppid != self.proc.pid or b"worker" not in argv:
                continue
            if b"--name" in argv:
                name = argv[argv.index(b"--name") + 1].decode()
                if name.startswith(name_prefix):
                    pids.append(int(p.name))
        return pids

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _cluster(tmp_path_factory, name, workers, **sched):
    c = Cluster(tmp_path_factory.mktemp(name), workers, **sched)
    yield c
    rc = c.stop()
    assert rc == 0, f"cleave serve exited with {rc}:\n{c.logs()}"


@pytest.fixture(scope="module")
def pd(tmp_path_factory):
    yield from _cluster(tmp_path_factory, "pd", PD)


@pytest.fixture(scope="module")
def colocated(tmp_path_factory):
    yield from _cluster(tmp_path_factory, "colocated", COLOCATED)


@pytest.fixture
def no_leaks(request):
    """Checks every worker's blocks after the test: none in use, free count as before."""
    clusters = [request.getfixturevalue(n) for n in ("pd", "colocated") if n in request.fixturenames]
    before = [c.wait_idle()["workers"] for c in clusters]
    yield
    for c, b in zip(clusters, before):
        after = c.wait_idle()["workers"]
        free_before = {w["name"]: w["free_blocks"] for w in b}
        free_after = {w["name"]: w["free_blocks"] for w in after}
        assert free_after == free_before, (free_before, free_after)


def openai_client(cluster, **kw):
    import openai
    return openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, **kw)


def offline_generate(prompt, max_tokens, model=MODEL, extra=()):
    """Greedy reference from `cleave generate` (one process, no serving)."""
    out = subprocess.run([CLEAVE, "generate", "--model", model, "--prompt", prompt, "--max-tokens",
                          str(max_tokens), "--temperature", "0", "--threads", "1", "--json", *extra],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=True)
    return json.loads(out.stdout)


def grpc_generate_all(cluster, pbmod, prompts, timeout=120):
    """Every (prompt, max_tokens) at once over the gRPC API, greedy; returns each one's token ids."""
    import concurrent.futures as cf

    import grpc
    gen_pb, gen_grpc = pbmod
    channel = grpc.insecure_channel(cluster.grpc_target)
    stub = gen_grpc.GenerationStub(channel)

    def one(pm):
        prompt, max_tokens = pm
        req = gen_pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens,
                                     sampling=gen_pb.SamplingOptions(temperature=0))
        return [t.token_id for r in stub.Generate(req, timeout=timeout) for t in r.tokens]

    with cf.ThreadPoolExecutor(len(prompts)) as ex:
        out = list(ex.map(one, prompts))
    channel.close()
    return out
