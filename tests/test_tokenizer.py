"""Tokenizer: reserved ids, BPE training, round trips, streaming decode, chat template parity with transformers."""

from __future__ import annotations

import json

import pytest
from data_fixtures import CHINESE, ENGLISH, small_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerFast

from nanoseek.cli import main as cli_main
from nanoseek.data.tasks import task_corpus_text
from nanoseek.errors import TokenizerError
from nanoseek.tokenizer import MIN_VOCAB_SIZE, RESERVED_TOKENS, StreamDecoder, Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "你好"}],
    [
        {"role": "user", "content": "Compute 12+30."},
        {"role": "assistant", "content": "<think>\n2+0+0=2\n1+3+0=4\n</think>\n<answer>42</answer>"},
    ],
    [
        {"role": "system", "content": "You are exact."},
        {"role": "system", "content": "Show your steps."},
        {"role": "user", "content": "Compute 7+8."},
        {"role": "assistant", "content": "<think>\n7+8+0=15\n</think>\n<answer>15</answer>"},
        {"role": "user", "content": "计算9*9。"},
        {"role": "assistant", "content": "<think>\n9*9=81\n</think>\n<answer>81</answer>"},
        {"role": "user", "content": "And 1+1?"},
    ],
]

# The Qwen2.5 chat template without its tool-call branch: hub-style whitespace handling
# (trim_blocks / lstrip_blocks), `tojson`, a default system prompt, no generation markers.
CHATML_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return small_tokenizer()


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(saved):
    return PreTrainedTokenizerFast.from_pretrained(saved)


def test_reserved_tokens_have_fixed_ids(tokenizer):
    assert [tokenizer.id_to_token(i) for i in range(len(RESERVED_TOKENS))] == list(RESERVED_TOKENS)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2)
    assert tokenizer.vocab_size == 700
    # `<think>` is one token; the control tokens are skipped on request, the reasoning tags are not
    ids = tokenizer.encode("<｜User｜>hi<think>x</think><answer>1</answer><｜end▁of▁sentence｜>")
    assert ids[0] == 3 and ids[-1] == 1 and {6, 7, 8, 9} <= set(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi<think>x</think><answer>1</answer>"


def test_digits_are_single_tokens_and_text_is_compressed(tokenizer):
    ids = tokenizer.encode("x=31415926")
    assert [tokenizer.decode([i]) for i in ids[-8:]] == list("31415926")
    for text in (ENGLISH, CHINESE):
        assert (
            len(tokenizer.encode(text)) < len(text.encode("utf-8")) / 2
        )  # merges were learned for both scripts


def test_add_special_tokens_prepends_bos(tokenizer):
    assert tokenizer.encode("hi", add_special_tokens=True) == [0, *tokenizer.encode("hi")]


def test_training_is_deterministic(tmp_path):
    text = task_corpus_text(300, seed=1) + ENGLISH + CHINESE
    first = Tokenizer.train([text], vocab_size=600).backend.to_str()
    assert Tokenizer.train([text], vocab_size=600).backend.to_str() == first
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    for name in ("a", "b"):
        assert (
            cli_main(
                [
                    "tokenizer",
                    "train",
                    "--input",
                    str(corpus),
                    "--vocab-size",
                    "600",
                    "--out",
                    str(tmp_path / name),
                ]
            )
            == 0
        )
    for file in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: None, "no such file"),
        (lambda d: (d / "corpus.txt").write_bytes(b""), "empty"),
        (
            lambda d: (d / "corpus.txt").write_bytes(b"good line\nbad \xff\xfe line\n"),
            "corpus.txt:2: not valid UTF-8",
        ),
        (lambda d: (d / "corpus.txt").write_text("enough text", encoding="utf-8"), "too small"),
    ],
)
def test_cli_errors_are_one_line_and_leave_no_output(tmp_path, capsys, setup, message):
    setup(tmp_path)
    vocab = "100" if message == "too small" else "300"
    out = tmp_path / "out"
    code = cli_main(
        [
            "tokenizer",
            "train",
            "--input",
            str(tmp_path / "corpus.txt"),
            "--vocab-size",
            vocab,
            "--out",
            str(out),
        ]
    )
    error = capsys.readouterr().err
    assert code == 2 and message in error and "Traceback" not in error and error.count("\n") == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_vocab_and_corpus_errors():
    with pytest.raises(TokenizerError, match=f"at least {MIN_VOCAB_SIZE}"):
        Tokenizer.train(["abc"], vocab_size=MIN_VOCAB_SIZE - 1)
    with pytest.raises(TokenizerError, match="empty"):
        Tokenizer.train(["", "  \n"], vocab_size=MIN_VOCAB_SIZE)
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_pretrained("/nonexistent/tokenizer")


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_is_lossless(text):
    tokenizer = small_tokenizer()
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_stream_decoder_never_splits_a_character(text):
    tokenizer = small_tokenizer()
    ids = tokenizer.encode(text)
    decoder = StreamDecoder(tokenizer)
    deltas = [decoder.feed(token_id) for token_id in ids] + [decoder.flush()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in delta for delta in deltas)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.data())
