"""Security of a real `cleave serve` tree: mutual TLS on internal gRPC (certificates from
scripts/dev-certs.sh), the KV transport's cluster secret, client API keys on the frontend's HTTP
and gRPC APIs, and the frontend's admin listener. Every refusal is followed by a request that
proves the service carries on."""
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from conftest import CLEAVE, MODEL, PD, ROOT, Cluster, free_port
from test_grpc_api import pb  # noqa: F401  (fixture)

PROMPT = "Once upon a time"
KEY = "sk-test-0123456789abcdef"
ENV_KEY = "sk-env-key-42"


def make_certs(out, *sans):
    args = ["bash", str(ROOT / "scripts" / "dev-certs.sh"), str(out)]
    for s in sans:
        args += ["--san", s]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=60)
    return Path(out)


def tls_yaml(certs, role):
    return (f"tls:\n  ca_file: {certs}/ca.crt\n  cert_file: {certs}/{role}.crt\n"
            f"  key_file: {certs}/{role}.key\n")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs") / "pki")


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory):
    """A second, unrelated CA and its certificates."""
    return make_certs(tmp_path_factory.mktemp("other") / "pki")


def _serve(tmp, certs, frontend=None, extra_top="", api_key=None):
    """A P/D tree with mutual TLS; the config names the CA and one certificate for every role
    (the dev certificates all carry the same SANs, so one pair serves here)."""
    secret = Path(tmp) / "kv.secret"
    secret.write_bytes(os.urandom(48))
    # Relative paths resolve against the config's directory: copy the PKI beside it.
    pki = Path(tmp) / "pki"
    pki.mkdir()
    for f in certs.iterdir():
        (pki / f.name).write_bytes(f.read_bytes())
    top = ("tls:\n  ca_file: pki/ca.crt\n  cert_file: pki/scheduler.crt\n  key_file: pki/scheduler.key\n"
           "kv_secret_file: kv.secret\n" + extra_top)
    return Cluster(tmp, PD, frontend=frontend, top=top, api_key=api_key)


@pytest.fixture(scope="module")
def mtls(tmp_path_factory, certs):
    c = _serve(tmp_path_factory.mktemp("mtls"), certs)
    yield c
    rc = c.stop()
    assert rc == 0, f"cleave serve exited with {rc}:\n{c.logs()}"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, certs):
    tmp = tmp_path_factory.mktemp("keyed")
    keys = Path(tmp) / "keys.txt"
    keys.write_text(f"# client keys\n{KEY}\n\n")
    admin_port = free_port()
    os.environ["CLEAVE_API_KEYS"] = ENV_KEY
    try:
        c = _serve(tmp, certs, frontend={"api_keys_file": str(keys), "admin_http": f"127.0.0.1:{admin_port}"},
                   api_key=KEY)
    finally:
        del os.environ["CLEAVE_API_KEYS"]
    c.admin_url = f"http://127.0.0.1:{admin_port}"
    yield c
    rc = c.stop()
    assert rc == 0, f"cleave serve exited with {rc}:\n{c.logs()}"


def http(url, path, key=None, body=None, headers=None):
    """(status, headers, parsed JSON or text) for one request; no exception on HTTP errors."""
    req = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, hdrs, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, e.headers, e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode(errors="replace")


def complete(cluster, key="unused"):
    import openai
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=key, max_retries=0)
    r = client.completions.create(model="stories260K", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens > 0
    return r


def tls_channel(cluster, certs):
    creds = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes())
    return grpc.secure_channel(cluster.grpc_target, creds)


def grpc_generate(pb, channel, metadata=None):
    gen_pb, gen_grpc = pb
    stub = gen_grpc.GenerationStub(channel)
    req = gen_pb.GenerateRequest(prompt=PROMPT, max_tokens=8, sampling=gen_pb.SamplingOptions(temperature=0))
    return [t.token_id for r in stub.Generate(req, timeout=30, metadata=metadata) for t in r.tokens]


def sched_stats(cluster):
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.sched_http_port}/debug/stats", timeout=10) as r:
        return r.read().decode()


