"""Content review: list files and hooks; refused inputs are a 400, filtered output ends with content_filter."""

from __future__ import annotations

import httpx
import openai
import pytest
from serve_fixtures import live_server

from nanoseek.serve.moderation import ModerationError, Moderator, load_filter

HELLO = [{"role": "user", "content": "Add 4 and 5."}]


def flag_total(text: str) -> str | None:
    """An output hook for the server test: the script model's answer mentions a total."""
    return "mentions a total" if "total" in text else None


def failing_hook(text: str) -> None:
    raise RuntimeError("the review service is down")


@pytest.fixture(scope="module")
def word_list(tmp_path_factory):
    path = tmp_path_factory.mktemp("moderation") / "banned.txt"
    path.write_text("# banned words\nforbidden\nbad phrase\n\nre:secret\\d+\n", encoding="utf-8")
    return path


def test_list_filters_match_words_case_insensitively_and_regexes(word_list):
    check = load_filter(str(word_list))
    assert check("This is FORBIDDEN.") == "matched 'forbidden' of banned.txt"
    assert check("a Bad Phrase here") and check("code secret42") and check("secret7!")
    assert check("forbiddenness is fine") is None and check("secret") is None and check("bad  phrase") is None


def test_hooks_and_bad_specs(tmp_path):
    assert load_filter("test_serve_moderation:flag_total")("the total") == "mentions a total"
    assert load_filter("test_serve_moderation:failing_hook")("anything") == (
        "the content filter test_serve_moderation:failing_hook failed")  # fails closed
    with pytest.raises(ModerationError, match="neither a file nor"):
        load_filter("no such file.txt")
    with pytest.raises(ModerationError, match="cannot load"):
        load_filter("test_serve_moderation:missing")
    bad = tmp_path / "bad.txt"
    bad.write_text("re:(unclosed\n")
    with pytest.raises(ModerationError, match="bad.txt:1: bad regular expression"):
        load_filter(str(bad))
    moderator = Moderator.from_specs(output_specs=["test_serve_moderation:flag_total"])
    assert moderator.review_input(["the total"]) is None and moderator.review_output("the total")


@pytest.fixture(scope="module")
def server(word_list):
    with live_server(input_filters=[str(word_list)], output_filters=["test_serve_moderation:flag_total"]) as running:
        yield running


def test_a_refused_input_is_a_400_with_a_clear_type(server):
    for path, body, param in [
        ("/v1/chat/completions", {"model": "script", "messages": [{"role": "user", "content": "Say FORBIDDEN"}]},
         "messages"),
        ("/v1/chat/completions", {"model": "script", "stream": True,
                                  "messages": [{"role": "system", "content": "secret12"}, *HELLO]}, "messages"),
        ("/v1/completions", {"model": "tiny", "prompt": ["fine", "the bad phrase"]}, "prompt"),
    ]:
        response = httpx.post(f"{server.url}{path}", json=body)
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["type"], error["param"], error["code"]) == ("content_policy_violation", param, 400)
        assert error["message"].startswith("the input was refused by the content filter")
    allowed = httpx.post(f"{server.url}/v1/chat/completions",
                         json={"model": "script", "messages": [{"role": "user", "content": "forbiddenness"}]})
    assert allowed.status_code == 200


def filtered_count(server) -> float:
    line = 'nanoseek:requests_total{model_name="script",outcome="content_filter"} '
    text = httpx.get(f"{server.url}/metrics").text
    return float(text.split(line)[1].split()[0]) if line in text else 0.0


def test_filtered_output_ends_with_content_filter(server):
    before = filtered_count(server)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="script", messages=HELLO)
    choice = reply.choices[0]
    assert choice.finish_reason == "content_filter"
    assert choice.message.content == "The" and choice.message.model_extra["reasoning_content"] == "First, count the numbers"
    content, finishes = "", []
    for chunk in client.chat.completions.create(model="script", messages=HELLO, stream=True):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            finishes.append(chunk.choices[0].finish_reason)
    assert content == "The" and finishes[-1] == "content_filter" and "total" not in content
    assert filtered_count(server) == before + 2
