"""Two prefill and two decode workers: SIGKILL one decode worker mid-stream. Its streams end with
a clear error within seconds, the scheduler drops it, and new requests are served by the other.
The decode pools are small so that requests queue there: the tiny model generates far faster
than a Python client reads, and only queued work guarantees streams are mid-flight at the kill."""
import asyncio
import os
import signal
import time

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


async def kill_mid_stream(cluster, streams):
    client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    started = asyncio.Event()
    tasks = [asyncio.create_task(stream_until_end(client, i, started)) for i in range(streams)]
    await asyncio.wait_for(started.wait(), 30)
    # The decode worker holding the most requests right now is the victim.
    busy = await asyncio.to_thread(
        lambda: max((w for w in cluster.kv()["workers"] if w["role"] == "decode"), key=lambda w: w["used_blocks"]))
    victim = cluster.worker_pids(busy["name"])
    assert busy["used_blocks"] > 0 and len(victim) == 1, busy
    killed_at = time.time()
    os.kill(victim[0], signal.SIGKILL)
    results = await asyncio.gather(*tasks)
    await client.close()
    return busy["name"], killed_at, results


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
