"""The rendered pods' own args start a working cluster: the containers of an overlay run on loopback
exactly as the manifests say, with each pod's mounts replaced by local folders holding the same
files (the ConfigMap's config, scripts/dev-certs.sh certificates, a KV secret, an API key). Each
`$(VAR)` is expanded from the container's env as the kubelet would (loopback stands in for the
pod IP, the CPU limit is 1, a StatefulSet pod's ordinal comes from its pod-index label),
`localhost` stands in for the scheduler's Service name, and every fixed port is moved to a free
one, per pod, so that this test can run beside the others and pods of one StatefulSet beside each
other. A small checkpoint stands in for the config's model, and a GPU-sized KV pool is shrunk to
fit the test machine. Each process must become ready on its readiness probe, a completion must
work with the API key (and be refused without it), and SIGTERM must end every process with exit 0
within its drain grace.

- cpu-local: one pod of each Deployment (scheduler, frontend, prefill, decode).
- gpu-afd: one pod of each Deployment (scheduler, frontend, prefill, attention) and every pod of
  the FFN StatefulSet (each holds its own share of the experts; the group needs them all). The
  tiny random Mixtral of the golden tests (8 experts) stands in for the checkpoint. The FFN pods
  start last: until they register the attention worker says its AFD group is incomplete and the
  scheduler's /ready/serving is 503 with the reason (its /ready, the probe, stays 200 so that the
  FFN pods can register through its Service); then the group is complete, the two FFN pods own disjoint halves of the experts, and it serves.
"""
import dataclasses
import http.client
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import pytest

from deploylib import (ROOT, cleave_bin, container, env_values, expand, flags, is_afd_overlay, overlay_roles,
                       render, rendered_config, workload)

API_KEY = "deploy-test-key-0123456789abcdef"
# The checkpoint each overlay's pods load here instead of the config's model.
LOCAL_MODEL = {
    "cpu-local": ROOT / "models" / "stories260K",
    "gpu-afd": ROOT / "tests" / "data" / "golden" / "mixtral",
}
# A GPU-sized KV pool (kv_cache_mb) is cut to this on the test machine.
MAX_KV_CACHE_MB = 256
# Readiness is awaited in this order (an attention worker is ready once its FFN workers are).
READY_ORDER = ("scheduler", "prefill", "decode", "ffn", "attention", "frontend")
STOP_ORDER = ("frontend", "prefill", "decode", "attention", "ffn", "scheduler")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port, path, headers=None, body=None, method="GET"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@dataclasses.dataclass
class Pod:
    name: str
    role: str
    container: dict
    ports: dict  # container port -> the local port standing in for it
    proc: subprocess.Popen
    log_path: pathlib.Path

    def port(self, container_port):
        """The local port standing in for one of this pod's ports."""
        return self.ports[int(container_port)]

    def log(self):
        return self.log_path.read_text()[-3000:]


class LocalPods:
    """Starts pods of the rendered overlay as local processes."""

    def __init__(self, binary, docs, vols, tmp_path):
        self.binary, self.docs, self.vols, self.tmp_path = binary, docs, vols, tmp_path
        self.scheduler_ports = {}  # the scheduler's own ports: every pod dials it
        self.pods = []

    def start(self, role, ordinal=0):
        w = workload(self.docs, role)
        c = container(w)
        name = f"cleave-{role}-{ordinal}"
        env = env_values(c, name, ordinal=ordinal if w["kind"] == "StatefulSet" else None)
        ports = self.scheduler_ports if role == "scheduler" else {}

        def local_port(table, port):
            return str(table.setdefault(int(port), free_port()))

        args = []
        for a in c["args"]:
            a = expand(a, env)
            for m in c["volumeMounts"]:
                if m["name"] in self.vols:
                    a = a.replace(m["mountPath"].rstrip("/") + "/", str(self.vols[m["name"]]) + "/")
            if a.startswith("--scheduler="):
                a = re.sub(r"^--scheduler=cleave-scheduler:(\d+)$",  # localhost: a SAN of the dev certificates
                           lambda m: "--scheduler=localhost:" + local_port(self.scheduler_ports, m.group(1)), a)
            else:
                a = re.sub(r"(:|^--[a-z-]*port=)(\d+)$", lambda m: m.group(1) + local_port(ports, m.group(2)), a)
            args.append(a)
        joined = " ".join(args)
        assert "/etc/cleave" not in joined, f"{name}: an unmapped mount path in {args}"
        assert "$(" not in joined and "cleave-scheduler" not in joined, f"{name}: {args}"
        log_path = self.tmp_path / f"{name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen([self.binary, *args], stdout=log, stderr=subprocess.STDOUT)
        pod = Pod(name, role, c, ports, proc, log_path)
        self.pods.append(pod)
        return pod

    def of(self, role):
        return [p for p in self.pods if p.role == role]

    def ready_reason(self, pod):
        """(status, body) of the pod's readiness probe, or None while nothing answers."""
        probe = pod.container["readinessProbe"]["httpGet"]
        try:
            return get(pod.port(probe["port"]), probe["path"])
        except OSError:
            return None

    def wait(self, pod, until, what, deadline):
        while True:
            assert pod.proc.poll() is None, f"{pod.name} exited {pod.proc.returncode}:\n{pod.log()}"
            answer = self.ready_reason(pod)
            if answer is not None and until(*answer):
                return answer
            assert time.monotonic() < deadline, f"{pod.name}: not {what}, last /ready {answer}:\n{pod.log()}"
            time.sleep(0.2)

    def wait_ready(self, pod, deadline):
        self.wait(pod, lambda status, _: status == 200, "ready", deadline)

    def kill_all(self):
        for pod in reversed(self.pods):
            if pod.proc.poll() is None:
                pod.proc.kill()
                pod.proc.wait()


