"""What the HTTP and gRPC front ends share: requests become engine work, engine events become choice deltas.

    deployment = await manager.get(name)                      # 404, or loads the model on demand
    ids, opens_reasoning = chat_prompt(deployment, messages)  # 400 for a bad conversation
    check_context(deployment, len(ids), max_tokens)           # 400 with vLLM's messages
    generation = start_generation(deployment, [ids], params, n, ...)  # 503 when the queue is full
    async for delta in generation.deltas(): ...               # ChoiceDelta per engine event

A `Generation` splits each completion's text into reasoning and content (`ReasoningParser`), reviews
the output (`Moderator`), records latencies and the outcome (`ServerMetrics`), and on `close()` (also
when the consumer is cancelled, e.g. by a client that disconnected) cancels the engine request, which
frees its cache before the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import decoders

from nanoseek.errors import GenerationError, TokenizerError
from nanoseek.infer import RequestHandle, SamplingParams, StreamEvent
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.moderation import Moderator
from nanoseek.serve.protocol import ServeError
from nanoseek.serve.registry import Deployment, Lease, in_own_thread
from nanoseek.tokenizer import THINK_END, THINK_START, Tokenizer

OUTCOME_SEVERITY = ("stop", "length", "content_filter", "error")  # a request's outcome: its worst completion
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
RESERVED_TEMPLATE_KEYS = {"messages", "add_generation_prompt", "tokenize", "track"}


# ----- admission --------------------------------------------------------------------------------------
class ApiKeys:
    """Bearer keys. Comparisons are constant-time (fixed-size digests, every key compared every time)."""

    def __init__(self, keys: Sequence[str]):
        self.digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def __bool__(self) -> bool:
        return bool(self.digests)

    def accept(self, authorization: str) -> bool:
        """Whether an `Authorization` header value (`Bearer KEY`) holds one of the keys."""
        scheme, _, token = authorization.partition(" ")
        presented = hashlib.sha256((token.strip() if scheme.lower() == "bearer" else "").encode()).digest()
        return any([hmac.compare_digest(presented, digest) for digest in self.digests])


UNAUTHORIZED = "a valid API key is required: send `Authorization: Bearer <key>`"


# ----- building a request --------------------------------------------------------------------------
def review_input(moderator: Moderator, texts: Sequence[str], param: str) -> None:
    """A 400 of type `content_policy_violation` when an input filter flags any of `texts`."""
    reason = moderator.review_input(texts)
    if reason is not None:
        raise ServeError(400, f"the input was refused by the content filter ({reason})",
                         type="content_policy_violation", param=param)


@contextlib.contextmanager
def counted_refusals(metrics: ServerMetrics, deployment: Deployment) -> Iterator[None]:
    """Count requests refused before generating: `rejected` (503) or `invalid` (any other error)."""
    try:
        yield
    except ServeError as error:
        metrics.requests.labels(deployment.name, "rejected" if error.status == 503 else "invalid").inc()
        raise


def sampling_params(**fields: Any) -> SamplingParams:
    """`SamplingParams(**fields)` with the engine's validation turned into a 400."""
    try:
        return SamplingParams(**fields)
    except GenerationError as error:
        raise ServeError(400, str(error)) from None


