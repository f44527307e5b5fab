"""The error contract: each status with its exact shape, checked before any SSE byte; nothing a client sends is a 500."""

from __future__ import annotations

import time
from unittest.mock import ANY

import httpx
import openai
import pytest
from serve_fixtures import live_server

from nanoseek.serve.registry import EngineSettings

KEY, ADMIN_KEY = "sk-test-key", "sk-admin-key"
HELLO = [{"role": "user", "content": "hi"}]
CONTEXT = 4096


@pytest.fixture(scope="module")
def server():
    engine = EngineSettings(max_model_len=CONTEXT, max_num_seqs=2, max_queued_requests=0)
    with live_server(engine=engine, api_keys=[KEY], admin_api_keys=[ADMIN_KEY], max_body_bytes=64 << 10) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield client


def assert_error(response: httpx.Response, status: int, type: str, param: str | None = ANY, message: str = ""):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert (error["type"], error["param"], error["code"]) == (type, param, status)
    assert message in error["message"] and error["message"]
    return error


def test_bad_parameters_are_400_with_the_field_named(http):
    response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "temperature": -1})
    assert_error(response, 400, "invalid_request_error", "temperature", "greater than or equal to 0")
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "stop": [""]})
    assert_error(response, 400, "invalid_request_error", None, "stop strings must not be empty")
    response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": HELLO, "n": 3})
    assert_error(response, 400, "invalid_request_error", "n", "n=3 is more than the 2 sequences")
    # More prompts x n than the model ever holds at once (2 running + 0 queued): a 503 would ask for
    # a retry that can never succeed (found by the schemathesis test).
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "max_tokens": 1})
    assert_error(response, 400, "invalid_request_error", "prompt", "3 prompt(s) x n=1 is 3 sequences, more than the 2")


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_over_the_context_is_400_before_streaming(http, stream):
    long = [{"role": "user", "content": "1 2 3 4 5 " * 1000}]
    response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": long, "stream": stream})
    error = assert_error(response, 400, "invalid_request_error", "messages")
    assert error["message"].startswith(f"This model's maximum context length is {CONTEXT} tokens. However, your "
                                       "request has ")
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": CONTEXT, "stream": stream})
    assert_error(response, 400, "invalid_request_error", "max_tokens", f"'max_tokens' or 'max_completion_tokens' is "
                 f"too large: {CONTEXT}. This model's maximum context length is {CONTEXT} tokens")


def test_the_openai_client_raises_its_own_error_types(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=CONTEXT + 1, stream=True)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_missing_or_wrong_api_key_is_401_and_health_stays_open(server, http):
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}]:
        response = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "tiny", "messages": HELLO},
                              headers=headers)
        assert_error(response, 401, "authentication_error", None, "API key")
        assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert http.get("/v1/models").status_code == 200


def test_admin_endpoints_need_the_admin_key(http):
    response = http.post("/v1/models/script/unload")
    assert_error(response, 401, "authentication_error")
    response = http.post("/v1/models/script/load", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200 and response.json()["state"] == "loaded"


def test_unknown_model_and_route_are_404(http):
    response = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO})
    assert_error(response, 404, "not_found_error", "model", "gpt-4o")
    assert_error(http.get("/v1/models/gpt-4o"), 404, "not_found_error", "model")
    assert_error(http.get("/v1/nothing/here"), 404, "not_found_error")
    assert_error(http.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_a_body_over_the_limit_is_413(http):
    huge = {"model": "tiny", "messages": [{"role": "user", "content": "x" * (70 << 10)}]}
    assert_error(http.post("/v1/chat/completions", json=huge), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(70):
            yield b"x" * 1024

    assert_error(http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}),
                 413, "request_too_large")


def test_a_full_queue_is_503_with_retry_after(server, http):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as first, http.stream("POST", "/v1/completions", json=body) as second:
        assert first.status_code == second.status_code == 200
        response = http.post("/v1/completions", json={**body, "stream": False})
        assert_error(response, 503, "service_unavailable", None, "queue is full")
        assert response.headers["retry-after"] == "1"
        streamed = http.post("/v1/completions", json=body)
        assert_error(streamed, 503, "service_unavailable")
    deadline = time.monotonic() + 5  # the closed streams give their room back once the server sees them go
    while (status := http.post("/v1/completions", json={**body, "max_tokens": 2}).status_code) == 503:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert status == 200


INVALID_BODIES = [
    b"{not json",
    b"[]",
    b'"a string"',
    b"null",
    b'{"model": "tiny"}',
    b'{"model": "tiny", "messages": "hi"}',
    b'{"model": "tiny", "messages": [123]}',
    b'{"model": "tiny", "messages": [{}]}',
    b'{"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": null}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": -1}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 99999999999999999999999}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream_options": {}}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 10}}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop_token_ids": [100000]}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": []}}',
    b'{"model": "tiny", "prompt": []}',
    b'{"model": "tiny", "prompt": [1.5]}',
    b'{"model": "tiny", "prompt": [99999999]}',
    b'{"model": "tiny", "prompt": [-1]}',
    b'{"model": "tiny", "prompt": "x", "suffix": "y"}',
    b'{"model": "tiny", "prompt": "x", "best_of": 3}',
    b'{"model": "tiny", "prompt": "x", "echo": true, "logprobs": 1, "stream": true}',
    b'{"model": "tiny", "prompt": [99999999], "echo": true, "logprobs": 1}',
]


@pytest.mark.parametrize("body", INVALID_BODIES, ids=range(len(INVALID_BODIES)))
def test_malformed_requests_are_400_never_500(http, body):
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request_error")


def test_wrong_content_type_is_400(http):
    response = http.post("/v1/chat/completions", content=b"model=tiny", headers={"content-type": "text/plain"})
    assert_error(response, 400, "invalid_request_error")
