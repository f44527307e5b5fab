"""Shared builders for the inference tests: tiny random models with decisive outputs, a tiny tokenizer."""

from __future__ import annotations

import functools

import pytest
import torch
from model_configs import tiny_config

from nanoseek.model import build_model, transformer
from nanoseek.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12 + 30 = 42.",
    "<think>Add the units first.</think><answer>42</answer>",
    "深度求索 builds language models; 你好，世界！ Ünïcödé and emoji 🙂🚀 too.",
    "Once upon a time there was a tiny model that learned to count: 1 2 3 4 5 6 7 8 9 10.",
]


@pytest.fixture(autouse=True)
def single_thread():
    """One torch thread for these small-tensor tests: with two, every op that enters a parallel region
    waits for the second thread, which on a busy 2-core machine costs milliseconds per op (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def peaky_model(name: str = "v3", seed: int = 0, logit_scale: float = 30.0, **overrides):
    """A tiny random model whose head is scaled up, so greedy choices are far from ties."""
    model = build_model(tiny_config(name, **overrides), seed=seed).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


def watch_fused_decode(monkeypatch, seen) -> None:
    """Call seen(kind, x, result) for every try of a whole-layer decode step: each stack of layers as one
    call (kind "stack": `fused_decode_stack`; on None the layers then try one by one, unrecorded) and
    each single layer (kind "layer": `fused_decode_step`, as the MTP block runs)."""
    stack, step = transformer.fused_decode_stack, transformer.fused_decode_step

    def stacked(layers, x, *args):
        result = stack(layers, x, *args)
        if result is not None:
            seen("stack", x, result)
        return result

    def stepped(layer, x, *args):
        result = step(layer, x, *args)
        seen("layer", x, result)
        return result

    monkeypatch.setattr(transformer, "fused_decode_stack", stacked)
    monkeypatch.setattr(transformer, "fused_decode_step", stepped)


def modules_only(monkeypatch) -> None:
    """Decode steps through the layers' modules: no whole-layer C++ call."""
    monkeypatch.setattr(transformer, "fused_decode_stack", lambda *args: None)
    monkeypatch.setattr(transformer, "fused_decode_step", lambda *args: None)


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS * 4, vocab_size=320, min_frequency=1)


def reference_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the log-softmax of every step (on the CPU), each step a full forward without cache
    on the model's device."""
    ids, logprobs, device = list(prompt), [], next(model.parameters()).device
    with torch.no_grad():
        for _ in range(steps):
            step = model(torch.tensor([ids], device=device)).logits[0, -1].float().log_softmax(-1).cpu()
            logprobs.append(step)
            ids.append(int(step.argmax()))
    return ids[len(prompt):], logprobs