def conversation(messages: Sequence[tuple[str, str | None]]) -> list[dict[str, str]]:
    """(role, text) pairs as the chat template's messages; `developer` is a system message (as OpenAI's)."""
    if not messages:
        raise ServeError(400, "messages must not be empty", param="messages")
    chat = []
    for number, (role, content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise ServeError(400, f"messages[{number}] has role {role!r}; use one of {', '.join(CHAT_ROLES)}",
                             param=f"messages.{number}.role")
        if content is None:
            raise ServeError(400, f"messages[{number}] has no content", param=f"messages.{number}.content")
        chat.append({"role": CHAT_ROLES[role], "content": content})
    return chat


def chat_prompt(deployment: Deployment, messages: Sequence[dict[str, str]],
                template_kwargs: dict[str, Any] | None = None) -> tuple[list[int], bool]:
    """Token ids of a conversation with the generation prompt, and whether the prompt opens the reasoning.

    The model's `thinking` default (prefill `<think>`) can be overridden per request with
    `{"thinking": bool}`; other template variables pass through to the chat template.
    """
    template_kwargs = dict(template_kwargs or {})
    clashes = RESERVED_TEMPLATE_KEYS & set(template_kwargs)
    if clashes:
        raise ServeError(400, f"chat_template_kwargs may not set {', '.join(sorted(clashes))}",
                         param="chat_template_kwargs")
    template_kwargs.setdefault("thinking", deployment.thinking)
    try:
        text = deployment.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
    except TokenizerError as error:
        raise ServeError(400, str(error), param="messages") from None
    return deployment.tokenizer.encode(text), _opens_reasoning(text)


def _opens_reasoning(prompt: str) -> bool:
    """Whether the prompt leaves the model inside an open `<think>` block (R1's template prefills one)."""
    return prompt.rfind(THINK_START) > prompt.rfind(THINK_END)


def text_prompt(deployment: Deployment, prompt: str | list[int]) -> list[int]:
    """Token ids of a completions prompt (text gets the tokenizer's BOS, as vLLM does)."""
    if isinstance(prompt, str):
        return deployment.tokenizer.encode(prompt, add_special_tokens=True)
    return list(prompt)


def check_context(deployment: Deployment, prompt_tokens: int, max_tokens: int | None,
                  prompt_param: str = "messages") -> None:
    """Refuse a prompt that leaves no room, or a max_tokens that does not fit (vLLM's exact messages)."""
    limit = deployment.max_model_len
    if prompt_tokens >= limit:
        raise ServeError(400, f"This model's maximum context length is {limit} tokens. However, your request "
                         f"has {prompt_tokens} input tokens. Please reduce the length of the input messages.",
                         param=prompt_param)
    if max_tokens is not None and prompt_tokens + max_tokens > limit:
        raise ServeError(400, f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                         f"maximum context length is {limit} tokens and your request has {prompt_tokens} input "
                         f"tokens ({max_tokens} > {limit} - {prompt_tokens}).", param="max_tokens")


# ----- reasoning -----------------------------------------------------------------------------------
class ReasoningParser:
    """Split a completion's streamed text into reasoning and content, as DeepSeek's API does.

    It starts inside the reasoning when the prompt opened `<think>` (the model then only closes it);
    otherwise in the content, where a `<think>` at the very start (after whitespace) opens it. The
    first `</think>` ends the reasoning. Tags are dropped; text that may be the start of a tag is held
    back until the next feed shows what it is.
    """

    def __init__(self, in_reasoning: bool):
        self.in_reasoning = in_reasoning
        self.at_start = True  # nothing emitted yet: a <think> here opens (or repeats) the reasoning
        self.closed = False  # </think> was seen: everything after is content
        self.held = ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """Add text; return (reasoning, content) that can be emitted now (everything if `final`)."""
        buffer, self.held = self.held + text, ""
        reasoning = content = ""
        if self.at_start and not self.closed:
            stripped = buffer.lstrip()
            if stripped.startswith(THINK_START):
                buffer, self.in_reasoning = stripped[len(THINK_START):], True
            elif THINK_START.startswith(stripped) and not final:
                self.held = buffer
                return "", ""
        if self.in_reasoning:
            end = buffer.find(THINK_END)
            if end >= 0:
                reasoning, buffer = buffer[:end], buffer[end + len(THINK_END):]
                self.in_reasoning, self.closed = False, True
            else:
                keep = 0 if final else _partial_suffix(buffer, THINK_END)
                reasoning, self.held = buffer[: len(buffer) - keep], buffer[len(buffer) - keep:]
                buffer = ""
        content = buffer
        self.at_start = self.at_start and not (reasoning or content)
        return reasoning, content


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


# ----- logprobs ------------------------------------------------------------------------------------
@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[chr(byte)] = byte
        else:
            characters[chr(256 + extra)] = byte
            extra += 1
    return characters


@functools.lru_cache(maxsize=1 << 16)
def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The exact bytes a token stands for (a byte-level token may hold part of a UTF-8 character)."""
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return b""
    alphabet = _byte_level_alphabet()
    byte_level = isinstance(tokenizer.backend.decoder, decoders.ByteLevel)
    if byte_level and token_id not in tokenizer.backend.get_added_tokens_decoder() and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return tokenizer.decode([token_id]).encode()


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


# ----- generation ----------------------------------------------------------------------------------
@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None only for the first token of a scored prompt
    top: dict[int, float] | None = None  # the most likely tokens, when asked for


async def prompt_logprobs(deployment: Deployment, prompt_ids: list[int], top_n: int) -> list[TokenLogprob]:
    """The prompt's tokens, each with its log-probability given the ones before it (echo + logprobs,
    lm-evaluation-harness's loglikelihood requests). One forward between engine steps, off the event loop."""
    try:
        token_ids, values, top = await in_own_thread(deployment.engine.prompt_logprobs, prompt_ids, top_n)
    except GenerationError as error:
        raise ServeError(400, str(error)) from None
    return [TokenLogprob(token, value, top[i] if top else None)
            for i, (token, value) in enumerate(zip(token_ids, values, strict=True))]


@dataclass
class ChoiceDelta:
    """New output of one choice (`index` counts across a batch of prompts: prompt * n + completion)."""

    index: int
    content: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | content_filter | error
    stop_reason: str | int | None = None
    error: str | None = None

    def extend(self, other: ChoiceDelta) -> None:
        """Append a later delta of the same choice (a non-streaming response joins them)."""
        self.content += other.content
        self.reasoning += other.reasoning
        self.token_ids += other.token_ids
        if other.logprobs is not None:
            self.logprobs = (self.logprobs or []) + other.logprobs
        if other.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.error = other.finish_reason, other.stop_reason, other.error


class _Choice:
    def __init__(self, parser: ReasoningParser | None):
        self.parser = parser
        self.text = ""  # everything generated so far (what output review sees)
        self.tokens = 0
        self.finish_reason: str | None = None
        self.last_output: float | None = None


class Generation:
    """A submitted request: one engine request per prompt, n completions each, as a stream of choice deltas.

    `reasoning`: None = no reasoning split (text completions); otherwise whether each completion
    starts inside the reasoning (see `ReasoningParser`).
    """

    def __init__(self, deployment: Deployment, lease: Lease, handles: list[RequestHandle], n: int,
                 prompt_tokens: int, *, metrics: ServerMetrics, moderator: Moderator, started: float,
                 reasoning: bool | None = None, include_reasoning: bool = True):
        self.deployment = deployment
        self.lease = lease
        self.handles = handles
        self.prompt_tokens = prompt_tokens
        self.metrics = metrics
        self.moderator = moderator
        self.started = started
        self.include_reasoning = include_reasoning
        self.choices = [_Choice(None if reasoning is None else ReasoningParser(reasoning))
                        for _ in range(n * len(handles))]
        self.first_token_at: float | None = None
        self._queue: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()
        self._pumps = [asyncio.create_task(self._pump(offset * n, handle)) for offset, handle in enumerate(handles)]
        self._closed = False

    @property
    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices)

    async def _pump(self, offset: int, handle: RequestHandle) -> None:
        async for event in handle:
            self._queue.put_nowait((offset, event))

    async def deltas(self, heartbeat: float | None = None) -> AsyncIterator[ChoiceDelta | None]:
        """Deltas until every choice has finished; None after `heartbeat` seconds without output.

        Leaving the loop early (or being cancelled) closes the generation.
        """
        try:
            while any(choice.finish_reason is None for choice in self.choices):
                try:
                    offset, event = await asyncio.wait_for(self._queue.get(), heartbeat)
                except asyncio.TimeoutError:
                    yield None
                    continue
                delta = self._process(offset + event.index, event)
                if delta is not None:
                    yield delta
        finally:
            self.close()

    async def collect(self) -> list[ChoiceDelta]:
        """Run to the end; one joined delta per choice."""
        joined = [ChoiceDelta(index) for index in range(len(self.choices))]
        async for delta in self.deltas():
            joined[delta.index].extend(delta)
        return joined

    def _process(self, index: int, event: StreamEvent) -> ChoiceDelta | None:
        choice = self.choices[index]
        if choice.finish_reason is not None:  # filtered earlier; the engine is still finishing it
            return None
        now = time.monotonic()
        name = self.deployment.name
        if event.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
                self.metrics.time_to_first_token.labels(name).observe(now - self.started)
            if choice.last_output is not None:
                self.metrics.inter_token_latency.labels(name).observe(now - choice.last_output)
            choice.last_output = now
            choice.tokens += len(event.token_ids)
        delta = ChoiceDelta(index, token_ids=list(event.token_ids))
        if event.logprobs is not None:
            tops = event.top_logprobs or [None] * len(event.logprobs)
            delta.logprobs = [TokenLogprob(token, logprob, top)
                              for token, logprob, top in zip(event.token_ids, event.logprobs, tops, strict=False)]
        if event.text and self.moderator.output_checks and self.moderator.review_output(choice.text + event.text):
            choice.finish_reason = delta.finish_reason = "content_filter"
            delta.logprobs = None
            return delta
        choice.text += event.text
        final = event.finish_reason is not None
        if choice.parser is None:
            delta.content = event.text
        else:
            delta.reasoning, delta.content = choice.parser.feed(event.text, final)
            if not self.include_reasoning:
                delta.reasoning = ""
        if final:
            reason = event.finish_reason
            if reason == "cancelled":  # not by this request: the engine was closed under it
                reason, event.error = "error", "the server cancelled the request (it is shutting down)"
            choice.finish_reason = delta.finish_reason = reason
            delta.stop_reason, delta.error = event.stop_reason, event.error
        return delta

    def close(self) -> None:
        """Cancel what is still generating, give back the queue room, count the outcome (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.cancel()
        for handle in self.handles:
            if not handle.finished:
                handle.cancel()
        self.lease.release()
        reasons = [choice.finish_reason for choice in self.choices]
        if None in reasons:
            outcome = "cancelled"
        else:
            outcome = max(reasons, key=lambda r: OUTCOME_SEVERITY.index(r) if r in OUTCOME_SEVERITY else 0)
        name = self.deployment.name
        self.metrics.requests.labels(name, outcome).inc()
        self.metrics.e2e_request_latency.labels(name).observe(time.monotonic() - self.started)


def start_generation(deployment: Deployment, prompts: list[list[int]], params: SamplingParams, n: int, *,
                     request_id: str, metrics: ServerMetrics, moderator: Moderator, started: float,
                     reasoning: bool | None = None, include_reasoning: bool = True) -> Generation:
    """Submit one engine request per prompt (n completions each). 400 for what the engine refuses, 503 when full."""
    engine = deployment.engine
    if n > engine.max_num_seqs:
        raise ServeError(400, f"n={n} is more than the {engine.max_num_seqs} sequences this server decodes "
                         "together", param="n")
    lease = deployment.reserve(len(prompts), n)
    handles: list[RequestHandle] = []
    try:
        for number, ids in enumerate(prompts):
            handles.append(engine.submit(ids, params, n, request_id=f"{request_id}-{number}"))
    except GenerationError as error:
        for handle in handles:
            handle.cancel()
        lease.release()
        raise ServeError(400, str(error)) from None
    return Generation(deployment, lease, handles, n, sum(len(ids) for ids in prompts), metrics=metrics,
                      moderator=moderator, started=started, reasoning=reasoning,
                      include_reasoning=include_reasoning)
