"""Bad input gets an OpenAI-style error with the right status, and the server then still serves."""
import http.client
import json

import pytest

from conftest import openai_client

MODEL_ID = "stories260K"


def raw(cluster, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def post(cluster, path, obj):
    return raw(cluster, "POST", path, json.dumps(obj).encode())


def assert_served(cluster):
    r = openai_client(cluster).completions.create(model=MODEL_ID, prompt="Hello", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens >= 1


def assert_error(status, data, want_status, want_param=None):
    assert status == want_status, data
    err = json.loads(data)["error"]
    assert err["message"] and err["type"]
    if want_param is not None:
        assert err["param"] == want_param, err


BAD_COMPLETIONS = [
    ({"model": MODEL_ID, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL_ID, "prompt": "x", "max_tokens": 10**9}, 400, None),
    ({"model": MODEL_ID, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL_ID, "prompt": "x", "n": 100000}, 400, "n"),
    ({"model": MODEL_ID, "prompt": "x " * 3000, "max_tokens": 5}, 400, None),
    ({"model": MODEL_ID, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL_ID, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL_ID, "prompt": "x", "logprobs": 50}, 400, None),
    ({"model": MODEL_ID, "prompt": 12}, 400, "prompt"),
    ({"model": MODEL_ID}, 400, None),
    ({"model": "no-such-model", "prompt": "x"}, 404, None),
    ({"model": MODEL_ID, "prompt": "x", "best_of": 3}, 400, None),
    ({"model": MODEL_ID, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
]


@pytest.mark.parametrize("body,status,param", BAD_COMPLETIONS)
def test_bad_completions(pd, no_leaks, body, status, param):
    s, _, data = post(pd, "/v1/completions", body)
    assert_error(s, data, status, param)
    assert_served(pd)


BAD_CHAT = [
    {"model": MODEL_ID, "messages": []},
    {"model": MODEL_ID, "messages": "hello"},
    {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]},
    {"model": MODEL_ID, "messages": [{"role": "user"}]},
    {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
]


@pytest.mark.parametrize("body", BAD_CHAT)
def test_bad_chat(pd, no_leaks, body):
    s, _, data = post(pd, "/v1/chat/completions", body)
    assert_error(s, data, 400)
    assert_served(pd)


def test_invalid_json(pd, no_leaks):
    s, _, data = raw(pd, "POST", "/v1/completions", b'{"model": "stories260K", "prompt": ')
    assert_error(s, data, 400)
    assert_served(pd)


def test_huge_body_is_413(pd, no_leaks):
    body = b'{"prompt": "' + b"a" * (100 << 20) + b'"}'
    try:
        s, _, data = raw(pd, "POST", "/v1/completions", body)
        assert_error(s, data, 413)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may answer 413 and close before the client finished sending
    s, _, data = raw(pd, "POST", "/v1/completions", b"", {"Content-Type": "application/json",
                                                          "Content-Length": str(100 << 20)})
    assert_error(s, data, 413)
    assert_served(pd)


def test_unknown_route_and_method(pd):
    s, _, data = raw(pd, "GET", "/v1/nothing-here")
    assert_error(s, data, 404)
    s, _, data = raw(pd, "GET", "/v1/completions")
    assert s == 405
    assert_served(pd)
