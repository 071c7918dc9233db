"""Two prefill and two decode workers: SIGKILL one decode worker mid-stream. Its streams end with
a clear error within seconds, the scheduler drops it, and new requests are served by the other.
The decode pools are small so that requests queue there: the tiny model generates far faster
than a Python client reads, and only queued work guarantees streams are mid-flight at the kill."""
import asyncio
import json
import os
import signal
import time
import urllib.request

import openai
import pytest

from conftest import PD2_TIGHT, Cluster, openai_client


@pytest.fixture(scope="module")
def pd2(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("pd2"), PD2_TIGHT)
    yield c
    assert c.stop() == 0, c.logs()


async def stream_until_end(client, i, started):
    try:
        s = await client.completions.create(model="stories260K", prompt=f"Story number {i}: once upon a time",
                                            max_tokens=480, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
        n = 0
        async for _ in s:
            n += 1
            started.set()
        return ("ok", n, time.time())
    except (openai.APIError, openai.APIConnectionError) as e:
        return ("error", str(e), time.time())


def running_requests(address):
    """cleave_worker_running_requests of the worker whose HTTP port is `address`."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("cleave_worker_running_requests{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def kill_busy_decode_worker(cluster, timeout=30):
    """The moment a decode worker's engine holds requests, SIGKILL it; returns its name and the
    time. Those requests are decoding, so each has streamed its first token and must fail (a
    request that streamed nothing would be re-run instead). Runs in its own thread and watches the
    workers themselves: the client's view lags the server by seconds when the machine is busy
    (48 streams of SSE parsing in one Python process), and a kill decided from it can land after
    every request has finished."""
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.sched_http_port}/discovery/prometheus",
                                timeout=5) as r:
        decode = {g["labels"]["worker"]: g["targets"][0] for g in json.loads(r.read())
                  if g["labels"]["role"] == "decode"}
    pids = {name: cluster.worker_pids(name) for name in decode}
    assert len(decode) == 2 and all(len(p) == 1 for p in pids.values()), (decode, pids)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, address in decode.items():
            if running_requests(address) > 0:
                os.kill(pids[name][0], signal.SIGKILL)
                return name, time.time()
        time.sleep(0.002)
    raise AssertionError("no decode worker ever held a request")


async def kill_mid_stream(cluster, streams):
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    started = asyncio.Event()
    killer = asyncio.create_task(asyncio.to_thread(kill_busy_decode_worker, cluster))
    tasks = [asyncio.create_task(stream_until_end(client, i, started)) for i in range(streams)]
    victim, killed_at = await killer
    results = await asyncio.gather(*tasks)
    await client.close()
    return victim, killed_at, results


def test_kill_decode_worker_mid_stream(pd2):
    names = {w["name"] for w in pd2.kv()["workers"]}
    assert {"decode-0", "decode-1", "prefill-0", "prefill-1"} <= names
    victim, killed_at, results = asyncio.run(kill_mid_stream(pd2, 48))
    errors = [r for r in results if r[0] == "error"]
    assert errors, f"no stream was on the killed worker: {[r[:2] for r in results]}\n{pd2.logs()}"
    assert any(r[0] == "ok" for r in results), "streams on the surviving worker must complete"
    for _, msg, ended in errors:
        assert ended - killed_at < 5, f"a stream on the dead worker took {ended - killed_at:.1f}s to fail"
        assert msg
    deadline = time.time() + 10
    while victim in {w["name"] for w in pd2.kv()["workers"]}:
        assert time.time() < deadline, "scheduler still lists the killed worker"
        time.sleep(0.1)
    client = openai_client(pd2, timeout=60)
    for i in range(6):
        r = client.completions.create(model="stories260K", prompt=f"After the crash {i}", max_tokens=8,
                                      temperature=0)
        assert r.usage.completion_tokens >= 1
    pd2.wait_idle()
