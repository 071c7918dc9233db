"""Attention-FFN disaggregation through `cleave serve`: 1 prefill worker, 2 attention workers and 2
FFN workers in one AFD group (the FFN workers split the experts between them).

- For a dense (the bundled stories260K), two MoE (Mixtral; Qwen2-MoE with a shared expert and a
  dense layer) and a hybrid (Jamba) model, and m = 1, 2, 3 micro-batches: 32 concurrent greedy
  requests give output identical, token for token, to `cleave generate` (and so to colocated and
  P/D, which test_model_families / test_equivalence hold to the same reference). Every block and
  state slot is free afterwards. Each expert's tokens are counted by exactly one FFN worker (its
  owner), and the counts add up to top_k per decode token per MoE layer.
- SIGKILL an FFN worker mid-stream: the group's streams end with a clear error within seconds, the
  scheduler and frontend report not-ready (the group cannot run without that worker's experts), a
  new request fails fast with 503 naming the group, nothing leaks, and a replacement FFN worker
  brings the service back with the same greedy output.
"""
import asyncio
import concurrent.futures as cf
import json
import os
import random
import signal
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import CLEAVE, MODEL, ROOT, Cluster, grpc_generate_all, offline_generate, openai_client
from test_grpc_api import pb  # noqa: F401  (fixture)

FAMILIES = {"stories260K": MODEL}
for _name in ("mixtral", "qwen2_moe", "jamba"):
    FAMILIES[_name] = str(ROOT / "tests" / "data" / "golden" / _name)


def afd_workers(micro_batches, attention=2, ffn=2):
    return [dict(role="prefill", replicas=1, kv_blocks=512, max_batch_tokens=64, max_running=16, threads=1),
            dict(role="attention", replicas=attention, afd_group="g0", micro_batches=micro_batches,
                 kv_blocks=512, max_batch_tokens=64, max_running=16, threads=1),
            dict(role="ffn", replicas=ffn, afd_group="g0", threads=1)]


def make_prompts():
    rng = random.Random(777)
    words = "once upon a time the little cat expert router state went home happy".split()
    out = []
    for _ in range(32):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 20)))
        out.append((text, rng.choice([1, 5, 17, 40])))
    out[0] = ("router state " * 10, 24)  # several prefill chunks
    return out


PROMPTS = make_prompts()


def discovery(cluster):
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.sched_http_port}/discovery/prometheus",
                                timeout=5) as r:
        return {g["labels"]["worker"]: (g["labels"]["role"], g["targets"][0]) for g in json.loads(r.read())}


def scrape(address):
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return r.read().decode()


def expert_counts(text):
    """{(layer, expert): tokens} from one FFN worker's cleave_ffn_expert_tokens_total."""
    out = {}
    for line in text.splitlines():
        if line.startswith("cleave_ffn_expert_tokens_total{"):
            labels, value = line.rsplit(" ", 1)
            layer = labels.split('layer="')[1].split('"')[0]
            expert = labels.split('expert="')[1].split('"')[0]
            out[(int(layer), expert)] = float(value)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def reference(family):
    with cf.ThreadPoolExecutor(2) as ex:
        return list(ex.map(lambda pm: offline_generate(*pm, model=FAMILIES[family])["token_ids"], PROMPTS))


@pytest.mark.parametrize("micro_batches", [1, 2, 3])
def test_afd_identical_to_offline(tmp_path, family, micro_batches, reference, pb):  # noqa: F811
    cluster = Cluster(tmp_path, afd_workers(micro_batches), model=FAMILIES[family])
    try:
        before = cluster.wait_idle()["workers"]
        roles = sorted(w["role"] for w in before)
        assert roles == ["attention", "attention", "ffn", "ffn", "prefill"], before
        assert all(w["afd_complete"] for w in before if w["role"] == "attention"), before
        got = grpc_generate_all(cluster, pb, PROMPTS)
        for i, (ref, out) in enumerate(zip(reference, got)):
            assert out == ref, f"{family} m={micro_batches}: request {i} diverged (prompt {PROMPTS[i][0]!r})"
        after = cluster.wait_idle()["workers"]
        key = lambda ws: {w["name"]: (w["free_blocks"], w["free_state_slots"]) for w in ws}  # noqa: E731
        assert key(after) == key(before)

        workers = discovery(cluster)
        # Every decode token went through the attention workers' AFD path.
        afd_calls = sum(float(line.rsplit(" ", 1)[1]) for name, (role, addr) in workers.items()
                        if role == "attention" for line in scrape(addr).splitlines()
                        if line.startswith("cleave_afd_calls_total "))
        assert afd_calls > 0
        config = json.loads((ROOT / FAMILIES[family] / "config.json").read_text()) \
            if family != "stories260K" else {}
        experts = config.get("num_local_experts") or config.get("num_experts") or 0
        if experts:
            top_k = config["num_experts_per_tok"]
            counts = [expert_counts(scrape(addr)) for role, addr in workers.values() if role == "ffn"]
            owned = [{e for (_, e) in c} for c in counts]
            assert owned[0] and owned[1] and not (owned[0] & owned[1]), owned  # each expert: one owner
            decode_tokens = sum(len(out) - 1 for out in got)
            layers = {layer for c in counts for (layer, _) in c}
            for layer in layers:
                routed = sum(v for c in counts for (l, e), v in c.items() if l == layer and e != "shared")
                assert routed == top_k * decode_tokens, (layer, routed, decode_tokens)
                shared = [v for c in counts for (l, e), v in c.items() if l == layer and e == "shared"]
                if shared:
                    assert shared == [decode_tokens]
    finally:
        assert cluster.stop() == 0, cluster.logs()


