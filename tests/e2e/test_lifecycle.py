"""The frontend's lifecycle and request tracing, through real clients against `cleave serve`:

- grpc.health.v1.Health on the frontend's and the scheduler's gRPC ports;
- SIGTERM to `cleave serve` drains: streams in flight (SSE and gRPC) run to their end, new
  generations get 503 (gRPC UNAVAILABLE) with Retry-After, /ready says 503, the other routes keep
  answering, and serve exits 0; with a short grace the rest is cancelled and serve still exits 0;
- x-request-id: taken from the client when acceptable (else the response's own id), echoed on
  every generation response, and named by the frontend's one request_done log line per request;
- the request_done timings add up: frontend_in + queue + prefill + frontend_out vs ttft_ms.
"""
import json
import re
import signal
import threading
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from conftest import Cluster, openai_client
from test_grpc_api import pb  # noqa: F401  (fixture)

MODEL = "stories260K"
SERVING, NOT_SERVING = b"\x08\x01", b"\x08\x02"
# P/D whose decode worker runs 2 requests at a time: 32 long streams then take several seconds
# (the rest wait in the scheduler's queue), so a SIGTERM lands mid-stream whatever the
# machine's speed.
SLOW_PD = [dict(role="prefill", replicas=1, kv_blocks=512, threads=1),
           dict(role="decode", replicas=1, kv_blocks=1024, threads=1, max_running=2)]


def health(target, service=""):
    """grpc.health.v1.Health/Check on raw bytes: HealthCheckRequest{service} -> the response bytes
    (field 1, the status enum)."""
    channel = grpc.insecure_channel(target)
    try:
        check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                    request_serializer=lambda x: x, response_deserializer=lambda x: x)
        name = service.encode()
        return check(b"\x0a" + bytes([len(name)]) + name if name else b"", timeout=5)
    finally:
        channel.close()


def assert_serves(cluster):
    """A normal request still works (after a negative test)."""
    c = openai_client(cluster).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5,
                                                  temperature=0)
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 5


def post(cluster, path, body, headers=()):
    """(status, headers, body) of a raw POST, errors included."""
    req = urllib.request.Request(cluster.url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **dict(headers)})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# ---- gRPC health -----------------------------------------------------------------------------

def test_grpc_health_serving_on_frontend_and_scheduler(pd):
    assert health(pd.grpc_target) == SERVING
    assert health(pd.grpc_target, "cleave.v1.Generation") == SERVING
    assert health(f"127.0.0.1:{pd.sched_port}") == SERVING
    with pytest.raises(grpc.RpcError) as e:
        health(pd.grpc_target, "no.such.Service")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert_serves(pd)


# ---- request ids -----------------------------------------------------------------------------

def test_request_id_from_client_echoed_and_logged(pd, no_leaks):
    client = openai_client(pd)
    raw = client.completions.with_raw_response.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
        extra_headers={"x-request-id": "client-id-1"})
    assert raw.headers["x-request-id"] == "client-id-1"
    completion = raw.parse()
    rec = pd.request_done("client-id-1")
    assert rec["api"] == "completions" and rec["outcome"] == "length" and rec["status"] == 200
    assert rec["completion_tokens"] == 5 and rec["prompt_tokens"] == completion.usage.prompt_tokens
    assert rec["n"] == 1
    for key in ("ttft_ms", "e2e_ms", "frontend_in_ms", "frontend_out_ms"):
        assert rec[key] >= 0, rec
    assert rec["ttft_ms"] <= rec["e2e_ms"]


def test_request_id_on_sse_stream(pd, no_leaks):
    raw = openai_client(pd).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, stream=True,
        temperature=0, extra_headers={"x-request-id": "sse.stream:2"})
    assert raw.headers["x-request-id"] == "sse.stream:2"
    chunks = list(raw.parse())
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    rec = pd.request_done("sse.stream:2")
    assert rec["api"] == "chat" and rec["outcome"] == chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("bad", ["has space", "x" * 129, 'say"hi', "it's", ""])
