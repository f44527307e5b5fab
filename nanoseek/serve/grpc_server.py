"""The gRPC front end (`nanoseek serve --grpc-port PORT`): proto/nanoseek.proto over the HTTP server's state.

It runs as a `grpc.aio` server in the same event loop as the HTTP app, so both share the model
manager, engines, content review, metrics and API keys, and a request means the same thing on
either: `prompt` is a text completion, `chat` a chat completion (template, reasoning split). HTTP
statuses map to gRPC codes; a client that cancels the call cancels the request in the engine.
The stubs in proto/ are generated and committed (see the .proto for the command).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from nanoseek.errors import NanoseekError
from nanoseek.serve.proto import nanoseek_pb2 as pb
from nanoseek.serve.proto import nanoseek_pb2_grpc
from nanoseek.serve.protocol import ServeError
from nanoseek.serve.service import (
    UNAUTHORIZED,
    ApiKeys,
    ChoiceDelta,
    Generation,
    chat_prompt,
    check_context,
    conversation,
    counted_refusals,
    review_input,
    sampling_params,
    start_generation,
    text_prompt,
)

if TYPE_CHECKING:
    from nanoseek.serve.app import ServerState

STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    503: grpc.StatusCode.UNAVAILABLE,
}


class GenerationService(nanoseek_pb2_grpc.GenerationServicer):
    def __init__(self, state: ServerState):
        self.state = state
        self.api_keys = ApiKeys(state.config.api_keys)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        await self._authorize(context)
        return pb.ListModelsResponse(models=[
            pb.ModelInfo(id=card.id, state=card.state, max_model_len=card.max_model_len or 0, thinking=card.thinking)
            for card in self.state.manager.cards()])

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        await self._authorize(context)
        try:
            generation = await self._start(request)
        except ServeError as error:
            await context.abort(STATUS_CODES.get(error.status, grpc.StatusCode.INTERNAL), error.info.message)
            raise  # abort() raises; this line is never reached
        try:
            async for delta in generation.deltas():
                if delta.finish_reason == "error":
                    await context.abort(grpc.StatusCode.INTERNAL, delta.error or "generation failed")
                if delta.content or delta.reasoning or delta.token_ids or delta.finish_reason:
                    yield _response(delta)
            prompt, completion = generation.prompt_tokens, generation.completion_tokens
            yield pb.GenerateResponse(usage=pb.Usage(prompt_tokens=prompt, completion_tokens=completion,
                                                     total_tokens=prompt + completion))
        finally:
            generation.close()

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.api_keys:
            metadata = dict(context.invocation_metadata() or ())
            if not self.api_keys.accept(metadata.get("authorization", "")):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHORIZED)

    async def _start(self, request: pb.GenerateRequest) -> Generation:
        started = time.monotonic()
        state = self.state
        deployment = await state.manager.get(request.model)
        with counted_refusals(state.metrics, deployment):
            reasoning = None
            if request.WhichOneof("input") == "chat":
                messages = conversation([(m.role, m.content) for m in request.chat.messages])
                review_input(state.moderator, [m["content"] for m in messages], "messages")
                kwargs = {"thinking": request.thinking} if request.HasField("thinking") else None
                ids, reasoning = chat_prompt(deployment, messages, kwargs)
                param = "messages"
            else:
                review_input(state.moderator, [request.prompt], "prompt")
                ids, param = text_prompt(deployment, request.prompt), "prompt"
            max_tokens = request.max_tokens if request.HasField("max_tokens") else None
            check_context(deployment, len(ids), max_tokens, param)
            params = sampling_params(
                max_tokens=max_tokens,
                temperature=request.temperature if request.HasField("temperature") else 1.0,
                top_p=request.top_p if request.HasField("top_p") else 1.0,
                top_k=request.top_k,
                min_p=request.min_p,
                repetition_penalty=request.repetition_penalty if request.HasField("repetition_penalty") else 1.0,
                presence_penalty=request.presence_penalty,
                frequency_penalty=request.frequency_penalty,
                stop=list(request.stop),
                stop_token_ids=list(request.stop_token_ids),
                seed=request.seed if request.HasField("seed") else None,
                logprobs=request.logprobs if request.HasField("logprobs") else None,
                ignore_eos=request.ignore_eos,
                cache_salt=request.cache_salt if request.HasField("cache_salt") else None,
            )
            return start_generation(deployment, [ids], params, request.n or 1, request_id=f"grpc-{uuid.uuid4().hex}",
                                    metrics=state.metrics, moderator=state.moderator, started=started,
                                    reasoning=reasoning)


def _response(delta: ChoiceDelta) -> pb.GenerateResponse:
    logprobs = [pb.TokenLogprob(token_id=entry.token_id, logprob=entry.logprob, top=entry.top or {})
                for entry in delta.logprobs or []]
    stop_reason = "" if delta.stop_reason is None else str(delta.stop_reason)
    return pb.GenerateResponse(index=delta.index, text=delta.content, reasoning=delta.reasoning,
                               token_ids=delta.token_ids, logprobs=logprobs, finish_reason=delta.finish_reason or "",
                               stop_reason=stop_reason)


def create_grpc_server(state: ServerState, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A gRPC server bound to host:port (0 = any free port); returns it (not started) and the bound port."""
    server = grpc.aio.server()
    nanoseek_pb2_grpc.add_GenerationServicer_to_server(GenerationService(state), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise NanoseekError(f"cannot bind the gRPC server to {host}:{port}")
    return server, bound
