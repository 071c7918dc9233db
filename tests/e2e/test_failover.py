"""Two prefill and two decode workers: SIGKILL one decode worker mid-stream. Its streams end with
a clear error within seconds, the scheduler drops it, and new requests are served by the other."""
import concurrent.futures as cf
import os
import signal
import time

import openai
import pytest

from conftest import PD2, Cluster, openai_client


@pytest.fixture(scope="module")
def pd2(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("pd2"), PD2)
    yield c
    assert c.stop() == 0, c.logs()


def stream_until_end(client, i):
    try:
        s = client.completions.create(model="stories260K", prompt=f"Story number {i}: once upon a time",
                                      max_tokens=450, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        n = 0
        for c in s:
            n += 1
            time.sleep(0.002)
        return ("ok", n, time.time())
    except (openai.APIError, openai.APIConnectionError) as e:
        return ("error", str(e), time.time())


def test_kill_decode_worker_mid_stream(pd2):
    client = openai_client(pd2, timeout=60)
    names = {w["name"] for w in pd2.kv()["workers"]}
    assert {"decode-0", "decode-1", "prefill-0", "prefill-1"} <= names
    with cf.ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(stream_until_end, client, i) for i in range(8)]
        time.sleep(1.0)
        victim = pd2.worker_pids("decode-0")
        assert len(victim) == 1
        killed_at = time.time()
        os.kill(victim[0], signal.SIGKILL)
        results = [f.result(timeout=60) for f in futs]
    errors = [r for r in results if r[0] == "error"]
    assert errors, "no stream was on the killed worker"
    for _, msg, ended in errors:
        assert ended - killed_at < 5, f"a stream on the dead worker took {ended - killed_at:.1f}s to fail"
        assert msg
    deadline = time.time() + 10
    while "decode-0" in {w["name"] for w in pd2.kv()["workers"]}:
        assert time.time() < deadline, "scheduler still lists the killed worker"
        time.sleep(0.1)
    for i in range(6):
        r = client.completions.create(model="stories260K", prompt=f"After the crash {i}", max_tokens=8,
                                      temperature=0)
        assert r.usage.completion_tokens >= 1
    pd2.wait_idle()
