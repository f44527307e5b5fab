"""Per-request sampling: parameters validated up front, batched logits processing, seeded draws.

A batch holds requests with different parameters, so every knob is a per-row tensor and the work
is vectorized over rows. The processing order follows transformers' `generate`:

    penalties (repetition, presence, frequency) -> temperature -> top-k -> top-p -> min-p

`sampling_probs` turns logits [rows, vocab] into the distribution each row samples from (one-hot at
the argmax for greedy rows), `draw` samples it by inverse CDF with one uniform number per row taken
from the request's own `RandomStream`. A request with a seed therefore consumes its own random
stream, one number per token, whatever other requests share the batch. Speculative decoding uses the
same two functions for the draft and the target distributions (see speculative.py).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.errors import GenerationError
from nanoseek.model import cpu_ops

LOGPROBS_MODES = ("raw", "processed")
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How one request samples and when it stops. Invalid values raise `GenerationError` at creation.

    max_tokens: new tokens at most; None = up to the context length.
    temperature: 0 = greedy (argmax); otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = off); top_p: the smallest set with probability >= top_p;
        min_p: tokens with probability >= min_p * the top probability.
    repetition_penalty: > 1 discourages tokens of the prompt and output (logit / p if > 0 else * p).
    presence_penalty / frequency_penalty: subtracted once / once per occurrence for output tokens.
    stop: strings that end generation; they are not part of the returned text.
    stop_token_ids: token ids that end generation (besides EOS unless `ignore_eos`); kept in token_ids.
    logprobs: None = none; 0 = the log-probability of each chosen token; n = plus the n most likely.
    logprobs_mode: "raw" = the model's distribution (log_softmax of the logits); "processed" = the
        distribution actually sampled from (after penalties, temperature and truncation).
    seed: makes the request's samples reproducible, independently of batch composition.
    skip_special_tokens: drop control tokens (BOS/EOS/...) from the text.
    cache_salt: prefix caching reuses cached blocks only between requests with the same salt (vLLM's
        `cache_salt`): give each tenant its own, so nobody can time the cache for another's prompts.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    logprobs_mode: str = "raw"
    seed: int | None = None
    skip_special_tokens: bool = True
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            problems.append(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                problems.append(f"{name} must be in [-2, 2], got {value!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            problems.append(f"logprobs must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            problems.append(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            problems.append(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            problems.append(f"stop must be a string or a list of strings, got {type(self.stop).__name__}: {self.stop!r}")
        elif any(s == "" for s in stop):
            problems.append("stop strings must not be empty")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            problems.append(f"cache_salt must be a non-empty string, got {self.cache_salt!r}")
        if problems:
            raise GenerationError("invalid sampling parameters: " + "; ".join(problems))
        self.stop = tuple(stop)
        self.stop_token_ids = tuple(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass
class PenaltyState:
    """What the penalties need to know about one row's history: output token counts, tokens seen.

    counts [vocab] int32 (output tokens only); seen [vocab] bool (prompt and output tokens).
    """

    counts: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def from_tokens(cls, prompt_ids: Sequence[int], output_ids: Sequence[int], vocab_size: int, device) -> PenaltyState:
        counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        if output_ids:
            counts.index_add_(0, torch.tensor(list(output_ids), device=device), torch.ones(len(output_ids), dtype=torch.int32, device=device))
        seen = counts > 0
        if prompt_ids:
            seen[torch.tensor(list(prompt_ids), device=device)] = True
        return cls(counts, seen)

    def add(self, token_id: int) -> None:
        self.counts[token_id] += 1
        self.seen[token_id] = True

    def with_tokens(self, token_ids: Sequence[int]) -> PenaltyState:
        """A copy that also counts `token_ids` (the drafts before a speculative position)."""
        state = PenaltyState(self.counts.clone(), self.seen.clone())
        for token_id in token_ids:
            state.add(token_id)
        return state


def apply_penalties(logits: torch.Tensor, params: Sequence[SamplingParams], states: Sequence[PenaltyState | None]) -> torch.Tensor:
    """Repetition penalty on seen tokens, then presence/frequency penalties on output tokens. [rows, vocab]."""
    if not any(p.uses_penalties for p in distinct(params)):
        return logits
    rows = [i for i, p in enumerate(params) if p.uses_penalties]
    logits = logits.clone()
    index = torch.tensor(rows, device=logits.device)
    selected = logits[index]
    counts = torch.stack([states[i].counts for i in rows]).to(logits.dtype)
    seen = torch.stack([states[i].seen for i in rows])
    repetition = torch.tensor([params[i].repetition_penalty for i in rows], device=logits.device)[:, None]
    presence = torch.tensor([params[i].presence_penalty for i in rows], device=logits.device)[:, None]
    frequency = torch.tensor([params[i].frequency_penalty for i in rows], device=logits.device)[:, None]
    penalized = torch.where(selected > 0, selected / repetition, selected * repetition)
    selected = torch.where(seen, penalized, selected)
    selected = selected - frequency * counts - presence * (counts > 0).to(logits.dtype)
    logits[index] = selected
    return logits


def sampling_probs(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    states: Sequence[PenaltyState | None] | None = None,
) -> torch.Tensor:
    """The distribution each row samples from, [rows, vocab] float32 (one-hot for greedy rows).

    `logits` are the model's raw logits [rows, vocab]; `states` the penalty state of each row (needed
    only for rows whose params use penalties).
    """
    logits = apply_penalties(logits.float(), params, states or [None] * len(params))
    device = logits.device
    kinds = distinct(params)  # the checks below look at each distinct params object once
    temperatures = {1.0 if p.greedy else p.temperature for p in kinds}
    if len(temperatures) > 1:
        logits = logits / torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)[:, None]
    elif temperatures != {1.0}:  # one temperature for the batch (a scalar divide gives the same values)
        logits = logits / temperatures.pop()
    if any(p.top_k > 0 or p.top_p < 1 for p in kinds if not p.greedy):
        logits = _truncate_sorted(logits, params)
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0 for p in kinds if not p.greedy):
        min_p = torch.tensor([p.min_p if not p.greedy else 0.0 for p in params], device=device)
        probs = torch.where(probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True), probs, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if any(p.greedy for p in kinds):
        one_hot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(torch.tensor([p.greedy for p in params], device=device)[:, None], one_hot, probs)
    return probs


def _truncate_sorted(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k then top-p on temperature-scaled logits: tokens outside get -inf. Greedy rows untouched."""
    device = logits.device
    vocab = logits.shape[-1]
    top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 and not p.greedy else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p if not p.greedy else 1.0 for p in params], device=device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Keep a token if the tokens strictly more likely than it hold less than top_p (the first always stays).
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, sorted_logits)


