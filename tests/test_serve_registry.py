"""The model manager through its HTTP endpoints: load, switch and unload at run time, model roots, idle unload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time

import httpx
import pytest
from serve_fixtures import ANSWER, live_server, model_root

from nanoseek.cli import build_parser
from nanoseek.errors import NanoseekError
from nanoseek.serve.app import config_from_args, create_app
from nanoseek.serve.registry import in_own_thread

HELLO = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    with live_server() as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def states(http) -> dict[str, str]:
    return {card["id"]: card["state"] for card in http.get("/v1/models").json()["data"]}


def complete(http, model: str, max_tokens: int = 12) -> str:
    response = http.post("/v1/completions", json={"model": model, "prompt": "Once", "max_tokens": max_tokens, **GREEDY})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_checkpoints_outside_the_model_roots_are_refused(http, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(model_root() / "tiny", outside)
    escape = model_root() / "escape"
    escape.unlink(missing_ok=True)
    escape.symlink_to(outside, target_is_directory=True)
    for path in [str(outside), "escape", str(escape), "../", "tiny/../../", "/etc"]:
        response = http.post("/v1/models/evil/load", json={"path": path})
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"]["param"] == "path" and "outside the model roots" in response.json()["error"]["message"]
    (model_root() / "empty").mkdir(exist_ok=True)
    for path in ["empty", "no-such-dir"]:
        response = http.post("/v1/models/evil/load", json={"path": path})
        assert response.status_code == 400 and "no config.json" in response.json()["error"]["message"]
    assert "evil" not in states(http)
    response = http.post("/v1/models/bad name!/load", json={"path": "tiny"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"


def test_switch_and_unload_while_requests_are_in_flight(server, http):
    before = complete(http, "tiny", 20)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 400, "stream": True, **GREEDY,
            "stream_options": {"include_usage": True}}
    old_engine = server.state.manager.entries["tiny"].deployment.engine
    gate = threading.Event()  # holds the old engine between steps: its request stays in flight, however fast
    step = old_engine.step
    with http.stream("POST", "/v1/completions", json=body) as in_flight, contextlib.ExitStack() as opened:
        lines = in_flight.iter_lines()
        first = json.loads(next(lines)[len("data: "):])
        old_engine.step = lambda: gate.wait() and step()
        opened.callback(gate.set)  # even when an assertion below fails
        # other models come and go while "tiny" streams
        card = http.post("/v1/models/b/load", json={"path": "tiny-b"}).json()
        assert card["state"] == "loaded" and card["max_model_len"] == 4096
        other = complete(http, "b")
        assert http.post("/v1/models/b/unload").json()["state"] == "unloaded"
        assert http.post("/v1/models/script/switch", json={"path": "tiny-b"}).json()["state"] == "loaded"
        assert complete(http, "script") == other
        # and "tiny" itself is switched under its running request
        assert 'nanoseek:num_requests_running{model_name="tiny"} 1.0' in http.get("/metrics").text
        assert http.post("/v1/models/tiny/switch", json={"path": "tiny-b"}).json()["state"] == "loaded"
        assert complete(http, "tiny") == other != before[: len(other)]
        gate.set()
        events = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
    text = first["choices"][0]["text"] + "".join(event["choices"][0]["text"] for event in events if event["choices"])
    assert events[-1]["usage"]["completion_tokens"] == 400  # finished on the old engine, nothing dropped
    assert text.startswith(before)
    assert http.post("/v1/models/tiny/switch", json={"path": "tiny"}).status_code == 200
    assert complete(http, "tiny", 20) == before
    assert http.post("/v1/models/script/switch", json={"path": "script"}).status_code == 200


def test_an_unloaded_model_is_loaded_again_by_the_next_request(http):
    assert http.post("/v1/models/script/unload").json()["state"] == "unloaded"
    assert states(http)["script"] == "unloaded"
    reply = http.post("/v1/chat/completions", json={"model": "script", "messages": HELLO})
    assert reply.json()["choices"][0]["message"]["content"] == ANSWER
    assert states(http)["script"] == "loaded"
    assert http.post("/v1/models/nobody/unload").status_code == 404
    assert http.post("/v1/models/script/switch", json={}).status_code == 400


def test_idle_models_are_unloaded():
    with live_server(idle_unload=0.3) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert complete(http, "tiny")
        card = http.get("/v1/models/tiny").json()
        assert card["state"] == "loaded" and card["expires_at"] >= int(time.time()) - 1
        deadline = time.monotonic() + 10
        while states(http) != {"tiny": "unloaded", "script": "unloaded"}:
            assert time.monotonic() < deadline, states(http)
            time.sleep(0.05)
        assert complete(http, "tiny") and states(http)["tiny"] == "loaded"


def test_command_line_models_are_relative_to_the_working_directory(monkeypatch):
    monkeypatch.chdir(model_root().parent)
    args = build_parser("serve").parse_args(["serve", "--model", f"{model_root().name}/tiny", "--model",
                                             f"s={model_root().name}/script", "--thinking", "s", "--idle-unload", "5"])
    config = config_from_args(args)
    manager = create_app(config).state.server.manager
    assert {name: (entry.path, entry.thinking) for name, entry in manager.entries.items()} == {
        "tiny": (model_root() / "tiny", False), "s": (model_root() / "script", True)}
    assert manager.roots == [model_root() / "tiny", model_root() / "script"] and manager.idle_unload == 5


def test_speculative_settings_reach_the_engines_and_bad_ones_are_refused():
    args = build_parser("serve").parse_args(["serve", "--model", str(model_root() / "tiny"), "--speculative",
                                             "--num-speculative-tokens", "3"])
    manager = create_app(config_from_args(args)).state.server.manager
    engine = manager._build("tiny", model_root() / "tiny", thinking=False).engine
    try:
        assert engine.speculative == bool(len(engine.model.mtp)) and engine.num_speculative_tokens == 3
    finally:
        engine.close()
    args = build_parser("serve").parse_args(["serve", "--model", str(model_root() / "tiny"), "--num-speculative-tokens", "0"])
    with pytest.raises(NanoseekError, match="num-speculative-tokens must be >= 1"):
        config_from_args(args)


@pytest.mark.parametrize("flags, caching", [([], True), (["--no-prefix-caching"], False)])
def test_prefix_caching_flag_reaches_the_engines(flags, caching):
    args = build_parser("serve").parse_args(["serve", "--model", str(model_root() / "tiny"), *flags])
    engine = create_app(config_from_args(args)).state.server.manager._build("tiny", model_root() / "tiny", thinking=False).engine
    try:
        assert engine.prefix_caching is caching
    finally:
        engine.close()


def test_torch_work_outside_the_engines_runs_in_a_thread_that_ends():
    """Model builds and prompt log-probs run in a thread of their own that exits after (its OpenMP pool
    with it), not in a long-lived executor worker (see `in_own_thread`)."""
    seen = []

    def work(value):
        seen.append(threading.current_thread())
        return value * 2

    async def run():
        return await in_own_thread(work, 21)

    assert asyncio.run(run()) == 42
    seen[0].join(timeout=10)
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()
