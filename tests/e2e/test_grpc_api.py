"""The public gRPC API through a stub generated from proto/cleave/v1 (at test time)."""
import importlib
import sys
import time

import grpc
import pytest

from conftest import ROOT, offline_generate

PROMPT = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    from grpc_tools import protoc
    out = tmp_path_factory.mktemp("stubs")
    rc = protoc.main(["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}",
                      str(ROOT / "proto/cleave/v1/generate.proto")])
    assert rc == 0
    sys.path.insert(0, str(out))
    return (importlib.import_module("cleave.v1.generate_pb2"),
            importlib.import_module("cleave.v1.generate_pb2_grpc"))


@pytest.fixture
def stub(pd, pb):
    channel = grpc.insecure_channel(pd.grpc_target)
    yield pb[1].GenerationStub(channel)
    channel.close()


def test_generate_stream_matches_offline(pd, pb, stub, no_leaks):
    req = pb[0].GenerateRequest(prompt=PROMPT, max_tokens=30, sampling=pb[0].SamplingOptions(temperature=0))
    responses = list(stub.Generate(req, timeout=30))
    ids = [t.token_id for r in responses for t in r.tokens]
    ref = offline_generate(PROMPT, 30)
    assert ids == ref["token_ids"]
    assert "".join(r.text for r in responses) == ref["text"]
    assert responses[0].request_id
    last = responses[-1]
    assert last.finish_reason in (pb[0].FINISH_REASON_STOP, pb[0].FINISH_REASON_LENGTH)
    assert last.completion_tokens == len(ids)


def test_cancel_mid_stream_frees_blocks(pd, pb, stub, no_leaks):
    # Repeated: a cancel once deadlocked the frontend's scheduler stream a few calls in.
    for _ in range(20):
        req = pb[0].GenerateRequest(prompt=PROMPT, max_tokens=400, ignore_eos=True,
                                    sampling=pb[0].SamplingOptions(temperature=0))
        call = stub.Generate(req, timeout=60)
        got = 0
        for r in call:
            got += len(r.tokens)
            if got >= 5:
                call.cancel()
                break
        assert call.code() == grpc.StatusCode.CANCELLED
        pd.wait_idle(timeout=5)


def test_invalid_argument_then_served(pd, pb, stub, no_leaks):
    bad = pb[0].GenerateRequest(prompt="x", max_tokens=-3)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(bad, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb[0].GenerateRequest(model="nope", prompt="x"), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    ok = list(stub.Generate(pb[0].GenerateRequest(prompt="Hi", max_tokens=3), timeout=10))
    assert sum(len(r.tokens) for r in ok) >= 1


def test_tokenize_detokenize_models(pd, pb, stub):
    t = stub.Tokenize(pb[0].TokenizeRequest(text=PROMPT, add_special_tokens=True), timeout=10)
    assert t.count == len(t.tokens) and t.tokens[0] == 1
    d = stub.Detokenize(pb[0].DetokenizeRequest(tokens=list(t.tokens)[1:]), timeout=10)
    assert d.text == PROMPT
    m = stub.ListModels(pb[0].ListModelsRequest(), timeout=10)
    assert [x.id for x in m.models] == ["stories260K"]


def test_health_and_reflection(pd):
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: F401  (grpcio-health-checking)
    channel = grpc.insecure_channel(pd.grpc_target)
    h = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    h = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="cleave.v1.Generation"), timeout=5)
    assert h.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=5))
    names = {s.name for s in resp.list_services_response.service}
    assert {"cleave.v1.Generation", "grpc.health.v1.Health"} <= names
    channel.close()