def uniforms(streams: Sequence[RandomStream], device: torch.device | str | None = None) -> torch.Tensor:
    """One U[0, 1) number per row, each from its row's stream. [rows] float64."""
    values = torch.frombuffer(array("d", [stream.next() for stream in streams]), dtype=torch.float64)  # 3x torch.tensor
    return values if device is None or torch.device(device).type == "cpu" else values.to(device)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i gets the first token whose cumulative probability exceeds u[i]. [rows].
    fp32 rows on CPU take the fused kernel (the same fp64 sums and search, one call without the fp64
    copies: a 64-completion rollout of `qwen2-nano` on one thread 126.5 -> 112.2 ms)."""
    if probs.dtype == torch.float32 and probs.dim() == 2 and probs.shape[-1] and (kernels := cpu_ops.for_inference(probs)) is not None:
        return kernels.inverse_cdf(probs, u.to(dtype=torch.float64))
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    target = (u.to(cdf) * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return tokens.clamp_(max=probs.shape[-1] - 1)


class RandomStream:
    """One request's U[0, 1) numbers, drawn from its own CPU generator `CHUNK` at a time.

    Seeded, the numbers depend on the seed alone (not on the batch or on how many are consumed per
    step); unseeded, the seed comes from torch's global RNG, so `torch.manual_seed` applies. One
    `torch.rand` call per chunk instead of per token: a decode step of 64 sequences made 64 calls.
    """

    CHUNK = 64

    def __init__(self, seed: int | None = None):
        if seed is None:
            seed = int(torch.randint(2**62, (), dtype=torch.int64))
        self.generator = torch.Generator().manual_seed(seed)
        self._buffer: list[float] = []
        self._position = 0

    def next(self) -> float:
        if self._position == len(self._buffer):
            self._buffer = torch.rand(self.CHUNK, generator=self.generator, dtype=torch.float64).tolist()
            self._position = 0
        value = self._buffer[self._position]
        self._position += 1
        return value


def token_logprobs(
    logits: torch.Tensor, probs: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
) -> list[tuple[float, dict[int, float] | None] | None]:
    """Per row: (logprob of the chosen token, {token: logprob} of the top-n) or None if not asked.

    `logits` raw [rows, vocab], `probs` the sampling distribution of the same rows, `tokens` [rows].
    """
    kinds = distinct(params)
    out: list[tuple[float, dict[int, float] | None] | None] = [None] * len(params)
    if all(p.logprobs is None for p in kinds):
        return out
    every_row = all(p.logprobs is not None for p in kinds)
    wanted = range(len(params)) if every_row else [i for i, p in enumerate(params) if p.logprobs is not None]
    device = logits.device
    index = None if every_row else torch.tensor(wanted, device=device)
    all_processed = all(p.logprobs_mode == "processed" for p in kinds if p.logprobs is not None)
    top_n = max(p.logprobs for p in kinds if p.logprobs is not None)
    chosen_ids = (tokens if index is None else tokens[index]).unsqueeze(-1)
    row_logits = (logits if index is None else logits[index]).float()
    row_probs = probs if index is None else probs[index]
    if top_n or not all_processed:  # the full distributions are needed
        processed = row_probs.log()
        processed_rows = [params[i].logprobs_mode == "processed" for i in wanted]
        logprobs = processed if all_processed else torch.where(
            torch.tensor(processed_rows, device=device)[:, None], processed, row_logits.log_softmax(dim=-1))
        chosen = logprobs.gather(1, chosen_ids).squeeze(-1).tolist()
    else:  # only the sampled token's processed log-probability: no [rows, vocab] log
        logprobs = None
        chosen = row_probs.gather(1, chosen_ids).squeeze(-1).log().tolist()
    top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (None, None)
    for row, i in enumerate(wanted):
        n = params[i].logprobs
        top = dict(zip(top_ids[row, :n].tolist(), top_values[row, :n].tolist(), strict=True)) if n else None
        out[i] = (chosen[row], top)
    return out


def in_kernel(params: SamplingParams) -> bool:
    """Whether rows with these params sample in `cpu_ops.sample_rows` (where it is built, on CPU):
    temperature sampling alone (no greedy, top-k, top-p, min-p or penalties) and at most the sampled
    token's processed log-prob (the raw one too at temperature 1, where they are one). It depends on
    the params only, so a seeded row samples the same way whatever shares its batch."""
    return (not params.greedy and params.top_k <= 0 and params.top_p >= 1 and params.min_p <= 0
            and not params.uses_penalties
            and (params.logprobs is None
                 or params.logprobs == 0 and (params.logprobs_mode == "processed" or params.temperature == 1.0)))


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    states: Sequence[PenaltyState | None],
    streams: Sequence[RandomStream],
) -> tuple[list[int], list[tuple[float, dict[int, float] | None] | None]]:
    """One token per row of `logits` [rows, vocab] and its `token_logprobs` entry, each row drawing one
    number from its stream. Rows `in_kernel` takes run as one `cpu_ops.sample_rows` call (softmax, draw
    and log-prob without the [rows, vocab] tensors between them: a 64-row decode step of `qwen2-nano`,
    69 -> 44 us with the Python around it, the kernel itself 19 us), the others through sampling_probs /
    draw / token_logprobs."""
    logits = logits.float()
    u = uniforms(streams, logits.device)
    kernels = cpu_ops.for_inference(logits) if logits.dim() == 2 and logits.shape[-1] else None
    kinds = distinct(params)
    fast = {id(p): kernels is not None and in_kernel(p) for p in kinds}
    if all(fast.values()):  # the usual batch: one call, no lists of rows
        temperature = torch.frombuffer(array("f", [p.temperature for p in params]), dtype=torch.float32)
        chosen, logprobs = kernels.sample_rows(logits, temperature, u)
        if all(p.logprobs is None for p in kinds):
            return chosen.tolist(), [None] * len(params)
        return chosen.tolist(), [None if p.logprobs is None else (lp, None)
                                 for p, lp in zip(params, logprobs.tolist(), strict=True)]
    if not any(fast.values()):  # no kernels (CUDA, not built), or every row asks for more
        probs = sampling_probs(logits, params, states)
        chosen = draw(probs, u)
        return chosen.tolist(), token_logprobs(logits, probs, chosen, params)
    rows = [i for i, p in enumerate(params) if fast[id(p)]]
    tokens: list[int] = [0] * len(params)
    entries: list = [None] * len(params)
    index = torch.tensor(rows)
    temperature = torch.frombuffer(array("f", [params[i].temperature for i in rows]), dtype=torch.float32)
    chosen, logprobs = kernels.sample_rows(logits[index], temperature, u[index])
    for i, token, logprob in zip(rows, chosen.tolist(), logprobs.tolist(), strict=True):
        tokens[i] = token
        entries[i] = None if params[i].logprobs is None else (logprob, None)
    others = [i for i, p in enumerate(params) if not fast[id(p)]]
    index = torch.tensor(others, device=logits.device)
    rest, rest_params = logits[index], [params[i] for i in others]
    probs = sampling_probs(rest, rest_params, [states[i] for i in others])
    chosen = draw(probs, u[index])
    for i, token, entry in zip(others, chosen.tolist(), token_logprobs(rest, probs, chosen, rest_params), strict=True):
        tokens[i], entries[i] = token, entry
    return tokens, entries


def greedy_only(params: Sequence[SamplingParams]) -> bool:
    """True when argmax alone decides every row (no penalties, no logprobs): the fast path."""
    return all(p.greedy and not p.uses_penalties and p.logprobs is None for p in distinct(params))


def greedy_tokens(logits: torch.Tensor) -> list:
    """argmax over the last dim (the first maximum on ties), as (nested) lists. fp32/bf16 on CPU: the fused
    kernel (a 32k vocabulary, 16 rows: 70 / 121 us against torch's 154 / 178); otherwise taken in fp32,
    because CPU's bf16 argmax kernel is ~5x slower than widening first, which is exact."""
    fused = logits.dtype in (torch.float32, torch.bfloat16) and logits.numel()
    if fused and (kernels := cpu_ops.for_inference(logits)) is not None:
        return kernels.argmax(logits).tolist()
    return logits.float().argmax(dim=-1).tolist()


def distinct(params: Sequence[SamplingParams]) -> list[SamplingParams]:
    """Each params object once: a decode batch holds many rows of few requests (the n completions of
    a request share one), so per-batch checks need not look at every row."""
    return list({id(p): p for p in params}.values())