def ready(port, path="/ready/serving"):
    """The scheduler's serving readiness (its /ready is the control plane's, up while a group is
    incomplete); path="/ready" on the frontend's port for the frontend's."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def running_requests(address):
    for line in scrape(address).splitlines():
        if line.startswith("cleave_worker_running_requests{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def kill_ffn_when_busy(cluster, victim, timeout=30):
    """SIGKILL FFN worker `victim` the moment an attention worker's engine holds requests (watched
    from the workers' own metrics: the client's view lags under load)."""
    workers = discovery(cluster)
    attention = [addr for role, addr in workers.values() if role == "attention"]
    pids = cluster.worker_pids(victim)
    assert len(pids) == 1 and len(attention) == 2, (pids, workers)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(running_requests(a) > 0 for a in attention):
            os.kill(pids[0], signal.SIGKILL)
            return time.time()
        time.sleep(0.002)
    raise AssertionError("no attention worker ever held a request")


async def stream_until_end(client, i):
    try:
        s = await client.completions.create(model="mixtral", prompt=f"story {i}: the router",
                                            max_tokens=200, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        n = 0
        async for _ in s:
            n += 1
        return ("ok", n, time.time())
    except (openai.APIError, openai.APIConnectionError) as e:
        return ("error", str(e), time.time())


async def kill_mid_stream(cluster, streams):
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    killer = asyncio.create_task(asyncio.to_thread(kill_ffn_when_busy, cluster, "ffn-1"))
    tasks = [asyncio.create_task(stream_until_end(client, i)) for i in range(streams)]
    killed_at = await killer
    results = await asyncio.gather(*tasks)
    await client.close()
    return killed_at, results


def test_kill_ffn_worker_mid_stream(tmp_path):
    model = FAMILIES["mixtral"]
    cluster = Cluster(tmp_path, afd_workers(2), model=model)
    replacement = None
    try:
        killed_at, results = asyncio.run(kill_mid_stream(cluster, 24))
        errors = [r for r in results if r[0] == "error"]
        assert errors, f"no stream was running at the kill: {[r[:2] for r in results]}\n{cluster.logs()}"
        for _, msg, ended in errors:
            assert ended - killed_at < 5, f"a stream took {ended - killed_at:.1f}s to fail after the kill"
        assert any("FFN" in msg or "AFD" in msg for _, msg, _ in errors), errors[:3]

        # The group cannot run without ffn-1's experts: not ready, and new requests fail fast.
        deadline = time.time() + 10
        while "ffn-1" in {w["name"] for w in cluster.kv()["workers"]}:
            assert time.time() < deadline, "the scheduler still lists the killed FFN worker"
            time.sleep(0.1)
        code, body = ready(cluster.sched_http_port)
        assert code == 503 and "g0" in body, (code, body)
        assert ready(cluster.sched_http_port, "/ready")[0] == 200  # workers can still register
        deadline = time.time() + 2  # the frontend caches its readiness for 250 ms
        while ready(cluster.http_port, "/ready")[0] != 503:  # no decode capacity left
            assert time.time() < deadline, "the frontend still reports ready"
            time.sleep(0.05)
        assert cluster.get("/health")[0] == 200
        client = openai_client(cluster, timeout=30)
        t0 = time.time()
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="mixtral", prompt="while broken", max_tokens=4, temperature=0)
        assert err.value.status_code == 503, err.value
        assert "g0" in str(err.value), str(err.value)
        assert time.time() - t0 < 5
        cluster.wait_idle()  # no block held anywhere

        # A replacement joins the group: ready again, and the output is the offline one.
        replacement = subprocess.Popen(
            [CLEAVE, "worker", "--role", "ffn", "--config", str(cluster.config), "--model", model,
             "--scheduler", f"127.0.0.1:{cluster.sched_port}", "--name", "ffn-1b", "--afd-group", "g0",
             "--ffn-shard", "1", "--ffn-shards", "2", "--threads", "1"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while ready(cluster.sched_http_port)[0] != 200:
            assert time.time() < deadline, ready(cluster.sched_http_port)
            time.sleep(0.1)
        want = offline_generate("after the repair", 12, model=model)["text"]
        deadline = time.time() + 10
        while True:  # the frontend caches readiness for a moment
            try:
                r = client.completions.create(model="mixtral", prompt="after the repair", max_tokens=12,
                                              temperature=0)
                break
            except openai.APIStatusError:
                assert time.time() < deadline
                time.sleep(0.2)
        assert r.choices[0].text == want
        cluster.wait_idle()
    finally:
        if replacement is not None:
            replacement.send_signal(signal.SIGTERM)
            replacement.wait(30)
        cluster.stop()


def test_dense_group_keeps_serving_without_one_ffn_worker(tmp_path, pb):  # noqa: F811
    """Dense FFNs are replicated on every FFN worker: losing one leaves the group complete, and the
    attention workers spread rows over the survivors."""
    cluster = Cluster(tmp_path, afd_workers(2), model=MODEL)
    try:
        os.kill(cluster.worker_pids("ffn-1")[0], signal.SIGKILL)
        deadline = time.time() + 10
        while "ffn-1" in {w["name"] for w in cluster.kv()["workers"]}:
            assert time.time() < deadline, "the scheduler still lists the killed FFN worker"
            time.sleep(0.1)
        assert ready(cluster.sched_http_port)[0] == 200
        prompts = PROMPTS[:8]
        want = [offline_generate(*pm)["token_ids"] for pm in prompts]
        assert grpc_generate_all(cluster, pb, prompts) == want
        cluster.wait_idle()
    finally:
        cluster.stop()


def test_afd_with_a_cluster_secret(tmp_path, pb):  # noqa: F811
    """With kv_secret_file the activation connections authenticate as the KV transport's do: the
    group serves with the offline output, and a peer without the secret gets no HELLO_ACK from an
    FFN worker (which keeps serving)."""
    import re
    import socket
    import struct
    (tmp_path / "kv.secret").write_bytes(os.urandom(48))
    model = FAMILIES["mixtral"]
    cluster = Cluster(tmp_path, afd_workers(2), model=model, top="kv_secret_file: kv.secret\n")
    try:
        prompts = PROMPTS[:8]
        want = [offline_generate(*pm, model=model)["token_ids"] for pm in prompts]
        assert grpc_generate_all(cluster, pb, prompts) == want
        address = re.search(r"FFN of AFD group g0 on ([0-9.]+):(\d+)", cluster.log_text())
        assert address, cluster.logs()
        with socket.create_connection((address.group(1), int(address.group(2))), timeout=5) as raw:
            # A well-formed HELLO (hidden 64, 2 layers), but no authentication first.
            raw.sendall(struct.pack("<IHHIII", 0x48464143, 1, 0, 64, 2, 8192) + bytes(12))
            received = b""
            while True:
                chunk = raw.recv(4096)
                if not chunk:
                    break
                received += chunk
            assert struct.pack("<I", 0x4B464143) not in received  # no "CAFK" HELLO_ACK
        assert grpc_generate_all(cluster, pb, prompts) == want
        cluster.wait_idle()
    finally:
        assert cluster.stop() == 0, cluster.logs()


def test_attention_role_needs_a_group(tmp_path):
    out = subprocess.run([CLEAVE, "worker", "--role", "attention", "--model", MODEL, "--scheduler",
                          "127.0.0.1:1", "--http", "off"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "afd_group" in out.stderr, out.stderr
    out = subprocess.run([CLEAVE, "worker", "--role", "ffn", "--model", FAMILIES["mixtral"], "--scheduler",
                          "127.0.0.1:1", "--afd-group", "g0", "--ffn-experts", "3,3", "--http", "off"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "listed twice" in out.stderr, out.stderr
    # A config's ffn group of 2: a worker started from it must say which shard it is.
    out = subprocess.run([CLEAVE, "worker", "--role", "ffn", "--config", str(ROOT / "configs" / "afd.yaml"),
                          "--scheduler", "127.0.0.1:1", "--http", "off"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode != 0 and "--ffn-shard" in out.stderr, out.stderr
