"""Greedy output is identical, token for token, offline (`cleave generate`), colocated and P/D,
for 64 concurrent requests of mixed prompt and output lengths, some sharing long prefixes,
streamed and not."""
import concurrent.futures as cf
import random

import pytest

from conftest import grpc_generate_all, offline_generate
from test_grpc_api import pb  # noqa: F401  (fixture)

WORDS = ("the cat dog sun tree ran jumped happy little big red ball girl boy park mom said "
         "played found friend day sky blue water went home").split()
SHARED = ("Once upon a time, in a small town by the sea, there lived a little girl named Lily who "
          "loved to play in the park with her friends every day after school. ")


def make_prompts():
    rng = random.Random(1234)
    prompts = []
    for i in range(64):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
        prompt = (SHARED * rng.randint(1, 3) + body) if i % 3 == 0 else body.capitalize()
        prompts.append((prompt, rng.choice([1, 4, 16, 48, 96])))
    return prompts


PROMPTS = make_prompts()


@pytest.fixture(scope="module")
def reference():
    with cf.ThreadPoolExecutor(2) as ex:
        return list(ex.map(lambda pm: offline_generate(*pm)["token_ids"], PROMPTS))


def run_all(cluster, pbmod):
    return grpc_generate_all(cluster, pbmod, PROMPTS)


def run_http(cluster):
    """The same requests over the OpenAI API, half of them streamed; compares text."""
    from conftest import openai_client
    client = openai_client(cluster)

    def one(i):
        prompt, max_tokens = PROMPTS[i]
        if i % 2:
            s = client.completions.create(model="stories260K", prompt=prompt, max_tokens=max_tokens,
                                          temperature=0, stream=True)
            return "".join(c.choices[0].text for c in s if c.choices)
        return client.completions.create(model="stories260K", prompt=prompt, max_tokens=max_tokens,
                                         temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(64) as ex:
        return list(ex.map(one, range(len(PROMPTS))))


@pytest.mark.parametrize("mode", ["pd", "colocated"])
def test_greedy_identical_to_offline(request, mode, reference, pb):  # noqa: F811
    cluster = request.getfixturevalue(mode)
    before = cluster.wait_idle()
    got = run_all(cluster, pb)
    for i, (ref, out) in enumerate(zip(reference, got)):
        assert out == ref, f"request {i} ({mode}) diverged: prompt={PROMPTS[i][0]!r}"
    texts = run_http(cluster)
    ref_texts = run_all(cluster, pb)  # second pass hits the prefix cache; must not change anything
    assert ref_texts == got
    after = cluster.wait_idle()
    assert [w["free_blocks"] for w in after["workers"]] == [w["free_blocks"] for w in before["workers"]]
    assert all(isinstance(t, str) for t in texts) and len(texts) == len(PROMPTS)
    stats = cluster.kv()
    assert stats.get("prefix_cache_hit_tokens", 0) > 0


def test_http_text_identical_to_offline(pd):
    ref = [offline_generate(*PROMPTS[i])["text"] for i in range(0, 64, 4)]
    texts = run_http(pd)
    assert [texts[i] for i in range(0, 64, 4)] == ref