def test_unacceptable_request_id_is_replaced(pd, bad, no_leaks):
    raw = openai_client(pd).completions.with_raw_response.create(
        model=MODEL, prompt="Once upon a time", max_tokens=3, temperature=0,
        extra_headers={"x-request-id": bad})
    completion = raw.parse()
    # Replaced by the response's own id, which the log line names.
    assert raw.headers["x-request-id"] == completion.id and completion.id.startswith("cmpl-")
    assert pd.request_done(completion.id)["outcome"] == "length"
    assert_serves(pd)


def test_request_id_on_errors_after_parsing(pd, no_leaks):
    status, headers, body = post(pd, "/v1/completions",
                                 {"model": MODEL, "prompt": "Once", "max_tokens": 100000},
                                 {"x-request-id": "too-long-1"})
    assert status == 400, body
    assert headers["x-request-id"] == "too-long-1"
    rec = pd.request_done("too-long-1")
    assert rec["outcome"] == "error" and rec["status"] == 400 and "maximum context length" in rec["error"]
    # A body that is not even JSON still gets an id (one of the frontend's own).
    status, headers, _ = post(pd, "/v1/chat/completions", "not json")
    assert status == 400 and headers["x-request-id"].startswith("chatcmpl-")
    assert_serves(pd)


def test_client_disconnect_is_logged_as_cancelled(pd, no_leaks):
    stream = openai_client(pd).completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=400, stream=True, temperature=0,
        extra_body={"ignore_eos": True}, extra_headers={"x-request-id": "goes-away"})
    next(iter(stream))
    stream.close()
    rec = pd.request_done("goes-away")
    assert rec["outcome"] == "cancelled" and rec["cancelled_by"] == "client"
    assert 0 < rec["completion_tokens"] < 400
    assert_serves(pd)


def test_grpc_request_id(pd, pb, no_leaks):  # noqa: F811
    gen_pb, gen_grpc = pb
    channel = grpc.insecure_channel(pd.grpc_target)
    stub = gen_grpc.GenerationStub(channel)
    req = gen_pb.GenerateRequest(prompt="Once upon a time", max_tokens=4,
                                 sampling=gen_pb.SamplingOptions(temperature=0))
    call = stub.Generate(req, timeout=30, metadata=[("x-request-id", "grpc-id-7")])
    responses = list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "grpc-id-7"
    assert responses[0].request_id == "grpc-id-7"
    rec = pd.request_done("grpc-id-7")
    assert rec["api"] == "grpc" and rec["outcome"] == "length" and rec["status"] == 0
    assert rec["completion_tokens"] == 4
    # Not acceptable: replaced, and the same id comes back both ways.
    call = stub.Generate(req, timeout=30, metadata=[("x-request-id", "white space")])
    responses = list(call)
    rid = dict(call.initial_metadata())["x-request-id"]
    assert rid != "white space" and responses[0].request_id == rid
    assert pd.request_done(rid)["outcome"] == "length"
    channel.close()


# ---- the request_done timings add up -------------------------------------------------------

def test_ttft_breakdown_adds_up(pd, no_leaks):
    """frontend_in + queue + prefill + frontend_out against ttft_ms, per request. What is left is
    the two gRPC hops between frontend and scheduler, which nobody measures."""
    client = openai_client(pd)
    story = "Once upon a time there was a little girl named Lily who loved to play in the park. "
    rows = []
    for i in range(20):
        # A few hundred tokens each, and a different start so that no prefix is cached.
        prompt = f"{i} {i * 7} " + story * 18
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=True,
                                           temperature=0, extra_headers={"x-request-id": f"ttft-{i}"})
        list(stream)
        rec = pd.request_done(f"ttft-{i}")
        parts = [rec.get(k) for k in ("frontend_in_ms", "queue_ms", "prefill_ms", "frontend_out_ms")]
        assert None not in parts, f"a phase is missing (scheduler timings not landed?): {rec}"
        rows.append((rec["prompt_tokens"], rec["ttft_ms"], *parts))
    table = "\n".join(f"  prompt {p:4d}  ttft {t:7.3f} ms = in {a:6.3f} + queue {b:6.3f} + prefill {c:7.3f} "
                      f"+ out {d:6.3f}; unmeasured {t - a - b - c - d:6.3f} ms ({(t - a - b - c - d) / t:6.1%})"
                      for p, t, a, b, c, d in rows)
    print("\nTTFT breakdown:\n" + table)
    for p, t, a, b, c, d in rows:
        assert p >= 200
        assert abs(t - (a + b + c + d)) <= 0.05 * t, "more than 5% of TTFT unaccounted for:\n" + table


