"""Byte-level BPE tokenizer with DeepSeek-R1 special tokens, a chat template and streaming decode.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the Rust BPE) and reads and writes the same
`tokenizer.json` + `tokenizer_config.json` directory that transformers, vLLM and llama.cpp read, so a
DeepSeek or Qwen tokenizer directory loads here and ours loads there. Chat templates are rendered with
the Jinja environment transformers uses, so `apply_chat_template` gives the same string.

Our own tokenizers reserve fixed ids (the model configs use bos_token_id=0, eos_token_id=1):

    0 <｜begin▁of▁sentence｜>  1 <｜end▁of▁sentence｜>  2 <｜▁pad▁｜>  3 <｜User｜>  4 <｜Assistant｜>
    5 <｜System｜>  6 <think>  7 </think>  8 <answer>  9 </answer>

then the 256 byte symbols, then the learned merges. Digits are always split one per token, because
column-wise arithmetic needs digit-aligned tokens; runs of CJK characters are pre-split from Latin text
as in DeepSeek-V3's pre-tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from nanoseek.errors import TokenizerError
from nanoseek.io import atomic_directory, atomic_write_text

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SYSTEM = "<｜System｜>"
THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"
# Control tokens: `decode(..., skip_special_tokens=True)` drops them.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, SYSTEM)
# Single tokens that stay in decoded text (as in DeepSeek-R1), so answer checkers can see them.
REASONING_TOKENS = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)
RESERVED_TOKENS = SPECIAL_TOKENS + REASONING_TOKENS
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(RESERVED_TOKENS)
DEFAULT_VOCAB_SIZE = 32000
DEFAULT_MODEL_MAX_LENGTH = 4096

# Han, Hiragana and Katakana runs are split from everything else (DeepSeek-V3 does the same).
CJK_PATTERN = r"[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
# GPT-4 style word split, except that numbers were already split into single digits.
WORD_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# DeepSeek-R1 style: system text right after BOS, `<｜User｜>` / `<｜Assistant｜>` turns, every assistant
# turn ends with EOS, and the reasoning of assistant turns before the last user turn is dropped (R1 keeps
# only what follows `</think>`). `{% generation %}` marks the tokens an SFT loss trains on (the same
# marker transformers reads for `return_assistant_tokens_mask`). `thinking=True` makes the generation
# prompt open the reasoning with `<think>\n`, as the R1 release does; by default a prompt plus its reply
# renders exactly like the conversation that contains the reply.
CHAT_TEMPLATE = r"""{%- set ns = namespace(system='', last_user=-1) -%}
{%- for message in messages -%}
{%- if message['role'] == 'system' -%}
{%- set ns.system = ns.system + ('\n\n' if ns.system else '') + message['content'] -%}
{%- elif message['role'] == 'user' -%}
{%- set ns.last_user = loop.index0 -%}
{%- endif -%}
{%- endfor -%}
{{- bos_token + ns.system -}}
{%- for message in messages -%}
{%- if message['role'] == 'user' -%}
{{- '<｜User｜>' + message['content'] -}}
{%- elif message['role'] == 'assistant' -%}
{%- set content = message['content'] -%}
{%- if loop.index0 < ns.last_user and '</think>' in content -%}
{%- set content = content.split('</think>')[-1] -%}
{%- endif -%}
{{- '<｜Assistant｜>' -}}
{%- generation -%}{{- content + eos_token -}}{%- endgeneration -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<｜Assistant｜>' -}}
{%- if thinking is defined and thinking -%}{{- '<think>\n' -}}{%- endif -%}
{%- endif -%}"""

_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Older names of a message's reasoning that transformers copies to `reasoning_content` and `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTracker(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: records the character spans of assistant text.

    The same tag and semantics as transformers' AssistantTracker; outside `track()` it renders its body
    unchanged, so templates that use it render identically everywhere.
    """

    tags = {"generation"}

    def __init__(self, environment: jinja2.Environment):
        super().__init__(environment)
        self.state = threading.local()  # one render per thread; a server renders from many threads

    @contextlib.contextmanager
    def track(self, blocks: list[str]) -> Iterator[list[tuple[int, int]]]:
        """While active, spans are offsets into the concatenation of `blocks` (the caller appends them)."""
        self.state.blocks, self.state.spans = blocks, []
        try:
            yield self.state.spans
        finally:
            self.state.blocks = None

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller: Any) -> str:
        text = caller()
        blocks = getattr(self.state, "blocks", None)
        if blocks is not None:
            start = sum(len(block) for block in blocks)
            self.state.spans.append((start, start + len(text)))
        return text


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return time.strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses (sandboxed, trim/lstrip blocks)."""
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(f"chat template does not compile: {error} (line {error.lineno})") from error


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"cannot read {path}: {error}") from error


def _byte_level_bpe() -> BackendTokenizer:
    """An untrained BPE with our pre-tokenizer (digits, CJK runs, words, then bytes) and BOS post-processor."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
            pre_tokenizers.Split(Regex(CJK_PATTERN), behavior="isolated"),
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, 0)]
    )
    return backend


