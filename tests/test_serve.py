"""The OpenAI-compatible server through the official `openai` client: streaming, n, stop, usage, reasoning, logprobs, cancellation."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest
import torch
from data_fixtures import small_tokenizer
from serve_fixtures import ANSWER, REASONING, SCRIPT, live_server, script_ids

HELLO = [{"role": "user", "content": "Add 4 and 5."}]


@pytest.fixture(scope="module")
def server():
    with live_server() as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order (comments skipped)."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(selector)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# ----- models, health --------------------------------------------------------------------------------
def test_models_are_listed_with_their_state(client, server):
    cards = {model.id: model for model in client.models.list().data}
    assert set(cards) == {"tiny", "script"}
    assert cards["tiny"].model_extra["state"] == "loaded"
    assert cards["tiny"].model_extra["max_model_len"] == 4096
    assert client.models.retrieve("script").id == "script"
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "models": {"tiny": "loaded", "script": "loaded"}}


# ----- streaming and sampling ----------------------------------------------------------------------------
def test_streaming_joined_equals_non_streaming_with_the_same_seed(client):
    request = dict(model="tiny", messages=HELLO, temperature=1.0, top_p=0.9, seed=1234, max_tokens=24)
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and len(streamed) > 0
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"

    text_request = dict(model="tiny", prompt="12 + 30 =", temperature=0.8, seed=99, max_tokens=20)
    whole_text = client.completions.create(**text_request).choices[0].text
    streamed_text = "".join(c.choices[0].text for c in client.completions.create(**text_request, stream=True))
    assert streamed_text == whole_text


def test_stream_framing_role_first_usage_chunk_and_done_last(server):
    body = {"model": "script", "messages": HELLO, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    *content_chunks, usage_chunk = chunks
    assert all(chunk["usage"] is None for chunk in content_chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(script_ids()) + 1
    finish = content_chunks[-1]["choices"][0]
    assert finish["finish_reason"] == "stop" and finish["delta"] == {}
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in content_chunks[:-1])

    body.pop("stream_options")
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        chunks = [json.loads(event) for event in sse_events(response)[:-1]]
    assert all("usage" not in chunk for chunk in chunks) and all(chunk["choices"] for chunk in chunks)


def test_n_completions_have_distinct_indices_and_reproducible_samples(client, server):
    request = dict(model="tiny", prompt="Once upon a time", n=3, temperature=1.0, seed=5, max_tokens=12,
                   extra_body={"ignore_eos": True})
    first = client.completions.create(**request)
    assert sorted(choice.index for choice in first.choices) == [0, 1, 2]
    assert len({choice.text for choice in first.choices}) > 1  # each completion has its own random stream
    assert first.usage.completion_tokens == 3 * 12
    again = client.completions.create(**request)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]

    streamed: dict[int, str] = {0: "", 1: "", 2: ""}
    finished = set()
    for chunk in client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert [streamed[i] for i in range(3)] == [c.text for c in sorted(first.choices, key=lambda c: c.index)]

    chat = client.chat.completions.create(model="script", messages=HELLO, n=2)
    assert [c.message.content for c in chat.choices] == [ANSWER, ANSWER]
    assert chat.usage.completion_tokens == 2 * (len(script_ids()) + 1)


def test_a_seed_gives_the_same_output_whatever_shares_the_batch(client):
    request = dict(model="tiny", prompt="The quick brown fox", temperature=1.0, seed=42, max_tokens=16)
    alone = client.completions.create(**request).choices[0].text
    results = {}

    def busy(number: int) -> None:
        results[number] = client.completions.create(model="tiny", prompt="x" * number, max_tokens=16).choices[0].text

    neighbours = [threading.Thread(target=busy, args=(n,)) for n in range(1, 4)]
    for thread in neighbours:
        thread.start()
    together = client.completions.create(**request).choices[0].text
    for thread in neighbours:
        thread.join()
    assert together == alone and len(results) == 3


def test_stop_strings_end_the_text_before_them(client):
    reply = client.chat.completions.create(model="script", messages=HELLO, stop=[" is", "zzz"])
    choice = reply.choices[0]
    assert choice.message.content == "The total" and choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == " is"
    inside_reasoning = client.chat.completions.create(model="script", messages=HELLO, stop=" numbers").choices[0]
    assert inside_reasoning.message.model_extra["reasoning_content"] == "First, count the"
    assert inside_reasoning.message.content == ""


def test_usage_and_length_limit(client):
    prompt_ids = small_tokenizer().apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True)
    reply = client.chat.completions.create(model="script", messages=HELLO)
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(script_ids()) + 1  # the script, then EOS
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    short = client.chat.completions.create(model="script", messages=HELLO, max_completion_tokens=3, max_tokens=50)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].message.model_extra["reasoning_content"] == "Fir"


@pytest.mark.parametrize("thinking", [False, True])
def test_reasoning_content_is_separate_from_content(client, thinking):
    extra = {"chat_template_kwargs": {"thinking": thinking}}
    reply = client.chat.completions.create(model="script", messages=HELLO, extra_body=extra)
    message = reply.choices[0].message
    assert message.content == ANSWER and message.model_extra["reasoning_content"] == REASONING
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model="script", messages=HELLO, extra_body=extra, stream=True):
        delta = chunk.choices[0].delta
        reasoning += delta.model_extra.get("reasoning_content") or ""
        content += delta.content or ""
    assert (reasoning, content) == (REASONING, ANSWER)
    hidden = client.chat.completions.create(model="script", messages=HELLO, extra_body={**extra, "include_reasoning": False})
    assert hidden.choices[0].message.model_extra["reasoning_content"] is None
    assert hidden.choices[0].message.content == ANSWER


def test_text_completions_return_the_raw_text_and_exact_logprob_bytes(client):
    ids = script_ids()
    reply = client.completions.create(model="script", prompt="<｜Assistant｜>", max_tokens=len(ids), logprobs=2,
                                      temperature=0)
    choice = reply.choices[0]
    assert choice.text == SCRIPT and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids)
    assert "".join(choice.logprobs.tokens) == SCRIPT
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    assert all(logprob > -1e-3 for logprob in choice.logprobs.token_logprobs)  # the bigram model is certain
    assert choice.logprobs.text_offset[:3] == [0, len("<think>"), len("<think>F")]


def test_echo_with_logprobs_scores_the_prompt_as_lm_evaluation_harness_asks(client, server):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs=1, max_tokens=1, temperature 0): every
    prompt token comes back with its log-probability given the ones before it, the first with none."""
    from serve_fixtures import model_root

    from nanoseek import load_pretrained

    prompt = [3, 17, 42, 8, 99, 5, 23]
    reply = client.completions.create(model="tiny", prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(prompt) + 1 == reply.usage.total_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    with torch.no_grad():
        reference = load_pretrained(model_root() / "tiny")(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    expected = [float(reference[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    assert logprobs.token_logprobs[1:-1] == pytest.approx(expected, abs=1e-4)
    assert logprobs.token_logprobs[-1] == pytest.approx(float(reference[-1].max()), abs=1e-4)  # the greedy token
    assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert reply.choices[0].text.startswith(small_tokenizer().decode(prompt))  # echoed, then the new token


def test_chat_logprobs_cover_every_token(client):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, logprobs=True,
                                           top_logprobs=3, seed=0)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens == 10
    assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in entries)
    joined = b"".join(bytes(entry.bytes) for entry in entries).decode("utf-8", errors="replace")
    assert reply.choices[0].message.content in joined  # special tokens are skipped from the text only


def test_unknown_fields_are_accepted_and_ignored(client):
    extra = {"not_a_field": 1, "nested": {"x": [1, 2]}, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
             "stop_token_ids": [1], "ignore_eos": False}
    reply = client.chat.completions.create(model="script", messages=HELLO, extra_body=extra, user="u1")
    assert reply.choices[0].message.content == ANSWER


def test_every_response_has_a_request_id(server):
    for response in [
        httpx.get(f"{server.url}/health"),
        httpx.get(f"{server.url}/metrics"),
        httpx.get(f"{server.url}/no/such/route"),
        httpx.post(f"{server.url}/v1/chat/completions", json={"model": "nope", "messages": HELLO}),
        httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
    ]:
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    echoed = httpx.get(f"{server.url}/health", headers={"X-Request-Id": "trace-42"})
    assert echoed.headers["x-request-id"] == "trace-42"


def test_metrics_record_latencies_and_outcomes(client, server):
    before = metric(server, "nanoseek:requests_total", model_name="script", outcome="stop")
    client.chat.completions.create(model="script", messages=HELLO)
    assert metric(server, "nanoseek:requests_total", model_name="script", outcome="stop") == before + 1
    assert metric(server, "nanoseek:time_to_first_token_seconds_count", model_name="script") >= 1
    assert metric(server, "nanoseek:inter_token_latency_seconds_count", model_name="script") >= len(script_ids())
    assert metric(server, "nanoseek:generation_tokens_total", model_name="script") >= len(script_ids())
    text = httpx.get(f"{server.url}/metrics").text
    for name in ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "spec_decode_acceptance_rate",
                 "spec_decode_num_draft_tokens_total", "e2e_request_latency_seconds_bucket"]:
        assert f"nanoseek:{name}" in text


def test_a_repeated_conversation_is_served_from_the_prefix_cache(client, server):
    messages = [{"role": "system", "content": "You are a careful assistant who answers with one number. " * 4},
                *HELLO]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    hits = metric(server, "nanoseek:prefix_cache_hits_total", model_name="tiny")
    queries = metric(server, "nanoseek:prefix_cache_queries_total", model_name="tiny")
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    prompt = reply.usage.prompt_tokens
    assert metric(server, "nanoseek:prefix_cache_queries_total", model_name="tiny") == queries + prompt
    assert metric(server, "nanoseek:prefix_cache_hits_total", model_name="tiny") - hits >= prompt - 16
    assert again.choices[0].message.content == reply.choices[0].message.content
    hits = metric(server, "nanoseek:prefix_cache_hits_total", model_name="tiny")
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                   extra_body={"cache_salt": "tenant-b"})
    assert metric(server, "nanoseek:prefix_cache_hits_total", model_name="tiny") == hits  # another tenant's cache


# ----- cancellation --------------------------------------------------------------------------------
def wait_until_idle(server, model: str, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while metric(server, "nanoseek:num_requests_running", model_name=model) > 0:
        assert time.monotonic() - start < timeout, "the cancelled request is still running"
        time.sleep(0.02)
    return time.monotonic() - start


LONG = {"model": "tiny", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}


def test_a_disconnected_stream_stops_generating_and_frees_its_cache(server):
    cancelled = metric(server, "nanoseek:requests_total", model_name="tiny", outcome="cancelled")
    generated = metric(server, "nanoseek:generation_tokens_total", model_name="tiny")
    body = {**LONG, "messages": HELLO, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()  # kept referenced: a dropped iterator closes the connection
        for _ in range(10):
            next(lines)
        assert metric(server, "nanoseek:num_requests_running", model_name="tiny") == 1
    wait_until_idle(server, "tiny")
    assert metric(server, "nanoseek:kv_cache_usage_perc", model_name="tiny") == 0
    assert metric(server, "nanoseek:requests_total", model_name="tiny", outcome="cancelled") == cancelled + 1
    assert metric(server, "nanoseek:generation_tokens_total", model_name="tiny") - generated < 1000


def test_a_disconnected_non_streaming_request_is_cancelled(server):
    cancelled = metric(server, "nanoseek:requests_total", model_name="tiny", outcome="cancelled")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**LONG, "prompt": "Hello"}, timeout=0.5)
    wait_until_idle(server, "tiny")
    assert metric(server, "nanoseek:requests_total", model_name="tiny", outcome="cancelled") == cancelled + 1
