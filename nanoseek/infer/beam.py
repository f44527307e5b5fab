"""Beam search: keep the `num_beams` most likely continuations, return them ranked by length-normalized score.

A separate decoding mode (not mixed into continuous batching): the engine runs it between steps on
its own cache pool. Beams share the prompt's cache blocks and fork each other copy-on-write, so a
step copies at most one partial block per beam. With prefix caching the prompt starts from its
cached blocks and offers its full blocks to later requests, like any request.

Each step expands every beam by every token, keeps the 2 * num_beams best (beam log-probability +
token log-probability), moves those ending in a stop token to the finished hypotheses (only when
they rank within the first num_beams, as transformers does), and continues with the best num_beams
others. A hypothesis scores sum(log p) / len ** length_penalty, len counting generated tokens with
the stop token: length_penalty > 0 favours longer outputs, < 0 shorter ones. The search ends at
max_tokens, or once num_beams hypotheses are finished and the best running beam, normalized at its
current length, cannot beat the worst of them (transformers' default `early_stopping=False` rule).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from nanoseek.errors import GenerationError
from nanoseek.infer.cache import OutOfBlocks, chain_keys
from nanoseek.infer.outputs import FINISH_LENGTH, FINISH_STOP, CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from nanoseek.infer.engine import Engine


@dataclass
class BeamSearchParams:
    """num_beams: beams kept; max_tokens: new tokens at most (default: up to the context length);
    length_penalty: exponent of the length normalization; num_return: outputs returned (<= num_beams)."""

    num_beams: int = 4
    max_tokens: int | None = None
    length_penalty: float = 1.0
    num_return: int | None = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            problems.append(f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.length_penalty, (int, float)) or self.length_penalty != self.length_penalty:
            problems.append(f"length_penalty must be a number, got {self.length_penalty!r}")
        if self.num_return is not None and not (isinstance(self.num_return, int) and 1 <= self.num_return <= self.num_beams):
            problems.append(f"num_return must be in [1, num_beams], got {self.num_return!r}")
        if problems:
            raise GenerationError("invalid beam search parameters: " + "; ".join(problems))
        self.stop_token_ids = tuple(self.stop_token_ids)


@dataclass
class _Beam:
    token_ids: list[int]  # prompt + generated
    table: list[int]
    num_computed: int
    logprob: float = 0.0


def beam_search(engine: Engine, prompt, params: BeamSearchParams) -> RequestOutput:
    """Run beam search for one prompt on `engine`'s model and cache (the caller holds its step lock)."""
    prompt_ids = engine._prompt_ids(prompt)
    length = len(prompt_ids)
    if length >= engine.max_model_len:
        raise GenerationError(f"the prompt has {length} tokens but the context length is {engine.max_model_len}")
    max_tokens = params.max_tokens or engine.max_model_len - length
    if length + max_tokens > engine.max_model_len:
        raise GenerationError(f"max_tokens={max_tokens} does not fit: at most {engine.max_model_len - length} new tokens")
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(engine.eos_token_ids))
    cache, num_beams = engine.cache, params.num_beams
    finished: list[tuple[float, _Beam, bool]] = []  # (score, beam, ended with a stop token)

    def score(beam: _Beam) -> float:
        return beam.logprob / (len(beam.token_ids) - length) ** params.length_penalty

    def worst_kept() -> float:
        return sorted((s for s, _, _ in finished), reverse=True)[num_beams - 1]

    root = _Beam(list(prompt_ids), [], 0)
    beams = [root]
    size, keys = cache.block_size, []
    if engine.prefix_caching:  # start from the prompt's cached blocks, as a request would
        keys = chain_keys(prompt_ids, size, length // size)
        matched = engine._match_prefix(keys[: (length - 1) // size])
        root.table = engine._claim_prefix(matched, length, len(matched) * size)
        root.num_computed = len(root.table) * size
    try:
        cache.prepare_write(root.table, root.num_computed, length)
        with torch.inference_mode():
            logits = engine._forward([root], [prompt_ids[root.num_computed :]], logits_to_keep=1).logits[:, -1]
            root.num_computed = length
            if not engine.speculative:  # offer the prompt's full blocks (beams fill no MTP cache for them)
                for index, key in enumerate(keys):
                    cache.register(root.table[index], key)
            for step in range(max_tokens):
                logprobs = logits.float().log_softmax(dim=-1)
                totals = torch.tensor([b.logprob for b in beams], device=logprobs.device)[:, None] + logprobs
                vocab = logprobs.shape[-1]
                top = totals.flatten().topk(min(2 * num_beams, totals.numel()))
                candidates = []
                for rank, (total, index) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True)):
                    parent, token = beams[index // vocab], index % vocab
                    child = _Beam(parent.token_ids + [token], parent.table, parent.num_computed, total)
                    if token in stops:
                        if rank < num_beams:
                            finished.append((score(child), child, True))
                    elif len(candidates) < num_beams:
                        candidates.append(child)
                last_step = step == max_tokens - 1
                done = len(finished) >= num_beams and (
                    not candidates or max(score(c) for c in candidates) <= worst_kept()
                )
                if last_step or done or not candidates:
                    finished += [(score(c), c, False) for c in candidates if not done]
                    break
                for child in candidates:
                    child.table = cache.fork(child.table)
                for beam in beams:
                    cache.release(beam.table)
                beams = candidates
                for beam in beams:
                    cache.prepare_write(beam.table, beam.num_computed, beam.num_computed + 1)
                logits = engine._forward(beams, [[b.token_ids[-1]] for b in beams], logits_to_keep=1).logits[:, -1]
                for beam in beams:
                    beam.num_computed += 1
    except OutOfBlocks:
        raise GenerationError(
            f"beam search with {num_beams} beams ran out of KV cache blocks; give the engine more cache_memory"
        ) from None
    finally:
        for beam in beams:
            cache.release(beam.table)
    ranked = sorted(finished, key=lambda entry: entry[0], reverse=True)[: params.num_return or num_beams]
    outputs = []
    for index, (_, beam, stopped) in enumerate(ranked):
        generated = beam.token_ids[length:]
        text = ""
        if engine.tokenizer is not None:
            shown = generated[:-1] if stopped else generated
            text = engine.tokenizer.decode(shown, skip_special_tokens=params.skip_special_tokens)
        outputs.append(CompletionOutput(
            index, text, generated, finish_reason=FINISH_STOP if stopped else FINISH_LENGTH,
            stop_reason=generated[-1] if stopped else None, cumulative_logprob=beam.logprob,
        ))
    return RequestOutput(uuid.uuid4().hex, prompt_ids, outputs)