# ---- SIGTERM drains ------------------------------------------------------------------------

class Streams:
    """n streaming completions (and one gRPC Generate) in threads, each to max_tokens."""

    def __init__(self, cluster, n, max_tokens, pbmod=None):
        self.client = openai_client(cluster, timeout=120)
        self.max_tokens = max_tokens
        self.results = [None] * n
        self.threads = [threading.Thread(target=self.one, args=(i,), daemon=True) for i in range(n)]
        if pbmod is not None:
            self.grpc_result = None
            self.threads.append(threading.Thread(target=self.grpc_one, args=(cluster, pbmod), daemon=True))
        # Threads that start sending at once slow the starting of the next ones (the GIL), so
        # they all wait for one signal: the requests then go out together.
        self.go = threading.Event()
        for t in self.threads:
            t.start()
        self.go.set()

    def one(self, i):
        self.go.wait()
        try:
            stream = self.client.completions.create(
                model=MODEL, prompt=f"Once upon a time {i}", max_tokens=self.max_tokens, stream=True,
                temperature=0, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                extra_headers={"x-request-id": f"drain-{i}"})
            finish, usage = None, None
            for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            self.results[i] = (finish, usage)
        except Exception as e:  # noqa: BLE001  (recorded; the test asserts on it)
            self.results[i] = e

    def grpc_one(self, cluster, pbmod):
        self.go.wait()
        gen_pb, gen_grpc = pbmod
        channel = grpc.insecure_channel(cluster.grpc_target)
        try:
            req = gen_pb.GenerateRequest(prompt="Once upon a time", max_tokens=self.max_tokens, ignore_eos=True,
                                         sampling=gen_pb.SamplingOptions(temperature=0))
            last = None
            for r in gen_grpc.GenerationStub(channel).Generate(req, timeout=120):
                last = r
            self.grpc_result = (last.finish_reason, last.completion_tokens)
        except grpc.RpcError as e:
            self.grpc_result = e
        finally:
            channel.close()

    def wait_in_flight(self, cluster, timeout=60):
        """Until the frontend has admitted every stream and holds at least half of them (the rest
        finished already: the client threads take a while to all send, the GIL being contended).
        Read from the frontend's metrics, which do not lag like the clients' own view."""
        want, deadline = len(self.threads), time.time() + timeout
        while True:
            with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as r:
                samples = dict(line.rsplit(" ", 1) for line in r.read().decode().splitlines()
                               if line and not line.startswith("#"))
            held = float(samples["cleave_frontend_requests_in_flight"])
            ended = sum(float(v) for k, v in samples.items()
                        if k.startswith("cleave_frontend_requests_finished_total{"))
            if held + ended == want:
                assert held >= want // 2, f"only {held} of {want} streams still running"
                return
            assert time.time() < deadline, f"{held} of {want} streams in flight: {self.results}"
            time.sleep(0.01)

    def running(self):
        return sum(t.is_alive() for t in self.threads)

    def join(self, timeout=90):
        deadline = time.time() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.time()))
        assert self.running() == 0, "streams still running"


def wait_draining(cluster, timeout=5):
    """Until /ready says 503; returns its body."""
    deadline = time.time() + timeout
    while True:
        try:
            cluster.get("/ready")
        except urllib.error.HTTPError as e:
            if e.code == 503:
                return json.loads(e.read())
        assert time.time() < deadline, "/ready never turned 503"
        time.sleep(0.01)


