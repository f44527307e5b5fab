"""`nanoseek serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

    nanoseek serve --model r1=runs/r1/final --model base=runs/base/final --thinking r1 --port 8000

Endpoints (every response carries an `X-Request-Id`, the client's own if it sent a valid one):
  POST /v1/chat/completions, /v1/completions   OpenAI bodies; SSE when "stream": true
  GET  /v1/models, /v1/models/{name}           served models with their state
  POST /v1/models/{name}/load|unload|switch    the model manager (admin key if configured)
  GET  /health, /metrics (Prometheus), / (the chat page)

Concurrent requests share the engine's decode steps. With `--api-key`, /v1 needs
`Authorization: Bearer KEY` (compared in constant time); /health, /metrics and the page stay open.
Errors use vLLM's nested shape (see protocol.py): 400 bad parameters or a prompt over the context
(checked before any SSE byte), 401, 403 (a path outside the model roots), 404, 413, 503 with
Retry-After (queue full); a 500 only for a server fault. A client that disconnects cancels its
request, whose cache is freed before the engine's next step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanoseek.errors import NanoseekError
from nanoseek.infer import SamplingParams
from nanoseek.serve.metrics import ServerMetrics
from nanoseek.serve.moderation import Moderator
from nanoseek.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorResponse,
    LoadModelRequest,
    ModelCard,
    ModelList,
    ServeError,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from nanoseek.serve.registry import EngineSettings, ModelManager
from nanoseek.serve.service import (
    UNAUTHORIZED,
    ApiKeys,
    ChoiceDelta,
    Generation,
    chat_prompt,
    check_context,
    conversation,
    counted_refusals,
    prompt_logprobs,
    review_input,
    sampling_params,
    start_generation,
    text_prompt,
    token_bytes,
    token_text,
)

logger = logging.getLogger(__name__)
WEB_DIR = Path(__file__).parent / "web"
REQUEST_ID = re.compile(r"[\w.:-]{1,128}")
MAX_REPORTED_ERRORS = 10
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)
}


@dataclass
class ServerConfig:
    """Everything `nanoseek serve` configures (the command-line flags)."""

    models: list[tuple[str, str]] = field(default_factory=list)  # (name, checkpoint directory)
    model_roots: list[str] = field(default_factory=list)  # default: the --model directories
    thinking: list[str] = field(default_factory=list)  # models whose chat prompts open <think>
    engine: EngineSettings = field(default_factory=EngineSettings)
    idle_unload: float | None = None
    api_keys: list[str] = field(default_factory=list)
    admin_api_keys: list[str] = field(default_factory=list)  # default: the API keys
    input_filters: list[str] = field(default_factory=list)
    output_filters: list[str] = field(default_factory=list)
    max_body_bytes: int = 8 << 20
    keepalive: float = 15.0  # seconds between SSE comments while a stream has no output
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None


@dataclass
class ServerState:
    config: ServerConfig
    manager: ModelManager
    moderator: Moderator
    metrics: ServerMetrics
    grpc_port: int | None = None  # the bound port once the gRPC server runs


# ----- the app -------------------------------------------------------------------------------------
def create_app(config: ServerConfig) -> FastAPI:
    """Build the app; models are registered now (bad paths fail here) and loaded at startup."""
    roots = config.model_roots or [directory for _, directory in config.models]
    manager = ModelManager(roots, config.engine, config.idle_unload)
    for name, directory in config.models:  # relative to the working directory (admin paths: to the roots)
        manager.register(name, Path(directory).resolve(), thinking=name in config.thinking)
    state = ServerState(config, manager, Moderator.from_specs(config.input_filters, config.output_filters),
                        ServerMetrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await manager.start()
        grpc_server = None
        if config.grpc_port is not None:
            from nanoseek.serve.grpc_server import create_grpc_server

            grpc_server, state.grpc_port = create_grpc_server(state, config.host, config.grpc_port)
            await grpc_server.start()
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)
            await manager.close()

    app = FastAPI(title="nanoseek", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API over the nanoseek inference engine.")
    app.state.server = state
    app.add_middleware(GuardMiddleware, api_keys=config.api_keys,
                       admin_api_keys=config.admin_api_keys or config.api_keys, max_body_bytes=config.max_body_bytes)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, error: ServeError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(NanoseekError)
    async def user_error(request: Request, error: NanoseekError) -> JSONResponse:
        return JSONResponse(ServeError(400, str(error)).body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()[:MAX_REPORTED_ERRORS]
        if problems and problems[0]["type"] == "json_invalid":
            message = f"the body is not valid JSON ({problems[0]['ctx']['error']} at character {problems[0]['loc'][-1]})"
            return JSONResponse(ServeError(400, message).body(), status_code=400)
        message = "; ".join(f"{_location(p['loc']) or 'body'}: {p['msg']}"[:1000] for p in problems)
        param = _location(problems[0]["loc"]) if problems else None
        return JSONResponse(ServeError(400, message or "invalid request", param=param or None).body(),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ServeError(error.status_code, str(error.detail)).body(), status_code=error.status_code,
                            headers=error.headers)


def _location(loc: Sequence[Any]) -> str:
    """`("body", "messages", 0, "content")` -> `messages.0.content`."""
    return ".".join(str(part) for part in loc if part != "body")


# ----- routes --------------------------------------------------------------------------------------
def _add_routes(app: FastAPI, state: ServerState) -> None:
    manager = state.manager

    @app.get("/health", tags=["server"])
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": {entry.name: entry.state for entry in manager.entries.values()}}

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def metrics() -> Response:
        body = await asyncio.to_thread(state.metrics.render, manager.deployments())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", tags=["models"], response_model=ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=manager.cards())

    @app.get("/v1/models/{name:path}", tags=["models"], response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(name: str) -> ModelCard:
        return manager.card(manager.entry(name))

    @app.post("/v1/models/{name:path}/load", tags=["admin"], response_model=ModelCard, responses=ERROR_RESPONSES)
    async def load_model(name: str, body: LoadModelRequest | None = None) -> ModelCard:
        """Load a model; a new name with a `path` registers it, another `path` switches it."""
        body = body or LoadModelRequest()
        return await manager.load(name, body.path, body.thinking)

    @app.post("/v1/models/{name:path}/switch", tags=["admin"], response_model=ModelCard, responses=ERROR_RESPONSES)
    async def switch_model(name: str, body: LoadModelRequest) -> ModelCard:
        """Serve another checkpoint under a loaded name; in-flight requests finish on the old one."""
        manager.entry(name)
        if body.path is None:
            raise ServeError(400, "switch needs the new checkpoint's path", param="path")
        return await manager.load(name, body.path, body.thinking)

    @app.post("/v1/models/{name:path}/unload", tags=["admin"], response_model=ModelCard, responses=ERROR_RESPONSES)
    async def unload_model(name: str) -> ModelCard:
        return await manager.unload(name)

    @app.post("/v1/chat/completions", tags=["openai"], response_model=ChatCompletionResponse,
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _chat(state, body, request)

    @app.post("/v1/completions", tags=["openai"], response_model=CompletionResponse,
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _complete(state, body, request)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")


def _check_common(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise ServeError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
    if body.logit_bias:
        raise ServeError(400, "logit_bias is not supported by this server", param="logit_bias")


def _sampling(body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
              logprobs: int | None) -> SamplingParams:
    return sampling_params(
        max_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        stop=body.stop,
        stop_token_ids=body.stop_token_ids or (),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        seed=body.seed,
        skip_special_tokens=body.skip_special_tokens,
        cache_salt=body.cache_salt,
    )


def _request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ----- chat completions ----------------------------------------------------------------------------
async def _chat(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    started = time.monotonic()
    _check_common(body)
    if body.tools:
        raise ServeError(400, "tool calling is not supported by this server", param="tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise ServeError(400, "tool_choice needs tools, which this server does not support", param="tool_choice")
    if body.response_format is not None and body.response_format.type != "text":
        raise ServeError(400, f"response_format {body.response_format.type!r} is not supported; use 'text'",
                         param="response_format")
    if body.top_logprobs and not body.logprobs:
        raise ServeError(400, "when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
    deployment = await state.manager.get(body.model)
    with counted_refusals(state.metrics, deployment):
        messages = conversation([(message.role, message.text()) for message in body.messages])
        review_input(state.moderator, [m["content"] for m in messages], "messages")
        ids, opens_reasoning = chat_prompt(deployment, messages, body.chat_template_kwargs)
        max_tokens = body.max_completion_tokens or body.max_tokens
        check_context(deployment, len(ids), max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        generation = start_generation(
            deployment, [ids], _sampling(body, max_tokens, logprobs), body.n, request_id=_request_id("chatcmpl"),
            metrics=state.metrics, moderator=state.moderator, started=started, reasoning=opens_reasoning,
            include_reasoning=body.include_reasoning)
    response_id = generation.handles[0].request_id.removesuffix("-0")
    created = int(time.time())
    tokenizer = deployment.tokenizer

    def logprobs_of(delta: ChoiceDelta) -> ChatLogprobs | None:
        if not body.logprobs or delta.logprobs is None:
            return None
        return ChatLogprobs(content=[
            TokenLogprob(token=token_text(tokenizer, entry.token_id), logprob=entry.logprob,
                         bytes=list(token_bytes(tokenizer, entry.token_id)),
                         top_logprobs=[TopLogprob(token=token_text(tokenizer, t), logprob=lp,
                                                  bytes=list(token_bytes(tokenizer, t)))
                                       for t, lp in (entry.top or {}).items()])
            for entry in delta.logprobs])

    if body.stream:
        return _event_stream(
            generation, body, state.config.keepalive,
            opening=[ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""))
                     for i in range(len(generation.choices))],
            chunk=lambda choices, usage: ChatCompletionChunk(id=response_id, created=created, model=body.model,
                                                             choices=choices, usage=usage),
            choice=lambda delta: ChatChunkChoice(
                index=delta.index, delta=Delta(content=delta.content or None, reasoning_content=delta.reasoning or None),
                logprobs=logprobs_of(delta), finish_reason=delta.finish_reason, stop_reason=delta.stop_reason))

    choices = await _run_to_end(generation, request)
    return JSONResponse(ChatCompletionResponse(
        id=response_id, created=created, model=body.model, usage=_usage(generation),
        choices=[ChatChoice(index=d.index, finish_reason=d.finish_reason, stop_reason=d.stop_reason,
                            message=ChatMessageOut(content=d.content, reasoning_content=d.reasoning or None),
                            logprobs=logprobs_of(d))
                 for d in choices]).model_dump())


# ----- text completions ----------------------------------------------------------------------------
async def _complete(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    started = time.monotonic()
    _check_common(body)
    if body.suffix:
        raise ServeError(400, "suffix is not supported by this server", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ServeError(400, "best_of must equal n (best-of sampling is not supported)", param="best_of")
    scores_prompt = body.echo and body.logprobs is not None  # lm-evaluation-harness's loglikelihood requests
    if scores_prompt and body.stream:
        raise ServeError(400, "echo with logprobs (prompt logprobs) is not available when stream=true", param="echo")
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise ServeError(400, "prompt must not be an empty list", param="prompt")
    deployment = await state.manager.get(body.model)
    tokenizer = deployment.tokenizer
    with counted_refusals(state.metrics, deployment):
        texts = [p if isinstance(p, str) else _decode(tokenizer, p) for p in prompts]
        review_input(state.moderator, texts, "prompt")
        ids = [text_prompt(deployment, prompt) for prompt in prompts]
        for prompt_ids in ids:
            check_context(deployment, len(prompt_ids), body.max_tokens, prompt_param="prompt")
        scored_prompts = []  # per prompt: its tokens with their log-probabilities (the first has none)
        if scores_prompt:
            scored_prompts = [await prompt_logprobs(deployment, prompt_ids, body.logprobs) for prompt_ids in ids]
        generation = start_generation(
            deployment, ids, _sampling(body, body.max_tokens, body.logprobs), body.n,
            request_id=_request_id("cmpl"), metrics=state.metrics, moderator=state.moderator, started=started)
    response_id = generation.handles[0].request_id.removesuffix("-0")
    created = int(time.time())
    offsets = [len(texts[index // body.n]) if body.echo else 0 for index in range(len(generation.choices))]

    def logprobs_of(delta: ChoiceDelta) -> CompletionLogprobs | None:
        if body.logprobs is None or delta.logprobs is None:
            return None
        prompt_entries = scored_prompts[delta.index // body.n] if scored_prompts else []
        entries = [*prompt_entries, *delta.logprobs]
        tokens = [token_text(tokenizer, entry.token_id) for entry in entries]
        text_offset, position = [], 0
        for token in tokens[: len(prompt_entries)]:  # offsets into the echoed prompt
            text_offset.append(position)
            position += len(token)
        for token in tokens[len(prompt_entries) :]:  # then into what follows it
            text_offset.append(offsets[delta.index])
            offsets[delta.index] += len(token)
        top = None
        if body.logprobs:
            top = [None if entry.top is None else {token_text(tokenizer, t): lp for t, lp in entry.top.items()}
                   for entry in entries]
        return CompletionLogprobs(tokens=tokens, token_logprobs=[entry.logprob for entry in entries],
                                  top_logprobs=top, text_offset=text_offset)

    def echoed(index: int) -> str:
        return texts[index // body.n] if body.echo else ""

    if body.stream:
        return _event_stream(
            generation, body, state.config.keepalive,
            opening=[CompletionChoice(index=i, text=echoed(i)) for i in range(len(generation.choices))] if body.echo else [],
            chunk=lambda choices, usage: CompletionResponse(id=response_id, created=created, model=body.model,
                                                            choices=choices, usage=usage),
            choice=lambda delta: CompletionChoice(index=delta.index, text=delta.content, logprobs=logprobs_of(delta),
                                                  finish_reason=delta.finish_reason, stop_reason=delta.stop_reason))

    choices = await _run_to_end(generation, request)
    return JSONResponse(CompletionResponse(
        id=response_id, created=created, model=body.model, usage=_usage(generation),
        choices=[CompletionChoice(index=d.index, text=echoed(d.index) + d.content, logprobs=logprobs_of(d),
                                  finish_reason=d.finish_reason, stop_reason=d.stop_reason)
                 for d in choices]).model_dump())


def _decode(tokenizer, ids: list[int]) -> str:
    try:
        return tokenizer.decode(ids)
    except OverflowError:  # ids the backend cannot even represent; the engine's validation names them
        return ""


# ----- responses -----------------------------------------------------------------------------------
def _usage(generation: Generation) -> Usage:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


async def _stream_deltas(generation: Generation, keepalive: float) -> AsyncIterator[ChoiceDelta | str]:
    """The deltas worth a chunk, SSE comments while there is no output; an engine error ends the stream."""
    async for delta in generation.deltas(heartbeat=keepalive):
        if delta is None:
            yield ": keep-alive\n\n"
        elif delta.finish_reason == "error":
            error = ServeError(500, delta.error or "generation failed")
            yield _sse(ErrorResponse(error=error.info).model_dump_json())
            return
        elif delta.content or delta.reasoning or delta.finish_reason or delta.logprobs:
            yield delta


def _event_stream(generation: Generation, body: ChatCompletionRequest | CompletionRequest, keepalive: float, *,
                  opening: list[Any], chunk: Callable[[list[Any], Usage | None], BaseModel],
                  choice: Callable[[ChoiceDelta], Any]) -> Response:
    """The SSE response: `opening` choices, one chunk per delta, the usage chunk if asked, `[DONE]`.

    `chunk(choices, usage)` builds a chunk object, `choice(delta)` the choice a delta becomes.
    """
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    exclude = None if include_usage else {"usage"}  # chunks carry `"usage": null` only when usage was asked for

    async def events() -> AsyncIterator[str]:
        try:
            if opening:
                yield _sse(chunk(opening, None).model_dump_json(exclude=exclude))
            async for delta in _stream_deltas(generation, keepalive):
                yield delta if isinstance(delta, str) else _sse(chunk([choice(delta)], None).model_dump_json(exclude=exclude))
            if include_usage:
                yield _sse(chunk([], _usage(generation)).model_dump_json())
            yield "data: [DONE]\n\n"
        finally:
            generation.close()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return EventStreamResponse(events(), media_type="text/event-stream", headers=headers)


class EventStreamResponse(StreamingResponse):
    """A streaming response that always watches for the client leaving, whatever ASGI spec the server
    announces, so a disconnect cancels the stream (and the request) even while no output is being sent."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:
            async def stream() -> None:
                with contextlib.suppress(OSError):  # the client went away mid-send
                    await self.stream_response(send)
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