@pytest.fixture
def local_pods(request, tmp_path):
    overlay = request.param
    binary = cleave_bin()
    model = LOCAL_MODEL[overlay]
    if binary is None or not (model / "model.safetensors").exists():
        pytest.skip("needs a built cleave and the bundled model (scripts/setup-model.sh)")
    docs = render(overlay)
    # The volumes' contents, as the README's Secret commands make them.
    vols = {name: tmp_path / name for name in ("config", "tls", "kv-secret", "api-keys")}
    for d in vols.values():
        d.mkdir()
    _, config, config_text = rendered_config(docs)
    config_text = config_text.replace(config["model"], str(model))
    config_text = re.sub(r"(kv_cache_mb:\s*)(\d+)", lambda m: m.group(1) + str(min(int(m.group(2)), MAX_KV_CACHE_MB)),
                         config_text)
    (vols["config"] / "cleave.yaml").write_text(config_text)
    certs = subprocess.run(["bash", str(ROOT / "scripts" / "dev-certs.sh"), str(vols["tls"])],
                           capture_output=True, text=True, timeout=120)
    assert certs.returncode == 0, certs.stderr
    (vols["kv-secret"] / "secret").write_bytes(os.urandom(48))
    (vols["api-keys"] / "api-keys").write_text(API_KEY + "\n")
    pods = LocalPods(binary, docs, vols, tmp_path)
    try:
        yield overlay, docs, model, pods
    finally:
        pods.kill_all()


def completion(pods, model):
    frontend = pods.of("frontend")[0]
    api = frontend.port(flags(frontend.container)["--http"].rsplit(":", 1)[1])
    body = json.dumps({"model": model.name, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
    status, _ = get(api, "/v1/completions", {"Content-Type": "application/json"}, body, "POST")
    assert status == 401, f"no API key: {status}"
    status, out = get(api, "/v1/completions",
                      {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}, body, "POST")
    assert status == 200, (status, out, frontend.log())
    answer = json.loads(out)
    assert answer["usage"]["completion_tokens"] > 0, answer
    return answer


def ffn_metrics(pod):
    """An FFN worker's experts (its cleave_ffn_expert_tokens_total series of layer 0) and the
    token rows it has answered for (cleave_ffn_rows_total)."""
    status, text = get(pod.port(pod.container["readinessProbe"]["httpGet"]["port"]), "/metrics")
    assert status == 200
    text = text.decode()
    experts = {m.group(1) for m in re.finditer(
        r'^cleave_ffn_expert_tokens_total\{[^}]*layer="0"[^}]*expert="([^"]+)"', text, re.M)}
    rows = re.search(r"^cleave_ffn_rows_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert rows, text
    return experts, float(rows.group(1))


@pytest.mark.parametrize("local_pods", ["cpu-local", "gpu-afd"], indirect=True)
def test_pod_args_serve_and_drain(local_pods):
    overlay, docs, model, pods = local_pods
    roles = overlay_roles(overlay)
    deadline = time.monotonic() + 120
    for role in roles:
        if role != "ffn":  # the FFN StatefulSet's pods come last, below
            pods.start(role)

    if is_afd_overlay(overlay):
        pods.wait_ready(pods.of("prefill")[0], deadline)
        # Registered, but no FFN worker yet: the group is incomplete, and the scheduler not ready.
        attention = pods.of("attention")[0]
        pods.wait(attention, lambda status, body: status == 503 and b"is incomplete" in body,
                  "waiting for its AFD group", deadline)
        # The scheduler's control plane stays ready (the FFN pods register through its Service);
        # /ready/serving says why nothing can run yet.
        scheduler = pods.of("scheduler")[0]
        status, body = pods.ready_reason(scheduler)
        assert status == 200, (status, body)
        probe = scheduler.container["readinessProbe"]["httpGet"]
        status, body = get(scheduler.port(probe["port"]), "/ready/serving")
        assert status == 503 and b"AFD group" in body, (status, body)
        ffn = workload(docs, "ffn")
        for ordinal in range(ffn["spec"]["replicas"]):
            pods.start("ffn", ordinal)

    for role in READY_ORDER:
        for pod in pods.of(role) if role in roles else []:
            pods.wait_ready(pod, deadline)

    answer = completion(pods, model)
    if not is_afd_overlay(overlay):
        assert answer["choices"][0]["text"], answer
    else:
        # Pod cleave-ffn-R took shard R: the shards own disjoint sets of experts, all of them together.
        num_experts = json.loads((model / "config.json").read_text())["num_local_experts"]
        owned, rows = zip(*(ffn_metrics(p) for p in pods.of("ffn")))
        assert all(owned), owned
        assert sum(len(o) for o in owned) == num_experts, owned
        assert set().union(*owned) == {str(e) for e in range(num_experts)}, owned
        # The decode steps' FFNs ran on them.
        assert sum(rows) > 0, rows

    # Kubernetes stops each pod with SIGTERM; every process drains and exits 0 in its grace.
    for role in STOP_ORDER:
        for pod in pods.of(role):
            grace = int(flags(pod.container).get("--drain-grace-s", 10))
            pod.proc.send_signal(signal.SIGTERM)
            try:
                rc = pod.proc.wait(timeout=grace + 5)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{pod.name} still running {grace + 5} s after SIGTERM:\n{pod.log()}")
            assert rc == 0, f"{pod.name} exited {rc} on SIGTERM:\n{pod.log()}"
