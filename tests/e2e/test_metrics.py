"""The frontend's GET /metrics: Prometheus text that `promtool check metrics` accepts, and values
that match what was sent (request counters by endpoint and status, token counters equal to the
usage the API reported, one TTFT / end-to-end observation per generation, in-flight back to 0)."""
import re
import shutil
import subprocess
import urllib.error
import urllib.request

import grpc
import pytest

from conftest import openai_client
from test_grpc_api import pb  # noqa: F401  (fixture)

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')


def scrape(cluster):
    with urllib.request.urlopen(cluster.url + "/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return r.read().decode()


def parse(text):
    """{(name, labels-string): value} for every sample line."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def value(samples, name, labels=""):
    return samples.get((name, labels), 0.0)


def test_promtool_accepts_metrics(pd):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: run scripts/install-deps.sh (Debian package prometheus)"
    text = scrape(pd)
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res


def test_counts_match_what_was_sent(pd, pb):  # noqa: F811
    pd.wait_idle()
    before = parse(scrape(pd))
    client = openai_client(pd)
    prompt_tokens = completion_tokens = 0
    for i in range(4):
        r = client.completions.create(model="stories260K", prompt=f"Once upon a time {i}",
                                      max_tokens=5 + i, temperature=0)
        prompt_tokens += r.usage.prompt_tokens
        completion_tokens += r.usage.completion_tokens
    stream = client.completions.create(model="stories260K", prompt="The cat", max_tokens=6,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            prompt_tokens += chunk.usage.prompt_tokens
            completion_tokens += chunk.usage.completion_tokens
    # A bad request: counted under its status, and the service still works afterwards.
    req = urllib.request.Request(pd.url + "/v1/completions", data=b'{"model": 5}',
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400
    gen_pb, gen_grpc = pb
    with grpc.insecure_channel(pd.grpc_target) as channel:
        stub = gen_grpc.GenerationStub(channel)
        got = list(stub.Generate(gen_pb.GenerateRequest(prompt="Lily", max_tokens=4,
                                                        sampling=gen_pb.SamplingOptions(temperature=0))))
    prompt_tokens += got[-1].prompt_tokens
    completion_tokens += got[-1].completion_tokens
    assert got[-1].completion_tokens == sum(len(r.tokens) for r in got)
    r = client.completions.create(model="stories260K", prompt="ok", max_tokens=2)
    prompt_tokens += r.usage.prompt_tokens
    completion_tokens += r.usage.completion_tokens

    pd.wait_idle()
    after = parse(scrape(pd))

    def delta(name, labels=""):
        return value(after, name, labels) - value(before, name, labels)

    ok = '{endpoint="/v1/completions",code="200"}'
    assert delta("cleave_frontend_http_requests_total", ok) == 6
    assert delta("cleave_frontend_http_requests_total", '{endpoint="/v1/completions",code="400"}') == 1
    assert delta("cleave_frontend_grpc_requests_total", '{method="Generate",code="OK"}') == 1
    generations = 7  # 4 + 1 streamed + 1 gRPC + the final check
    assert delta("cleave_frontend_time_to_first_token_seconds_count") == generations
    assert delta("cleave_frontend_e2e_request_latency_seconds_count") == generations
    assert delta("cleave_frontend_request_max_tokens_count") == generations
    assert delta("cleave_frontend_request_n_count") == 6  # HTTP completion requests that ran
    finished = sum(delta("cleave_frontend_requests_finished_total", f'{{reason="{r}"}}')
                   for r in ("stop", "length", "error", "cancelled"))
    assert finished == generations
    assert delta("cleave_frontend_prompt_tokens_total") == prompt_tokens
    assert delta("cleave_frontend_generation_tokens_total") == completion_tokens
    assert value(after, "cleave_frontend_requests_in_flight") == 0
    # Inter-token gaps: at most one per token after each generation's first (tokens that reach
    # the frontend in one batch with the first token share no gap).
    itl = delta("cleave_frontend_inter_token_latency_seconds_count")
    assert 0 < itl <= completion_tokens - generations, itl