async def _run_to_end(generation: Generation, request: Request) -> list[ChoiceDelta]:
    """Collect every choice; a client that disconnects first cancels the request (a 499 nobody reads)."""
    collect = asyncio.ensure_future(generation.collect())
    disconnect = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({collect, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
        if not collect.done():
            collect.cancel()
            generation.close()
    if not collect.done() or collect.cancelled():
        raise ServeError(499, "the client disconnected")
    choices = collect.result()
    failed = [choice for choice in choices if choice.finish_reason == "error"]
    if failed:
        raise ServeError(500, failed[0].error or "generation failed")
    return choices


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ----- middleware ----------------------------------------------------------------------------------
class GuardMiddleware:
    """Request ids, API keys, the body size limit, and a JSON 500 for anything unexpected.

    Pure ASGI (no BaseHTTPMiddleware), so streaming responses and disconnects pass through untouched.
    """

    def __init__(self, app: ASGIApp, api_keys: Sequence[str], admin_api_keys: Sequence[str], max_body_bytes: int):
        self.app = app
        self.api_keys = ApiKeys(api_keys)
        self.admin_api_keys = ApiKeys(admin_api_keys)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        given = headers.get("x-request-id", "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        refusal = self._refusal(scope, headers)
        if refusal is not None:
            await _send_error(scope, send_with_id, refusal)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise HTTPException(413, f"the request body is larger than {self.max_body_bytes} bytes")
            return message

        try:
            await self.app(scope, limited_receive, send_with_id)
        except Exception:
            logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await _send_error(scope, send_with_id, ServeError(500, "internal server error"))

    def _refusal(self, scope: Scope, headers: dict[str, str]) -> ServeError | None:
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return ServeError(413, f"the request body is larger than {self.max_body_bytes} bytes")
        path = scope["path"]
        if not path.startswith("/v1/"):
            return None
        admin = scope["method"] == "POST" and path.startswith("/v1/models/")
        keys = self.admin_api_keys if admin else self.api_keys
        if not keys or keys.accept(headers.get("authorization", "")):
            return None
        return ServeError(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})



async def _send_error(scope: Scope, send: Send, error: ServeError) -> None:
    response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
    await response(scope, _nothing_to_receive, send)


async def _nothing_to_receive() -> Message:
    return {"type": "http.disconnect"}


# ----- command line --------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                        help="a checkpoint directory to serve under NAME (repeatable; NAME defaults to the directory name)")
    parser.add_argument("--model-root", action="append", default=[], metavar="DIR",
                        help="a directory the admin endpoints may load checkpoints from (repeatable; "
                             "default: the --model directories)")
    parser.add_argument("--thinking", action="append", default=[], metavar="NAME",
                        help="a model whose chat prompts open the reasoning with <think> (R1 style; repeatable)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=None, help="also serve gRPC on this port")
    parser.add_argument("--api-key", action="append", default=[], help="required as a Bearer token on /v1 (repeatable)")
    parser.add_argument("--admin-api-key", action="append", default=[],
                        help="required for load/unload/switch (default: the --api-key keys)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together at most")
    parser.add_argument("--max-queued-requests", type=int, default=256,
                        help="sequences waiting beyond --max-num-seqs before requests get a 503")
    parser.add_argument("--cache-memory", type=float, default=None, metavar="GIB", help="KV-cache pool per model")
    parser.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
    parser.add_argument("--num-speculative-tokens", type=int, default=1,
                        help="drafts per step with --speculative (beyond 1 the MTP layer drafts from its own output)")
    parser.add_argument("--no-prefix-caching", action="store_true",
                        help="compute every prompt in full (default: reuse cached blocks of earlier prompts)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    parser.add_argument("--idle-unload", type=float, default=None, metavar="SECONDS",
                        help="unload a model after this long without requests (the next request loads it)")
    parser.add_argument("--input-filter", action="append", default=[], metavar="FILE|MODULE:FUNCTION",
                        help="refuse requests whose text this filter flags (see moderation.py; repeatable)")
    parser.add_argument("--output-filter", action="append", default=[], metavar="FILE|MODULE:FUNCTION",
                        help="end completions whose text this filter flags (finish_reason content_filter)")
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    models = []
    for spec in args.model:
        name, separator, directory = spec.partition("=")
        if not separator:
            name, directory = Path(spec).name, spec
        models.append((name, directory))
    if not models and not args.model_root:
        raise NanoseekError("give at least one --model NAME=DIR (or a --model-root to load models into later)")
    if args.num_speculative_tokens < 1:
        raise NanoseekError(f"--num-speculative-tokens must be >= 1, got {args.num_speculative_tokens}")
    cache_memory = None if args.cache_memory is None else int(args.cache_memory * (1 << 30))
    engine = EngineSettings(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs, cache_memory=cache_memory,
                            speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                            prefix_caching=not args.no_prefix_caching, device=args.device, dtype=args.dtype,
                            max_queued_requests=args.max_queued_requests)
    return ServerConfig(models=models, model_roots=args.model_root, thinking=args.thinking, engine=engine,
                        idle_unload=args.idle_unload, api_keys=args.api_key, admin_api_keys=args.admin_api_key,
                        input_filters=args.input_filter, output_filters=args.output_filter,
                        max_body_bytes=args.max_body_bytes, host=args.host, port=args.port, grpc_port=args.grpc_port)


def cli_main(args: argparse.Namespace) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