def test_stream_decoder_feed_many_equals_feeding_one_at_a_time(text, data):
    """Ids fed in runs (an engine decoding a non-streamed request at the end, or mid-way) give the
    same text at every run boundary as feeding them one by one, incomplete characters held back."""
    tokenizer = small_tokenizer()
    ids = tokenizer.encode(text)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(ids)), max_size=3)))
    one, many = StreamDecoder(tokenizer), StreamDecoder(tokenizer)
    start, sent_one, sent_many = 0, "", ""
    for cut in [*cuts, len(ids)]:
        sent_one += "".join(one.feed(token_id) for token_id in ids[start:cut])
        sent_many += many.feed_many(ids[start:cut])
        assert sent_many == sent_one
        start = cut
    assert sent_many + many.flush() == sent_one + one.flush() == text


def test_stream_decoder_holds_back_partial_characters(tokenizer):
    ids = tokenizer.encode("a😀")  # the emoji is four byte tokens: nothing shows until the last one
    decoder = tokenizer.stream_decoder()
    assert [decoder.feed(token_id) for token_id in ids] == ["a", "", "", "", "😀"]
    decoder = tokenizer.stream_decoder(skip_special_tokens=True)
    assert "".join(decoder.feed(i) for i in [0, *tokenizer.encode("你好"), 1]) + decoder.flush() == "你好"


def test_stream_decoder_holding_bytes_that_never_form_a_character_stays_linear(tokenizer, monkeypatch):
    """A stream of bytes that never completes a character (a random-weights model's output) is held
    back with a bounded number of decodes per token: it used to walk back over every held token on
    each new one (cubic: serving 1,600 such tokens took 19 s against the engine's 1.2 s)."""
    continuation = tokenizer.encode("😀")[-1]  # a lone UTF-8 continuation byte: U+FFFD forever
    ids = [*tokenizer.encode("ab"), *[continuation] * 300]
    calls = []
    original = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    decoder = tokenizer.stream_decoder()
    deltas = [decoder.feed(token_id) for token_id in ids]
    assert len(calls) <= 3 * len(ids)
    assert "".join(deltas) + decoder.flush() == original(ids)


def test_matches_transformers_encoding(tokenizer, hf_tokenizer):
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 1, 2)
    assert len(hf_tokenizer) == tokenizer.vocab_size
    for text in (
        ENGLISH,
        CHINESE,
        "<think>\n1+1=2\n</think>\n<answer>2</answer>",
        "  spaces\n\nand 123 tabs\t",
    ):
        for special in (False, True):
            ids = tokenizer.encode(text, add_special_tokens=special)
            assert hf_tokenizer.encode(text, add_special_tokens=special) == ids
            assert hf_tokenizer.decode(ids, skip_special_tokens=True) == tokenizer.decode(
                ids, skip_special_tokens=True
            )


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize(
    "options", [{}, {"add_generation_prompt": True}, {"add_generation_prompt": True, "thinking": True}]
)
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, conversation, options):
    expected = hf_tokenizer.apply_chat_template(conversation, tokenize=False, **options)
    assert tokenizer.apply_chat_template(conversation, **options) == expected
    assert tokenizer.apply_chat_template(conversation, tokenize=True, **options) == hf_tokenizer.encode(
        expected, add_special_tokens=False
    )


@pytest.mark.parametrize(
    "conversation", [c for c in CONVERSATIONS if c[-1]["role"] == "assistant"] + [CONVERSATIONS[3][:-1]]
)
def test_assistant_mask_matches_transformers(tokenizer, hf_tokenizer, conversation):
    ids, mask = tokenizer.encode_chat(conversation)
    expected = hf_tokenizer.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert ids == expected["input_ids"] and mask == expected["assistant_masks"]