class Tokenizer:
    """A `tokenizers` BPE plus the special tokens and chat template of its `tokenizer_config.json`."""

    def __init__(self, backend: BackendTokenizer, config: dict[str, Any], chat_template: str | None = None):
        self.backend = backend
        self.config = config
        self.chat_template = chat_template
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.pad_token = _token_content(config.get("pad_token"))
        self.unk_token = _token_content(config.get("unk_token"))
        self.model_max_length: int | None = config.get("model_max_length")
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = getattr(self, key)
            if token is not None and backend.token_to_id(token) is None:
                raise TokenizerError(f"{key} {token!r} of tokenizer_config.json is not in the vocabulary")
        self._compiled_template = compile_chat_template(chat_template) if chat_template else None

    # ----------------------------------------------------------------------------------------------- training
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        min_frequency: int = 2,
        model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    ) -> Tokenizer:
        """Train a byte-level BPE on `texts` (deterministic: the same texts give the same tokenizer)."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise TokenizerError(
                f"vocab size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
                f"({BYTE_ALPHABET_SIZE} bytes + {len(RESERVED_TOKENS)} reserved tokens)"
            )
        backend = _byte_level_bpe()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[AddedToken(token, special=True, normalized=False) for token in RESERVED_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        seen_text = False

        def checked(texts: Iterable[str]) -> Iterator[str]:
            nonlocal seen_text
            for text in texts:
                seen_text = seen_text or bool(text.strip())
                yield text

        backend.train_from_iterator(checked(texts), trainer=trainer)
        if not seen_text:
            raise TokenizerError("the training corpus is empty: give at least one file with some text")
        # The trainer registers every reserved token as special; the reasoning tags must survive
        # `skip_special_tokens`, so mark them as ordinary added tokens (their ids do not change).
        state = json.loads(backend.to_str())
        for token in state["added_tokens"]:
            token["special"] = token["content"] in SPECIAL_TOKENS
        backend = BackendTokenizer.from_str(json.dumps(state))
        for index, token in enumerate(RESERVED_TOKENS):
            assert backend.token_to_id(token) == index, "reserved tokens must keep their fixed ids"
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "unk_token": None,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        return cls(backend, config, CHAT_TEMPLATE)

    # -------------------------------------------------------------------------------------------- load / save
    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json).

        The chat template comes from `chat_template.jinja` if present (transformers >= 4.43 writes it),
        else from `chat_template.json`, else from the `chat_template` key of tokenizer_config.json.
        """
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise TokenizerError(f"{path} has no tokenizer.json: train one with `nanoseek tokenizer train`")
        try:
            backend = BackendTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as error:  # the Rust loader raises plain Exception
            raise TokenizerError(f"cannot load {path / 'tokenizer.json'}: {error}") from error
        config_path = path / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        chat_template = config.get("chat_template")
        if (path / "chat_template.json").is_file():
            chat_template = _read_json(path / "chat_template.json").get("chat_template")
        if (path / "chat_template.jinja").is_file():
            chat_template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(chat_template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {entry["name"]: entry["template"] for entry in chat_template}
            chat_template = named.get("default")
        tokenizer = cls(backend, config, chat_template)
        if "add_bos_token" in config or "add_eos_token" in config:
            tokenizer._set_post_processor(
                bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
            )
        return tokenizer

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """Rebuild what `add_special_tokens=True` adds, as transformers does for explicit add_bos/eos_token."""
        add_bos = add_bos and self.bos_token is not None
        add_eos = add_eos and self.eos_token is not None
        single = f"{self.bos_token}:0 " * add_bos + "$A:0" + f" {self.eos_token}:0" * add_eos
        pair = single + f" {self.bos_token}:1" * add_bos + " $B:1" + f" {self.eos_token}:1" * add_eos
        special = [(token, self.token_to_id(token)) for token in (self.bos_token, self.eos_token) if token]
        used = [(token, token_id) for token, token_id in special if token in single]
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=used
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into `path`, each file atomically.

        Files are replaced one by one (not the directory), so a tokenizer can be saved into a model
        checkpoint directory next to its weights.
        """
        path = Path(path)
        config = dict(self.config)
        config["chat_template"] = self.chat_template
        atomic_write_text(path / "tokenizer.json", self.backend.to_str(pretty=True))
        atomic_write_text(
            path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        (path / "chat_template.jinja").unlink(missing_ok=True)  # it would shadow the template just saved

    # --------------------------------------------------------------------------------------------- vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding table needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def special_ids(self) -> set[int]:
        """Ids of the control tokens that `skip_special_tokens=True` removes."""
        return {
            token_id for token_id, token in self.backend.get_added_tokens_decoder().items() if token.special
        }

    # ------------------------------------------------------------------------------------- encode / decode
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Added tokens written in the text (e.g. `<think>`) become their single id."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` over many texts, in parallel threads (the Rust side releases the GIL)."""
        return [
            encoding.ids
            for encoding in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        ]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------------ chat
    def _render(
        self, messages: Sequence[dict], add_generation_prompt: bool, track: bool, **kwargs: Any
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and, if `track`, the character spans inside `{% generation %}` blocks."""
        if self._compiled_template is None:
            raise TokenizerError(
                "this tokenizer has no chat template (tokenizer_config.json has no chat_template)"
            )
        if not messages:
            raise TokenizerError("cannot apply the chat template to an empty conversation")
        # As transformers does: drop None-valued keys, alias older names of the reasoning field.
        chat = []
        for message in messages:
            message = {key: value for key, value in message.items() if value is not None}
            reasoning = next((message[key] for key in _REASONING_FIELDS if key in message), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        special = {
            key: _token_content(self.config.get(key))
            for key in _SPECIAL_TOKEN_KEYS
            if self.config.get(key) is not None
        }
        variables = {**special, **kwargs, "messages": chat, "add_generation_prompt": add_generation_prompt}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            if not track:
                return self._compiled_template.render(**variables), []
            tracker = self._compiled_template.environment.extensions[_GenerationTracker.identifier]
            blocks: list[str] = []
            with tracker.track(blocks) as spans:
                for block in self._compiled_template.generate(**variables):
                    blocks.append(block)
            return "".join(blocks), spans
        except jinja2.TemplateError as error:
            raise TokenizerError(f"chat template failed: {error}") from error

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` ([{"role", "content"}, ...]) with the chat template; ids if `tokenize`.

        Extra keyword arguments are template variables (e.g. `thinking=True`), as in transformers.
        """
        text, _ = self._render(messages, add_generation_prompt, False, **kwargs)
        return self.encode(text) if tokenize else text

    def encode_chat(self, messages: Sequence[dict], **kwargs: Any) -> tuple[list[int], list[int]]:
        """Token ids of a rendered conversation and a 0/1 mask of the assistant tokens an SFT loss trains on.

        With a template that marks replies with `{% generation %}` (ours does), every assistant reply
        (with its EOS) is in the mask. Other templates (most hub templates) fall back to training on the
        final assistant message only: the tokens after the rendered prompt with a generation prompt.
        """
        text, spans = self._render(messages, False, True, **kwargs)
        if not spans:
            if messages[-1].get("role") != "assistant":
                raise TokenizerError("an SFT conversation must end with an assistant message")
            prompt, _ = self._render(messages[:-1], True, False, **kwargs)
            if not text.startswith(prompt):
                raise TokenizerError(
                    "the chat template renders the prompt differently from the full conversation; "
                    "add {% generation %} markers to it to train on assistant replies"
                )
            spans = [(len(prompt), len(text))]
        encoding = self.backend.encode(text, add_special_tokens=False)
        mask = [
            int(any(start <= token_start < end for start, end in spans))
            for token_start, _ in encoding.offsets
        ]
        return encoding.ids, mask


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get the new text, never half a character.

    Byte-level tokens can end inside a multi-byte UTF-8 character; decoding such a prefix yields
    U+FFFD, so that text is held back until the character is complete. Each step decodes a short
    window that starts one emitted segment back, so decoders that treat the first token of a string
    specially (SentencePiece's leading space) see the same context as a full decode. The concatenation
    of everything `feed` and `flush` return equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # ids up to here have been emitted as text
        # Ends in (read_offset, held_back] are known to decode to text ending in U+FFFD (they stay so as
        # ids are appended), so a stream of bytes that never forms a character (a random-weights model)
        # costs one more decode per token, not a walk back over everything held.
        self.held_back = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, token_id: int) -> str:
        """Add one token id; return the text it completes (often "", while a character is pending)."""
        return self.feed_many((token_id,))

    def feed_many(self, token_ids: Sequence[int]) -> str:
        """Add several ids; return the text they complete, as feeding them one at a time would have, in
        one decode (plus one more per token of a character still incomplete at the end)."""
        self.ids.extend(token_ids)
        end, floor = len(self.ids), max(self.read_offset, self.held_back)
        while end > floor:  # the longest window whose text does not end inside a character
            text = self._decode(self.ids[self.prefix_offset : end])
            if not text.endswith("\ufffd"):
                break
            end -= 1
        else:
            self.held_back = len(self.ids)
            return ""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        if len(text) <= len(emitted):
            return ""
        self.prefix_offset, self.read_offset, self.held_back = self.read_offset, end, 0
        return text[len(emitted) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end of the stream decodes as U+FFFD)."""
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        self.held_back = 0
        return text[len(emitted) :]


# --------------------------------------------------------------------------------------------------- CLI
@dataclass
class TrainReport:
    vocab_size: int
    documents: int
    characters: int
    seconds: float


def train_tokenizer(
    inputs: Sequence[str | Path],
    out: str | Path,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    text_field: str = "text",
    from_tasks: int = 0,
    seed: int = 0,
    min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> TrainReport:
    """Train on text files (.txt/.jsonl/.parquet) and/or generated task text; write `out` atomically."""
    from nanoseek.data.corpus import read_documents
    from nanoseek.data.tasks import task_documents

    if not inputs and not from_tasks:
        raise TokenizerError("nothing to train on: give --input files and/or --from-tasks N")
    if vocab_size < MIN_VOCAB_SIZE:  # checked before reading a possibly large corpus
        raise TokenizerError(f"vocab size {vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE}")
    counts = {"documents": 0, "characters": 0}

    def texts() -> Iterator[str]:
        sources = [read_documents(inputs, text_field=text_field)] if inputs else []
        if from_tasks:
            sources.append(iter(task_documents(from_tasks, seed=seed)))
        for source in sources:
            for text in source:
                counts["documents"] += 1
                counts["characters"] += len(text)
                yield text

    start = time.perf_counter()
    tokenizer = Tokenizer.train(
        texts(), vocab_size, min_frequency=min_frequency, model_max_length=model_max_length
    )
    seconds = time.perf_counter() - start
    with atomic_directory(out) as temp:
        tokenizer.save_pretrained(temp)
    return TrainReport(tokenizer.vocab_size, counts["documents"], counts["characters"], seconds)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="tokenizer_command", metavar="subcommand", required=True)
    train = commands.add_parser(
        "train", help="train a byte-level BPE tokenizer", description=train_tokenizer.__doc__
    )
    train.add_argument(
        "--input", nargs="*", default=[], metavar="FILE", help=".txt, .jsonl or .parquet files"
    )
    train.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    train.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    train.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet rows")
    train.add_argument(
        "--from-tasks", type=int, default=0, metavar="N", help="also train on N generated task documents"
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the generated task documents")
    train.add_argument("--min-frequency", type=int, default=2, help="minimum count of a pair to be merged")
    train.add_argument("--model-max-length", type=int, default=DEFAULT_MODEL_MAX_LENGTH)


def cli_main(args: argparse.Namespace) -> int:
    report = train_tokenizer(
        args.input,
        args.out,
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        from_tasks=args.from_tasks,
        seed=args.seed,
        min_frequency=args.min_frequency,
        model_max_length=args.model_max_length,
    )
    print(
        f"trained a {report.vocab_size}-token tokenizer on {report.documents} documents "
        f"({report.characters} characters) in {report.seconds:.2f} s -> {args.out}"
    )
    if report.vocab_size < args.vocab_size:
        print(
            f"(asked for {args.vocab_size}: no pair in this corpus occurs --min-frequency times to merge further)"
        )
    return 0
