"""The gRPC front end: streaming Generate and ListModels with the HTTP API's semantics and errors as status codes."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from serve_fixtures import ANSWER, REASONING, live_server, script_ids

from nanoseek.serve.proto import nanoseek_pb2 as pb
from nanoseek.serve.proto import nanoseek_pb2_grpc

KEY = "grpc-key"
PROTO_DIR = Path(__file__).parents[1] / "nanoseek" / "serve" / "proto"
HELLO = pb.Conversation(messages=[pb.ChatMessage(role="user", content="Add 4 and 5.")])


@pytest.fixture(scope="module")
def server():
    with live_server(grpc_port=0, api_keys=[KEY]) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.state.grpc_port}") as channel:
        yield nanoseek_pb2_grpc.GenerationStub(channel)


AUTH = [("authorization", f"Bearer {KEY}")]


def generate(stub, **fields) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**fields), metadata=AUTH, timeout=30))


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the stubs")
    package = tmp_path / "nanoseek" / "serve" / "proto"
    package.mkdir(parents=True)
    shutil.copy(PROTO_DIR / "nanoseek.proto", package)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", "nanoseek/serve/proto/nanoseek.proto"],
                   check=True, cwd=tmp_path)
    for name in ["nanoseek_pb2.py", "nanoseek_pb2.pyi", "nanoseek_pb2_grpc.py"]:
        assert filecmp.cmp(package / name, PROTO_DIR / name, shallow=False), f"regenerate {name} (see nanoseek.proto)"


def test_list_models(stub):
    models = {model.id: model for model in stub.ListModels(pb.ListModelsRequest(), metadata=AUTH).models}
    assert set(models) == {"tiny", "script"}
    assert models["tiny"].state == "loaded" and models["tiny"].max_model_len == 4096


def test_chat_streams_reasoning_and_content_then_usage(stub):
    responses = generate(stub, model="script", chat=HELLO, logprobs=1)
    *outputs, last = responses
    assert "".join(r.reasoning for r in outputs) == REASONING and "".join(r.text for r in outputs) == ANSWER
    assert outputs[-1].finish_reason == "stop" and all(not r.finish_reason for r in outputs[:-1])
    assert sum(len(r.token_ids) for r in outputs) == len(script_ids()) + 1
    assert all(len(r.logprobs) == len(r.token_ids) and all(len(e.top) == 1 for e in r.logprobs) for r in outputs)
    assert last.usage.completion_tokens == len(script_ids()) + 1 and last.usage.total_tokens > last.usage.completion_tokens
    thinking = generate(stub, model="script", chat=HELLO, thinking=True)
    assert "".join(r.reasoning for r in thinking) == REASONING


def test_prompt_matches_the_http_completion_with_the_same_seed(server, stub):
    fields = dict(model="tiny", prompt="12 + 30 =", max_tokens=16, temperature=0.9, seed=11)
    responses = generate(stub, n=2, **fields)
    texts = ["".join(r.text for r in responses if r.index == i and not r.HasField("usage")) for i in (0, 1)]
    http = httpx.post(f"{server.url}/v1/completions", json={**fields, "n": 2},
                      headers={"Authorization": f"Bearer {KEY}"}).json()
    assert texts == [choice["text"] for choice in http["choices"]]
    stopped = generate(stub, model="script", chat=HELLO, stop=[" is"])
    assert "".join(r.text for r in stopped) == "The total" and stopped[-2].stop_reason == " is"


@pytest.mark.parametrize("fields, code, message", [
    ({"model": "gpt-4o", "prompt": "hi"}, grpc.StatusCode.NOT_FOUND, "does not exist"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "maximum context length"),
    ({"model": "tiny", "chat": pb.Conversation()}, grpc.StatusCode.INVALID_ARGUMENT, "messages must not be empty"),
    ({"model": "tiny", "chat": pb.Conversation(messages=[pb.ChatMessage(role="tool", content="x")])},
     grpc.StatusCode.INVALID_ARGUMENT, "role"),
    ({"model": "tiny", "prompt": "hi", "n": 99}, grpc.StatusCode.INVALID_ARGUMENT, "n=99"),
    ({"model": "tiny", "prompt": "hi", "cache_salt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "cache_salt"),
])
def test_errors_map_to_status_codes(stub, fields, code, message):
    with pytest.raises(grpc.RpcError) as error:
        generate(stub, **fields)
    assert error.value.code() == code and message in error.value.details()


def test_a_missing_key_is_unauthenticated(stub):
    for metadata in [(), (("authorization", "Bearer wrong"),)]:
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(pb.GenerateRequest(model="tiny", prompt="hi"), metadata=metadata))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as error:
        stub.ListModels(pb.ListModelsRequest())
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cancelling_the_call_cancels_the_request(server, stub):
    call = stub.Generate(pb.GenerateRequest(model="tiny", prompt="hi", max_tokens=3000, ignore_eos=True),
                         metadata=AUTH)
    for _ in range(5):
        next(call)
    engine = server.state.manager.entries["tiny"].deployment.engine
    assert engine.stats.num_running == 1
    call.cancel()
    deadline = time.monotonic() + 5
    while engine.stats.num_running:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert engine.stats.generation_tokens < 3000
