"""The rendered pods' own args start a working cluster: the cpu-local overlay's four containers
run on loopback exactly as the manifests say, with each pod's mounts replaced by local folders
holding the same files (the ConfigMap's config, scripts/dev-certs.sh certificates, a KV secret,
an API key). Loopback stands in for the pod IP, `localhost` for the scheduler's Service name, and
every fixed port is moved to a free one so that this test can run beside the others. Each process
must become ready on its readiness probe, a completion must work with the API key (and be refused
without it), and SIGTERM must end every process with exit 0 within its drain grace.
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from deploylib import ROOT, cleave_bin, container, deployment, flags, render, rendered_config

OVERLAY = "cpu-local"
START_ORDER = ("scheduler", "prefill", "decode", "frontend")
API_KEY = "deploy-test-key-0123456789abcdef"


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


@pytest.fixture
def local_pods(tmp_path):
    binary = cleave_bin()
    model = ROOT / "models" / "stories260K"
    if binary is None or not (model / "model.safetensors").exists():
        pytest.skip("needs a built cleave and the bundled model (scripts/setup-model.sh)")
    docs = render(OVERLAY)
    # The volumes' contents, as the README's Secret commands make them.
    vols = {name: tmp_path / name for name in ("config", "tls", "kv-secret", "api-keys")}
    for d in vols.values():
        d.mkdir()
    _, _, config_text = rendered_config(docs)
    (vols["config"] / "cleave.yaml").write_text(
        config_text.replace("/opt/cleave/models/stories260K", str(model)))
    certs = subprocess.run(["bash", str(ROOT / "scripts" / "dev-certs.sh"), str(vols["tls"])],
                           capture_output=True, text=True, timeout=120)
    assert certs.returncode == 0, certs.stderr
    (vols["kv-secret"] / "secret").write_bytes(os.urandom(48))
    (vols["api-keys"] / "api-keys").write_text(API_KEY + "\n")

    ports = {}

    def local(arg):
        arg = arg.replace("$(POD_IP)", "127.0.0.1").replace("$(CPU_LIMIT)", "1")
        arg = arg.replace("cleave-scheduler:", "localhost:")  # a SAN of the dev certificates
        arg = re.sub(r"(:|--kv-port=)(\d+)$", lambda m: m.group(1) + str(ports.setdefault(
            int(m.group(2)), free_port())), arg)
        return arg

    procs = {}
    try:
        for role in START_ORDER:
            c = container(deployment(docs, role))
            args = []
            for a in c["args"]:
                for m in c["volumeMounts"]:
                    if m["name"] in vols:
                        a = a.replace(m["mountPath"].rstrip("/") + "/", str(vols[m["name"]]) + "/")
                args.append(local(a.replace("$(POD_NAME)", f"{role}-0")))
            assert "/etc/cleave" not in " ".join(args), f"{role}: an unmapped mount path in {args}"
            log = open(tmp_path / f"{role}.log", "w")
            procs[role] = (subprocess.Popen([binary, *args], stdout=log, stderr=subprocess.STDOUT), c)
        yield procs, ports, tmp_path
    finally:
        for role in reversed(START_ORDER):
            if role in procs and procs[role][0].poll() is None:
                procs[role][0].kill()
                procs[role][0].wait()


def test_pod_args_serve_and_drain(local_pods):
    procs, ports, logs = local_pods

    def log(role):
        return (logs / f"{role}.log").read_text()[-3000:]

    deadline = time.monotonic() + 90
    for role in START_ORDER:
        proc, c = procs[role]
        probe = ports[c["readinessProbe"]["httpGet"]["port"]]
        while True:
            assert proc.poll() is None, f"{role} exited {proc.returncode}:\n{log(role)}"
            try:
                if get(probe, c["readinessProbe"]["httpGet"]["path"])[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{role} not ready on :{probe}:\n{log(role)}"
            time.sleep(0.2)

    api = ports[int(flags(procs["frontend"][1])["--http"].rsplit(":", 1)[1])]
    body = json.dumps({"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
    status, _ = get(api, "/v1/completions", {"Content-Type": "application/json"}, body, "POST")
    assert status == 401, f"no API key: {status}"
    status, out = get(api, "/v1/completions",
                      {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}, body, "POST")
    assert status == 200, (status, out, log("frontend"))
    assert json.loads(out)["choices"][0]["text"], out

    # Kubernetes stops each pod with SIGTERM; every process drains and exits 0 in its grace.
    for role in ("frontend", "prefill", "decode", "scheduler"):
        proc, c = procs[role]
        grace = int(flags(c).get("--drain-grace-s", 10))
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=grace + 5)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{role} still running {grace + 5} s after SIGTERM:\n{log(role)}")
        assert rc == 0, f"{role} exited {rc} on SIGTERM:\n{log(role)}"