def test_sigterm_drains_streams_and_refuses_new_requests(tmp_path, pb):  # noqa: F811
    cluster = Cluster(tmp_path, SLOW_PD, frontend={"drain_grace_s": 30})
    try:
        streams = Streams(cluster, 32, max_tokens=480, pbmod=pb)
        streams.wait_in_flight(cluster)
        cluster.proc.send_signal(signal.SIGTERM)
        signalled = time.time()

        ready = wait_draining(cluster)
        assert "draining" in ready["error"]["message"], ready
        # A new generation while the streams still run: 503 with an OpenAI error body.
        assert streams.running() > 0, "the streams ended before the drain could be checked"
        with pytest.raises(openai.APIStatusError) as e:
            openai_client(cluster).completions.create(model=MODEL, prompt="Once", max_tokens=5,
                                                      extra_headers={"x-request-id": "after-sigterm"})
        assert e.value.status_code == 503
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.response.headers["x-request-id"] == "after-sigterm"
        assert e.value.body["code"] == "service_unavailable" and e.value.body["type"] == "server_error"
        # gRPC says the same, and health turns NOT_SERVING.
        gen_pb, gen_grpc = pb
        channel = grpc.insecure_channel(cluster.grpc_target)
        with pytest.raises(grpc.RpcError) as g:
            list(gen_grpc.GenerationStub(channel).Generate(gen_pb.GenerateRequest(prompt="Once", max_tokens=3),
                                                             timeout=10))
        assert g.value.code() == grpc.StatusCode.UNAVAILABLE
        channel.close()
        assert health(cluster.grpc_target) == NOT_SERVING
        # Everything that is not a generation keeps answering.
        assert cluster.get("/health")[0] == 200
        assert cluster.get("/v1/models")[1]["data"][0]["id"] == MODEL
        with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as r:
            assert "cleave_frontend_draining 1" in r.read().decode()
        assert streams.running() > 0, "the streams ended before the drain was checked"

        streams.join()
        for i, r in enumerate(streams.results):
            assert r == ("length", 480), f"stream {i}: {r!r}"
        assert streams.grpc_result[1] == 480, streams.grpc_result
        rc = cluster.proc.wait(timeout=60)
        took = time.time() - signalled
        assert rc == 0, cluster.logs()
        assert took < 30, f"serve took {took:.1f} s to stop"
        records = {r["request_id"]: r for r in cluster.request_done(timeout=0)}
        assert all(records[f"drain-{i}"]["outcome"] == "length" for i in range(32))
        assert records["after-sigterm"]["status"] == 503
        log = cluster.log_text()
        # Stopped from the clients inwards.
        assert log.index("frontend drained") < log.index("worker prefill-0 stopped") < \
            log.index("scheduler shutting down"), log[-4000:]
    finally:
        cluster.stop()


def test_drain_grace_over_cancels_the_rest(tmp_path):
    cluster = Cluster(tmp_path, SLOW_PD, frontend={"drain_grace_s": 1})
    try:
        streams = Streams(cluster, 32, max_tokens=480)
        streams.wait_in_flight(cluster)
        cluster.proc.send_signal(signal.SIGTERM)
        signalled = time.time()
        streams.join(timeout=30)
        rc = cluster.proc.wait(timeout=30)
        took = time.time() - signalled
        assert rc == 0, cluster.logs()
        assert took < 15, f"serve took {took:.1f} s to stop"
        # The few that got a decode slot within the grace finished; the rest were cut short: the
        # client sees its stream (or connection) end early, the log says the server cancelled it.
        records = {r["request_id"]: r for r in cluster.request_done(timeout=0)}
        cut = 0
        for i, result in enumerate(streams.results):
            rec = records[f"drain-{i}"]
            if result == ("length", 480):
                assert rec["outcome"] == "length", rec
                continue
            cut += 1
            assert isinstance(result, Exception), result
            assert rec["outcome"] == "cancelled" and rec["cancelled_by"] == "server", rec
            assert rec["completion_tokens"] < 480 and rec["status"] in (200, 503), rec
        assert cut >= 8, streams.results
        assert re.search(r"grace of 1 s over; cancelling \d+ requests", cluster.log_text())
    finally:
        cluster.stop()
