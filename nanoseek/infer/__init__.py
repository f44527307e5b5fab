"""Inference: the engine (paged KV cache, continuous batching, streaming), sampling, MTP speculation."""

from nanoseek.infer.engine import (
    CompletionOutput,
    Engine,
    EngineStats,
    RequestHandle,
    RequestOutput,
    StreamEvent,
)
from nanoseek.infer.sampling import SamplingParams

__all__ = [
    "CompletionOutput",
    "Engine",
    "EngineStats",
    "RequestHandle",
    "RequestOutput",
    "SamplingParams",
    "StreamEvent",
]
