"""Inference: the engine (paged KV cache, continuous batching, streaming), sampling, MTP speculation."""

from nanoseek.infer.beam import BeamSearchParams
from nanoseek.infer.engine import Engine, EngineStats, RequestHandle
from nanoseek.infer.outputs import CompletionOutput, RequestOutput, StreamEvent
from nanoseek.infer.sampling import SamplingParams

__all__ = [
    "BeamSearchParams",
    "CompletionOutput",
    "Engine",
    "EngineStats",
    "RequestHandle",
    "RequestOutput",
    "SamplingParams",
    "StreamEvent",
]
