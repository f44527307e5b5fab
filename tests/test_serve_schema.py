"""Schema fuzzing: Schemathesis generates valid and invalid requests from /openapi.json; none may get a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from serve_fixtures import live_server

EXAMPLES = 15  # per operation and generation mode
MAX_TOKENS = 16  # generated bodies ask for up to the whole context; keep the generations short
OPERATIONS = [
    ("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/{name}"),
    ("POST", "/v1/models/{name}/load"), ("POST", "/v1/models/{name}/switch"), ("POST", "/v1/models/{name}/unload"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
]


def steer(body: dict, mode: GenerationMode) -> None:
    """Aim generated completion bodies at a served model; valid ones also past the checks for unsupported
    features, so that most of them generate (with short outputs)."""
    body["model"] = "tiny"
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        # absent or null, the default is the rest of the context: minutes of generation for one request
        body["max_tokens"] = MAX_TOKENS
    for field in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(field), int) and body[field] > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if mode is GenerationMode.POSITIVE:
        for field in ("logit_bias", "best_of", "suffix", "tools", "tool_choice", "response_format"):
            body.pop(field, None)
        if not body.get("stream"):
            body.pop("stream_options", None)
        if isinstance(body.get("n"), int):
            body["n"] = 1 + body["n"] % 2


@pytest.fixture(scope="module")
def schema():
    with live_server() as server:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


def test_the_schema_lists_every_operation(schema):
    assert sorted((op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()) == sorted(OPERATIONS)


# negative cases (bodies that break the schema) for every operation with a body; a path parameter accepts anything
CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    (method, path, GenerationMode.NEGATIVE) for method, path in OPERATIONS if method == "POST" and "unload" not in path]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_no_request_gets_a_server_error(schema, method, path, mode):
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case):
        if isinstance(case.body, dict) and path in ("/v1/chat/completions", "/v1/completions"):
            steer(case.body, mode)
        case.call_and_validate(checks=[not_a_server_error], timeout=60)

    call()
