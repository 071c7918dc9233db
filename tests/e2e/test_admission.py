"""Admission control: over capacity is HTTP 429 with Retry-After (decided before any KV is
allocated), and the server serves normally afterwards."""
import concurrent.futures as cf
import http.client
import json
import threading

import pytest

from conftest import Cluster, openai_client

# Few blocks, so requests queue and the bounded waiting queue overflows.
TIGHT = [dict(role="prefill", replicas=1, kv_blocks=64, threads=1),
         dict(role="decode", replicas=1, kv_blocks=64, threads=1)]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("small"), TIGHT, max_waiting=2, retry_after_s=3)
    yield c
    assert c.stop() == 0, c.logs()


def post(port, body, barrier=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.connect()
    if barrier is not None:
        barrier.wait()  # every request leaves together: a burst, not a trickle the server keeps up with
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    out = (r.status, r.getheader("Retry-After"), json.loads(r.read()))
    conn.close()
    return out


def test_overload_is_429_with_retry_after(small):
    # Long generations hold their blocks (about 28 of the 64 each), so at most two run at once and
    # the rest of a simultaneous burst overflows the 2-deep waiting queue however fast the host.
    body = {"model": "stories260K", "prompt": "Once upon a time " * 20, "max_tokens": 350,
            "temperature": 0, "ignore_eos": True}
    barrier = threading.Barrier(48)
    with cf.ThreadPoolExecutor(48) as ex:
        results = list(ex.map(lambda _: post(small.http_port, body, barrier), range(48)))
    statuses = [r[0] for r in results]
    assert 429 in statuses, statuses
    assert 200 in statuses, statuses
    for status, retry_after, payload in results:
        if status == 429:
            assert retry_after == "3"
            assert payload["error"]["type"]
    small.wait_idle()
    r = openai_client(small).completions.create(model="stories260K", prompt="Hello", max_tokens=4)
    assert r.usage.completion_tokens >= 1