def test_r1_template_strips_earlier_reasoning_only(tokenizer):
    conversation = CONVERSATIONS[3][:-1]
    text = tokenizer.apply_chat_template(conversation)
    assert text.startswith(
        "<｜begin▁of▁sentence｜>You are exact.\n\nShow your steps.<｜User｜>Compute 7+8.<｜Assistant｜>"
    )
    assert "7+8+0=15" not in text and "<answer>15</answer><｜end▁of▁sentence｜>" in text
    assert text.endswith("<｜Assistant｜><think>\n9*9=81\n</think>\n<answer>81</answer><｜end▁of▁sentence｜>")
    ids, mask = tokenizer.encode_chat(conversation)
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert (
        trained
        == "\n<answer>15</answer><｜end▁of▁sentence｜><think>\n9*9=81\n</think>\n<answer>81</answer><｜end▁of▁sentence｜>"
    )


def test_generation_prompt_plus_reply_renders_the_conversation(tokenizer):
    conversation = CONVERSATIONS[2]
    prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True)
    assert prompt + conversation[-1]["content"] + "<｜end▁of▁sentence｜>" == tokenizer.apply_chat_template(
        conversation
    )


@pytest.fixture(scope="module")
def chatml_dir(tokenizer, tmp_path_factory):
    """A Qwen-style directory: extra added tokens, AddedToken dicts, no BOS, template in chat_template.jinja."""
    path = tmp_path_factory.mktemp("chatml")
    state = json.loads(tokenizer.backend.to_str())
    state["post_processor"] = None
    next_id = tokenizer.vocab_size
    for offset, content in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        state["added_tokens"].append(
            {
                "id": next_id + offset,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (path / "tokenizer.json").write_text(json.dumps(state), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "chat_template": "{{ 'overridden by chat_template.jinja' }}",
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (path / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    return path


def test_loads_a_qwen_style_directory_like_transformers(chatml_dir):
    ours = Tokenizer.from_pretrained(chatml_dir)
    theirs = PreTrainedTokenizerFast.from_pretrained(chatml_dir)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (None, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.vocab_size == len(theirs) == small_tokenizer().vocab_size + 3
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int", "说明": "和"}}}]
    for conversation in CONVERSATIONS:
        for options in ({}, {"add_generation_prompt": True}, {"tools": tools}):
            expected = theirs.apply_chat_template(conversation, tokenize=False, **options)
            assert ours.apply_chat_template(conversation, **options) == expected
    # no {% generation %} markers: the SFT mask falls back to the final assistant reply
    ids, mask = ours.encode_chat(CONVERSATIONS[2])
    assert (
        ours.decode([i for i, m in zip(ids, mask, strict=True) if m])
        == CONVERSATIONS[2][-1]["content"] + "<|im_end|>\n"
    )


def test_save_pretrained_round_trips_and_keeps_neighbour_files(tokenizer, chatml_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 4096
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == RESERVED_TOKENS[:3]
    reloaded = Tokenizer.from_pretrained(tmp_path)
    assert reloaded.encode(ENGLISH + CHINESE) == tokenizer.encode(ENGLISH + CHINESE)
    assert reloaded.apply_chat_template(CONVERSATIONS[3]) == tokenizer.apply_chat_template(CONVERSATIONS[3])
    chatml = Tokenizer.from_pretrained(chatml_dir)
    chatml.save_pretrained(tmp_path / "chatml")
    again = Tokenizer.from_pretrained(tmp_path / "chatml")
    assert again.chat_template == CHATML_TEMPLATE and again.eos_token == "<|im_end|>"


def test_template_errors_are_tokenizer_errors(tokenizer):
    with pytest.raises(TokenizerError, match="empty conversation"):
        tokenizer.apply_chat_template([])
    with pytest.raises(TokenizerError, match="does not compile"):
        Tokenizer(tokenizer.backend, dict(tokenizer.config), "{% if %}")


WHITESPACE_TEMPLATE = """{% for message in messages %}
    {% if message.role == 'system' %}{% continue %}{% endif %}
<{{ message.role }}>{{ message.content | trim }}
    {% if loop.index > 3 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<assistant>
{% endif %}
{{ messages | selectattr('role', 'equalto', 'user') | list | length }} {{ {'k': '中'} | tojson }}
"""


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_jinja_environment_matches_transformers(tokenizer, hf_tokenizer, conversation):
    """trim_blocks, lstrip_blocks, loop controls and the non-escaping tojson, as transformers sets them."""
    ours = Tokenizer(tokenizer.backend, dict(tokenizer.config), WHITESPACE_TEMPLATE)
    for generation_prompt in (False, True):
        expected = hf_tokenizer.apply_chat_template(
            conversation,
            chat_template=WHITESPACE_TEMPLATE,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        assert ours.apply_chat_template(conversation, add_generation_prompt=generation_prompt) == expected
