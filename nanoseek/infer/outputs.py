"""What the engine hands back: stream events, finished completions, requests, finish reasons."""

from __future__ import annotations

from dataclasses import dataclass

FINISH_STOP = "stop"  # EOS, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_tokens or the context length
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"  # the engine failed while the request ran (the message is in `error`)


@dataclass
class StreamEvent:
    """New output of one completion since its last event (a server turns it into one SSE chunk).

    `text` never ends inside a UTF-8 character and never contains a stop string (text that could be
    the start of one is held back until it cannot). With speculative decoding one event can carry
    several tokens. The last event of a completion has `finish_reason` set.
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    prompt_tokens: int = 0
    completion_tokens: int = 0  # generated so far, this event included
    error: str | None = None


@dataclass
class CompletionOutput:
    """One finished (or cancelled) completion."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None  # one per token of token_ids when SamplingParams.logprobs is set
    top_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    cumulative_logprob: float | None = None  # beam search: the beam's sum of log-probabilities
    error: str | None = None


@dataclass
class RequestOutput:
    """A request and its n completions (ordered by index; by score for beam search)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
