"""The OpenAI-compatible HTTP API, driven by the official openai SDK against real processes."""
import json
import urllib.request

import pytest

from conftest import openai_client, offline_generate

MODEL_ID = "stories260K"
PROMPT = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(params=["pd", "colocated"])
def cluster(request):
    c = request.getfixturevalue(request.param)
    before = c.wait_idle()["workers"]
    yield c
    after = c.wait_idle()["workers"]
    assert {w["name"]: w["free_blocks"] for w in after} == {w["name"]: w["free_blocks"] for w in before}


def test_models_health_ready(cluster):
    client = openai_client(cluster)
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert cluster.get("/health")[0] == 200
    assert cluster.get("/ready")[0] == 200


def test_completion_matches_offline_generate(cluster):
    client = openai_client(cluster)
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=40, temperature=0)
    ref = offline_generate(PROMPT, 40)
    assert r.choices[0].text == ref["text"]
    assert r.choices[0].finish_reason == ref["finish_reason"]
    assert r.usage.prompt_tokens == len(ref["prompt_token_ids"])
    assert r.usage.completion_tokens == len(ref["token_ids"])
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_streaming_completion_equals_non_streaming(cluster):
    client = openai_client(cluster)
    full = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_stream_and_not(cluster):
    client = openai_client(cluster)
    msgs = [{"role": "system", "content": "You tell short stories."},
            {"role": "user", "content": "Tell me about a cat."}]
    full = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=25, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model=MODEL_ID, messages=msgs, max_tokens=25, temperature=0,
                                            stream=True)
    parts = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(parts) == full.choices[0].message.content


def test_n_choices_with_seed(cluster):
    client = openai_client(cluster)
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=1.0, n=4, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    again = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=20, temperature=1.0, n=4, seed=7)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    assert len({c.text for c in r.choices}) > 1  # different seeds per choice
    assert r.usage.completion_tokens >= 4


def test_logprobs(cluster):
    client = openai_client(cluster)
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for tok, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0
        assert len(top) == 3
        assert max(top.values()) == pytest.approx(logprob, abs=1e-5)  # greedy picks the top token
    chat = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_stop_strings(cluster):
    client = openai_client(cluster)
    ref = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=60, temperature=0).choices[0].text
    words = ref.split()
    assert len(words) > 4, ref
    stop = " " + words[3]
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == ref[:ref.index(stop)]
    s = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop],
                                  stream=True)
    assert "".join(c.choices[0].text for c in s if c.choices) == ref[:ref.index(stop)]


def test_tokenize_detokenize(cluster):
    def post(path, body):
        req = urllib.request.Request(cluster.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    t = post("/tokenize", {"model": MODEL_ID, "prompt": PROMPT})
    assert t["count"] == len(t["tokens"]) and t["tokens"][0] == 1  # BOS
    assert t["max_model_len"] == 512
    d = post("/detokenize", {"model": MODEL_ID, "tokens": t["tokens"][1:]})
    assert d["prompt"] == PROMPT


def test_client_disconnect_mid_stream_frees_blocks(cluster):
    client = openai_client(cluster)
    stream = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=400, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    got = 0
    for _ in stream:
        got += 1
        if got == 5:
            break
    stream.close()  # drops the connection: the server must cancel and free the blocks at once
    cluster.wait_idle(timeout=5)
    r = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.choices[0].text
