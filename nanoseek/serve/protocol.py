"""The OpenAI wire format: request and response bodies of /v1/chat/completions, /v1/completions, /v1/models.

Requests accept unknown fields and ignore them (as vLLM does), so clients written for other servers
work; vLLM's sampling extras (`top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`,
`chat_template_kwargs`) are understood. Errors have vLLM's nested shape with an integer `code` equal
to the HTTP status: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from nanoseek.errors import NanoseekError

MAX_TOP_LOGPROBS = 20
TokenId = Annotated[int, Field(ge=0)]


class Request(BaseModel):
    """Base of request bodies: unknown fields are kept (and ignored), NaN and infinity are refused."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)


class StreamOptions(Request):
    include_usage: bool = True  # as in vLLM, sending `stream_options` at all asks for the usage chunk


class SamplingFields(Request):
    """Fields shared by chat and text completions."""

    model: str = Field(description="A model name from GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="New tokens at most; default: the rest of the context.")
    temperature: float | None = Field(None, ge=0, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, description="Completions per prompt.")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extras
    top_k: int | None = Field(None, ge=-1, description="-1 or 0 = off.")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(None, min_length=1, description="Reuse prefix-cached blocks only with this salt.")


class TextPart(Request):
    type: Literal["text"]
    text: str


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content


class ResponseFormat(Request):
    type: str = "text"


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Takes precedence over max_tokens.")
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='Template variables, e.g. {"thinking": true} to open the reasoning with <think>.'
    )
    include_reasoning: bool = Field(True, description="False drops reasoning_content from the response.")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(
        description="A string, a list of token ids, or a batch of either."
    )
    max_tokens: int | None = Field(16, ge=1, description="New tokens at most (OpenAI's default: 16).")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Top alternatives per token.")
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


# ----- responses -----------------------------------------------------------------------------------
class Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(Response):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Response):
    content: list[TokenLogprob]


class ChatMessageOut(Response):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None


class ChatChoice(Response):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str
    stop_reason: str | int | None = Field(None, description="The stop string or token id that matched.")


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Response):
    """A streamed message fragment; fields that are None are left out of the JSON."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(Response):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(Response):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the first prompt token of an echo (nothing predicts it)
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class CompletionResponse(Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoseek"
    state: Literal["unloaded", "loading", "loaded", "switching", "failed"]
    max_model_len: int | None = None
    thinking: bool = Field(False, description="Chat prompts open the reasoning with <think> by default.")
    expires_at: int | None = Field(None, description="When an idle model will be unloaded (unix time).")
    error: str | None = Field(None, description="Why the last load failed.")


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadModelRequest(Request):
    path: str | None = Field(
        None, description="Checkpoint directory inside a model root (absolute, or relative to a root)."
    )
    thinking: bool | None = None


class ErrorInfo(Response):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(Response):
    error: ErrorInfo


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    500: "internal_error",
    503: "service_unavailable",
}


class ServeError(NanoseekError):
    """A request the server answers with an error: the HTTP status, the OpenAI error fields, extra headers."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.info = ErrorInfo(message=message, type=type or ERROR_TYPES.get(status, "error"), param=param, code=status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=self.info).model_dump()


def busy(message: str, retry_after: int = 1) -> ServeError:
    """503 with Retry-After: the client should try again shortly."""
    return ServeError(503, message, headers={"Retry-After": str(retry_after)})