def start_worker(tmp, cluster, name, *flags):
    """A decode worker started by hand against the cluster's scheduler; returns (proc, log path)."""
    log = Path(tmp) / f"{name}.log"
    proc = subprocess.Popen([CLEAVE, "worker", "--role", "decode", "--scheduler", f"127.0.0.1:{cluster.sched_port}",
                             "--model", MODEL, "--name", name, "--kv-blocks", "64", "--threads", "1",
                             "--http", "off", *flags],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    return proc, log


def assert_refused(cluster, proc, log, name, expect):
    """The worker keeps running and retrying, is never registered, and says why."""
    deadline = time.time() + 6
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()
        assert name not in json.dumps(cluster.kv()), cluster.kv()
        assert name not in sched_stats(cluster)
        time.sleep(0.3)
    text = log.read_text()
    assert "registered with" not in text, text
    assert any(e in text for e in expect), text
    proc.terminate()
    assert proc.wait(30) == 0, text


# --- mutual TLS ------------------------------------------------------------------------------

def test_mtls_cluster_serves_http_and_grpc(mtls, certs, pb):
    r = complete(mtls)
    ids = grpc_generate(pb, tls_channel(mtls, certs))
    assert len(ids) > 0
    assert "(mutual TLS)" in mtls.log_text()
    # The public gRPC API speaks TLS only.
    with pytest.raises(grpc.RpcError) as e:
        grpc_generate(pb, grpc.insecure_channel(mtls.grpc_target))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert complete(mtls).choices[0].text == r.choices[0].text
    mtls.wait_idle()


def test_worker_with_cert_of_another_ca_is_refused(mtls, certs, other_certs, tmp_path):
    # It trusts the right CA (so only the scheduler's check of its certificate can stop it).
    proc, log = start_worker(tmp_path, mtls, "rogue-ca", "--tls-ca", str(certs / "ca.crt"),
                             "--tls-cert", str(other_certs / "worker.crt"),
                             "--tls-key", str(other_certs / "worker.key"))
    try:
        assert_refused(mtls, proc, log, "rogue-ca", ["TLS handshake", "Ssl handshake failed"])
    finally:
        proc.kill()
    # The scheduler's side of the story: it could not verify the worker's certificate.
    assert "certificate verify failed" in mtls.log_text()
    complete(mtls)
    mtls.wait_idle()


def test_worker_trusting_another_ca_is_refused(mtls, other_certs, tmp_path):
    proc, log = start_worker(tmp_path, mtls, "rogue-trust", "--tls-ca", str(other_certs / "ca.crt"),
                             "--tls-cert", str(other_certs / "worker.crt"),
                             "--tls-key", str(other_certs / "worker.key"))
    try:
        assert_refused(mtls, proc, log, "rogue-trust", ["Ssl handshake failed"])
    finally:
        proc.kill()
    complete(mtls)


def test_plaintext_worker_is_refused(mtls, tmp_path):
    proc, log = start_worker(tmp_path, mtls, "plain")
    try:
        assert_refused(mtls, proc, log, "plain", ["require mutual TLS"])
    finally:
        proc.kill()
    complete(mtls)
    mtls.wait_idle()


def test_worker_with_the_cluster_cert_registers(mtls, certs, tmp_path):
    proc, log = start_worker(tmp_path, mtls, "good", "--tls-ca", str(certs / "ca.crt"),
                             "--tls-cert", str(certs / "worker.crt"), "--tls-key", str(certs / "worker.key"))
    try:
        deadline = time.time() + 15
        while "good" not in [w["name"] for w in mtls.kv()["workers"]]:
            assert time.time() < deadline, log.read_text()
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()
    deadline = time.time() + 10
    while "good" in [w["name"] for w in mtls.kv()["workers"]]:
        assert time.time() < deadline
        time.sleep(0.1)
    complete(mtls)


# --- API keys and the admin listener --------------------------------------------------------

def test_requests_without_or_with_a_wrong_key_get_401(keyed):
    import openai
    body = {"model": "stories260K", "prompt": PROMPT, "max_tokens": 4}
    for key in (None, "sk-wrong", KEY + "x", KEY[:-1]):
        status, hdrs, err = http(keyed.url, "/v1/completions", key=key, body=body)
        assert status == 401, (key, err)
        assert hdrs["WWW-Authenticate"] == "Bearer"
        assert err["error"]["code"] == "invalid_api_key"
        assert err["error"]["type"] in ("invalid_request_error", "authentication_error")
    # A scheme other than Bearer is no key either.
    status, _, _ = http(keyed.url, "/v1/models", headers={"Authorization": f"Basic {KEY}"})
    assert status == 401
    with pytest.raises(openai.AuthenticationError):
        complete(keyed, key="sk-wrong")
    complete(keyed, key=KEY)
    keyed.wait_idle()


def test_every_route_but_health_needs_the_key(keyed):
    for path in ("/v1/models", "/metrics", "/ready", "/debug/kv", "/v1/models/stories260K", "/nope"):
        assert http(keyed.url, path)[0] == 401, path
    assert http(keyed.url, "/tokenize", body={"prompt": "hi"})[0] == 401
    assert http(keyed.url, "/health")[0] == 200
    assert http(keyed.url, "/v1/models", key=KEY)[0] == 200
    assert http(keyed.url, "/v1/models", key=ENV_KEY)[0] == 200  # from CLEAVE_API_KEYS
    status, _, text = http(keyed.url, "/metrics", key=KEY)
    assert status == 200
    assert 'cleave_frontend_http_requests_total{endpoint="/v1/models",code="401"}' in text
    complete(keyed, key=ENV_KEY)


def test_admin_listener_needs_no_key(keyed):
    status, _, text = http(keyed.admin_url, "/metrics")
    assert status == 200 and "cleave_frontend_http_requests_total" in text
    assert http(keyed.admin_url, "/health")[0] == 200
    status, _, ready = http(keyed.admin_url, "/ready")
    assert status == 200 and ready["ready"] is True
    status, _, kv = http(keyed.admin_url, "/debug/kv")
    assert status == 200 and len(kv["workers"]) == 2
    # It serves nothing else: no generation without a key through the back door.
    assert http(keyed.admin_url, "/v1/models")[0] == 404
    complete(keyed, key=KEY)


def test_grpc_needs_the_key(keyed, certs, pb):
    channel = tls_channel(keyed, certs)
    gen_pb, gen_grpc = pb
    stub = gen_grpc.GenerationStub(channel)
    for md in (None, [("authorization", "Bearer sk-wrong")]):
        with pytest.raises(grpc.RpcError) as e:
            grpc_generate(pb, channel, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.ListModels(gen_pb.ListModelsRequest(), timeout=10, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.Tokenize(gen_pb.TokenizeRequest(text="hi"), timeout=10, metadata=md)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = [("authorization", f"Bearer {KEY}")]
    assert len(grpc_generate(pb, channel, metadata=ok)) > 0
    assert stub.ListModels(gen_pb.ListModelsRequest(), timeout=10, metadata=ok).models[0].id == "stories260K"
    keyed.wait_idle()


# --- configuration errors -------------------------------------------------------------------

def run_cleave(*args, env=None, timeout=60):
    return subprocess.run([CLEAVE, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_config_errors_name_what_is_wrong(tmp_path, certs):
    cfg = tmp_path / "c.yaml"
    cases = [
        (f"tls:\n  ca_file: {certs}/ca.crt\n  cert_file: {certs}/scheduler.crt\n", "key_file"),
        (f"tls:\n  cert_file: {certs}/scheduler.crt\n", "ca_file"),
        (f"tls:\n  ca_file: {certs}/ca.crt\n  cert_file: x\n  key_file: y\n  extra: 1\n", "unknown key 'extra'"),
        (f"tls:\n  ca_file: {certs}/ca.crt\n  cert_file: missing.crt\n  key_file: {certs}/scheduler.key\n",
         str(tmp_path / "missing.crt")),
    ]
    for text, want in cases:
        cfg.write_text(text + f"scheduler:\n  listen: 127.0.0.1:{free_port()}\n  http: 'off'\n")
        r = run_cleave("scheduler", "--config", str(cfg), timeout=20)
        assert r.returncode != 0 and want in r.stderr, (text, r.stderr)
    r = run_cleave("worker", "--role", "decode", "--tls-ca", str(certs / "ca.crt"), "--http", "off")
    assert r.returncode != 0 and "cert_file" in r.stderr and "key_file" in r.stderr, r.stderr

    short = tmp_path / "short.secret"
    short.write_bytes(b"x" * 31)
    r = run_cleave("worker", "--role", "decode", "--kv-secret-file", str(short), "--http", "off")
    assert r.returncode != 0 and "at least 32" in r.stderr, r.stderr
    cfg.write_text("kv_secret_file: short.secret\n")
    r = run_cleave("serve", "--config", str(cfg))
    assert r.returncode != 0 and str(short) in r.stderr, r.stderr

    empty = tmp_path / "keys.txt"
    empty.write_text("# nothing\n\n")
    r = run_cleave("frontend", "--api-keys-file", str(empty), "--http", f"127.0.0.1:{free_port()}",
                   "--grpc", "off")
    assert r.returncode != 0 and "holds no key" in r.stderr, r.stderr
    r = run_cleave("frontend", "--admin-http", "nohost", "--grpc", "off")
    assert r.returncode != 0 and "nohost" in r.stderr, r.stderr


def test_dev_certs_refuses_to_overwrite(tmp_path):
    out = make_certs(tmp_path / "pki", "IP:10.1.2.3", "DNS:sched.example")
    text = subprocess.run(["openssl", "x509", "-in", str(out / "scheduler.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    for san in ("IP Address:127.0.0.1", "DNS:localhost", "IP Address:10.1.2.3", "DNS:sched.example"):
        assert san in text
    for role in ("scheduler", "frontend", "worker"):
        subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / f"{role}.crt")],
                       check=True, capture_output=True)
    before = (out / "ca.crt").read_bytes()
    r = subprocess.run(["bash", str(ROOT / "scripts/dev-certs.sh"), str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and "--force" in r.stderr
    assert (out / "ca.crt").read_bytes() == before
    subprocess.run(["bash", str(ROOT / "scripts/dev-certs.sh"), str(out), "--force"], check=True,
                   capture_output=True)
    assert (out / "ca.crt").read_bytes() != before
