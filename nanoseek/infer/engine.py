"""The inference engine: a paged KV cache, continuous batching, per-request sampling, streaming.

    engine = Engine(model, tokenizer)
    outputs = engine.generate(["2+2=", "Once"], SamplingParams(temperature=0.7, max_tokens=64), n=4)
    for event in engine.stream("Hello", SamplingParams(max_tokens=32)):
        print(event.text, end="")

Requests join and leave between steps. Each `step()` runs at most two forwards: one over the prompts
being prefilled (newly admitted requests, or the next chunk of a long prompt, left-padded into one
batch within `max_prefill_tokens`) and one decode forward over every running sequence (one token each,
or the pending token plus MTP drafts under speculative decoding). Admission takes waiting requests in
order while the pool has blocks for their prompt; when decoding runs out of blocks the youngest
sequence is preempted (its blocks freed) and later recomputed from its tokens, its random state kept.
With prefix caching (the default) an admitted sequence first reuses the cached blocks of its longest
registered prefix (cache.py) and computes only the rest.

Three ways to drive it:
* offline (GRPO, scripts): `generate(prompts, params, n)` steps the engine until its requests finish
  and returns token ids, text and logprobs;
* streaming in one thread: `stream(...)` (or iterating a handle) steps the engine as events are needed;
* a server: `start()` runs `step()` in a background thread; `submit()` is thread-safe and returns a
  `RequestHandle` to iterate (`for` or `async for`) and to `cancel()`. Validation happens inside
  `submit`, so a bad request raises `GenerationError` before any work is queued.

Models with MLA cache only the normalized latent and the rotated k_pe per token and decode with the
absorbed attention path; Qwen2/Llama cache grouped-query keys and values (see cache.py).
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import itertools
import logging
import queue
import threading
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.errors import GenerationError
from nanoseek.infer.beam import BeamSearchParams, beam_search
from nanoseek.infer.cache import NULL_BLOCK, PagedKVCache, block_key, chain_keys, long_tensor, salted_root
from nanoseek.infer.outputs import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    CompletionOutput,
    RequestOutput,
    StreamEvent,
)
from nanoseek.infer.packing import few_row_start, pack_model
from nanoseek.infer.quant import fuse_int8, int8_fusable
from nanoseek.infer.sampling import (
    PenaltyState,
    RandomStream,
    SamplingParams,
    draw,
    greedy_only,
    greedy_tokens,
    sample,
    sampling_probs,
    token_logprobs,
    uniforms,
)
from nanoseek.infer.speculative import accept_drafts, mtp_forward
from nanoseek.model.cache import cache_bytes_per_token
from nanoseek.model.decode_layer import enable_fused_decode
from nanoseek.model.layers import FusedProjection, few_row_products, fusable
from nanoseek.model.transformer import CausalLM, ModelOutput

DEFAULT_CACHE_MEMORY = 1 << 30
_RUNNING: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines whose background thread runs
logger = logging.getLogger(__name__)


@atexit.register
def _close_running_engines() -> None:
    """Stop background engines before the interpreter finalizes (see `Engine.start`)."""
    for engine in list(_RUNNING):
        engine.close()


# ----- monitoring ---------------------------------------------------------------------------------
@dataclass
class EngineStats:
    """Counters and gauges for monitoring (a server exports them as Prometheus metrics)."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # ...and found there (not computed again)
    spec_verify_steps: int = 0  # speculative forwards that tested at least one draft
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.spec_accepted_tokens / max(self.spec_draft_tokens, 1)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verify forward: 1 (the target's own token) + accepted drafts."""
        return 1 + self.spec_accepted_tokens / max(self.spec_verify_steps, 1)


class RequestHandle:
    """A submitted request: iterate its `StreamEvent`s (`for` or `async for`), `cancel()` it, or wait for `result()`.

    Submitted from inside a running asyncio loop, events are delivered to that loop (use `async for`);
    otherwise to a thread-safe queue (use `for`; without a background thread, iterating steps the engine).
    """

    def __init__(self, engine: Engine, request_id: str, prompt_ids: list[int], n: int, streamed: bool = True):
        self.engine = engine
        self.streamed = streamed  # False: only `result()` is read (events are not queued)
        self.request_id = request_id
        self.n = n
        self._output = RequestOutput(request_id, prompt_ids, [CompletionOutput(i, "", []) for i in range(n)])
        self._texts: list[list[str]] = [[] for _ in range(n)]  # joined into the output when a completion ends
        self._unfinished = n
        self._done = threading.Event()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            self._async_queue: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._async_queue = None, None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self.engine.cancel(self.request_id)

    def result(self) -> RequestOutput:
        """Wait for every completion to finish (stepping the engine if no background thread runs it)."""
        if not self.engine.running_in_background:
            while not self._done.is_set():
                if not self.engine.has_unfinished():
                    raise RuntimeError(f"request {self.request_id} is not queued in its engine")
                self.engine.step()
        self._done.wait()
        return self._output

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._loop is not None:
            raise GenerationError("this request was submitted from an asyncio loop: iterate it with `async for`")
        remaining = self.n
        while remaining:
            while self._queue.empty() and not self.engine.running_in_background:
                if not self.engine.has_unfinished():
                    raise RuntimeError(f"request {self.request_id} is not queued in its engine")
                self.engine.step()
            event = self._queue.get()
            remaining -= event.finish_reason is not None
            yield event

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        if self._async_queue is None:
            raise GenerationError("this request was submitted outside an asyncio loop: iterate it with `for`")
        remaining = self.n
        while remaining:
            event = await self._async_queue.get()
            remaining -= event.finish_reason is not None
            yield event

    def _record(self, index: int, token_ids: list[int], logprobs: list | None) -> None:
        """Called by the engine thread for a request nobody streams: keep new tokens, no event."""
        completion = self._output.outputs[index]
        completion.token_ids.extend(token_ids)
        if logprobs is not None:
            completion.logprobs = completion.logprobs or []
            completion.logprobs.extend(chosen for chosen, _ in logprobs)
            if any(top is not None for _, top in logprobs):
                completion.top_logprobs = completion.top_logprobs or []
                completion.top_logprobs.extend(top for _, top in logprobs)

    def _publish(self, event: StreamEvent) -> None:
        """Called by the engine thread: record the event, then hand it to the consumer."""
        completion = self._output.outputs[event.index]
        self._texts[event.index].append(event.text)
        completion.token_ids.extend(event.token_ids)
        if event.logprobs is not None:
            completion.logprobs = completion.logprobs or []
            completion.logprobs.extend(event.logprobs)
        if event.top_logprobs is not None:
            completion.top_logprobs = completion.top_logprobs or []
            completion.top_logprobs.extend(event.top_logprobs)
        if event.finish_reason is not None:
            completion.text = "".join(self._texts[event.index])
            completion.finish_reason, completion.stop_reason = event.finish_reason, event.stop_reason
            completion.error = event.error
            self._unfinished -= 1
        if self.streamed:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
            else:
                self._queue.put(event)
        if self._unfinished == 0:
            self._done.set()


# ----- per-sequence state ------------------------------------------------------------------------
class _TextTracker:
    """Incremental text of one completion: UTF-8-safe deltas, stop strings found and cut off.

    With `incremental=False` (a request nobody streams, without stop strings) the ids are only
    collected and decoded once at the end: the same text, without two decodes per token.
    """

    def __init__(self, tokenizer, params: SamplingParams, incremental: bool = True):
        self.decoder = tokenizer.stream_decoder(params.skip_special_tokens) if tokenizer is not None else None
        self.stops = params.stop
        self.longest_stop = max((len(s) for s in self.stops), default=0)
        self.deferred: list[int] | None = [] if self.decoder is not None and not incremental and not self.stops else None
        self.text = ""
        self.sent = 0  # characters already handed out
        self.scanned = 0  # characters already searched for stop strings

    def feed(self, token_id: int) -> str | None:
        """Add a token; return the stop string it completed, if any (the text is cut before it)."""
        if self.deferred is not None:
            self.deferred.append(token_id)
            return None
        if self.decoder is None:
            return None
        self.text += self.decoder.feed(token_id)
        return self._find_stop()

    def flush(self) -> str | None:
        if self.deferred is not None:  # the whole text at once: what feeding and flushing the decoder give
            ids, self.deferred = self.deferred, None  # (one decode, not one per token of a broken character)
            self.text += self.decoder.tokenizer.decode(ids, skip_special_tokens=self.decoder.skip_special_tokens)
            return None  # no stop strings: a deferred tracker has none
        if self.decoder is None:
            return None
        self.text += self.decoder.flush()
        return self._find_stop()

    def _decode_deferred(self) -> None:
        ids, self.deferred = self.deferred, None
        self.text += self.decoder.feed_many(ids)

    def _find_stop(self) -> str | None:
        if not self.stops:
            return None
        start = max(0, self.scanned - self.longest_stop + 1)
        self.scanned = len(self.text)
        found = [(self.text.find(stop, start), stop) for stop in self.stops]
        found = [(position, stop) for position, stop in found if position >= 0]
        if not found:
            return None
        position, stop = min(found)
        self.text = self.text[:position]
        return stop

    def take(self, final: bool) -> str:
        """Text not handed out yet, minus (unless final) a tail that may still grow into a stop string."""
        if self.deferred is not None:
            if not final:
                return ""
            self._decode_deferred()
        end = len(self.text)
        if not final:
            for length in range(min(self.longest_stop - 1, end - self.sent), 0, -1):
                tail = self.text[end - length :]
                if any(stop.startswith(tail) for stop in self.stops):
                    end -= length
                    break
        delta = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return delta


class _Sequence:
    """One completion being generated: its tokens, cache blocks, random stream and output state."""

    _arrivals = itertools.count()

    def __init__(self, handle: RequestHandle, index: int, prompt_ids: list[int], params: SamplingParams,
                 max_tokens: int, random: RandomStream, tracker: _TextTracker):
        self.handle = handle
        self.index = index
        self.prompt_length = len(prompt_ids)
        self.token_ids = list(prompt_ids)  # prompt + generated; the last generated one is not yet in the cache
        self.params = params
        self.max_tokens = max_tokens
        self.random = random
        self.tracker = tracker
        self.penalties: PenaltyState | None = None
        self.table: list[int] = []  # cache blocks
        self.num_computed = 0  # tokens whose keys/values are in the cache
        self.arrival = next(self._arrivals)
        self.followers: list[_Sequence] = []  # n > 1: siblings that fork this sequence's prefill
        self.finished = False
        # speculative decoding: the MTP cache covers positions < mtp_computed; `pending_hidden` holds the
        # main model's final hidden states of positions mtp_computed..num_computed-1.
        self.mtp_computed = 0
        self.pending_hidden: torch.Tensor | None = None
        # prefix caching: the first `num_hashed` blocks of `table` are registered (or were offered) and
        # `last_key` is the key of the last of them; `epoch` is the cache's at admission
        self.num_hashed = 0
        self.root_key = salted_root(params.cache_salt)
        self.last_key = self.root_key
        self.epoch = -1
        self.prefix_keys: tuple[int, list[bytes]] | None = None  # (token count, keys) of the last lookup
        # a quiet request (nobody streams it; no stop strings, no penalties: GRPO's rollouts) records a
        # token that is not in `quiet_stops` and leaves it short of `quiet_limit` tokens in one step
        # (`Engine._sample_and_append`); None: every token takes `Engine._append`
        self.quiet_stops: frozenset[int] | None = None
        self.quiet_limit = 0
        self.completion = handle._output.outputs[index]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_length

    @property
    def num_pending(self) -> int:
        """Tokens to run through the model before the next sample (1 while decoding)."""
        return len(self.token_ids) - self.num_computed

    @property
    def group_size(self) -> int:
        return 1 + len(self.followers)


# ----- the engine --------------------------------------------------------------------------------
@torch.no_grad()
def fuse_projections(model: CausalLM) -> None:
    """Fuse the linears that read the same input (q/k/v, gate/up, MLA's two input projections) into one
    buffer each (`FusedProjection`), in place: one matmul instead of two or three per decode step.
    Parameters keep their names, shapes and values, and training keeps working (fused layers run one
    by one while gradients are on)."""
    for module in model.modules():
        if not hasattr(module, "fusable_projections") or module.fused is not None:
            continue
        projections = module.fusable_projections()
        if fusable(projections):
            module.fused = FusedProjection.fuse(projections)
        elif int8_fusable(projections):  # weight-only int8 (`nanoseek.infer.quant`)
            module.fused = fuse_int8(projections)


class Engine:
    """Serve a `CausalLM` to many concurrent requests from one preallocated paged KV cache.

    tokenizer: a `nanoseek.Tokenizer` (text prompts, text output, stop strings); None = token ids only.
    max_model_len: context length (prompt + output); default and maximum: the model's max_position_embeddings.
    max_num_seqs: sequences decoded together at most.
    cache_memory: bytes for the KV cache pool; default min(1 GiB, enough for max_num_seqs full contexts).
    block_size: tokens per cache block.
    max_prefill_tokens: prompt tokens prefilled per step at most (longer prompts are chunked).
    speculative: draft with the model's MTP depth and verify (falls back to plain decoding without one).
    num_speculative_tokens: drafts per step (beyond 1 the MTP depth drafts from its own output).
    absorb: force MLA's absorbed (True) or naive (False) attention; None picks per forward.
    fuse: fuse the projections that read the same input (`fuse_projections`, in place).
    pack_weights: swap fp32 linear weights for panels (with the fused kernels built) and bf16 linear and
        expert weights for oneDNN-packed ones (`nanoseek.infer.packing`, in place, inference only: pass
        False for a model that keeps training; a no-op off CPU).
    prefix_caching: reuse the cached keys/values of a prompt's leading full blocks computed for an
        earlier request (`cache.py`): repeated system prompts, multi-turn chats, several requests for
        one prompt. Under speculative decoding the blocks carry the MTP depth's cache as well, and the
        last reused position is computed again (its MTP entry depends on the token after it). Cached
        blocks are forgotten when any weight or buffer of the model has changed (seen by tensor version
        counters, checked only when a lookup finds blocks to reuse), so a model that keeps training is
        safe, though it gains nothing.
    """

    def __init__(
        self,
        model: CausalLM,
        tokenizer=None,
        *,
        max_model_len: int | None = None,
        max_num_seqs: int = 64,
        cache_memory: int | None = None,
        block_size: int = 16,
        max_prefill_tokens: int = 2048,
        speculative: bool = False,
        num_speculative_tokens: int = 1,
        absorb: bool | None = None,
        fuse: bool = True,
        pack_weights: bool = True,
        prefix_caching: bool = True,
    ):
        config = model.config
        device = model.lm_head.weight.device
        self.few_row_start = few_row_start(model)  # see nanoseek.model.layers.linear
        if fuse:
            fuse_projections(model)
        if pack_weights:
            pack_model(model)
        enable_fused_decode(model)
        self.model = model  # train/eval mode is irrelevant here (no labels, no dropout): left as the caller set it
        self.config = config
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = model.model.embed_tokens.weight.dtype
        self.vocab_size = config.vocab_size
        self.max_model_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.absorb = absorb
        self.speculative = speculative and len(model.mtp) > 0
        self.prefix_caching = prefix_caching
        if num_speculative_tokens < 1:
            raise GenerationError("num_speculative_tokens must be >= 1")
        self.num_speculative_tokens = num_speculative_tokens
        bytes_per_token = cache_bytes_per_token(config, self.dtype, include_mtp=self.speculative)
        if cache_memory is None:
            cache_memory = min(DEFAULT_CACHE_MEMORY, max_num_seqs * self.max_model_len * bytes_per_token)
            cache_memory = max(cache_memory, (self.max_model_len + block_size) * bytes_per_token)
        num_blocks = 1 + cache_memory // (block_size * bytes_per_token)
        self.cache = PagedKVCache(config, num_blocks, block_size, self.dtype, self.device, include_mtp=self.speculative)
        self._weights_seen = self._weights_signature()  # what every cached block was computed with
        eos = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_id is not None:
            eos.add(tokenizer.eos_id)
        self.eos_token_ids = frozenset(eos)
        self.bos_token_id = tokenizer.bos_id if tokenizer is not None and tokenizer.bos_id is not None else config.bos_token_id
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active_ids: set[str] = set()
        self._ids_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = EngineStats()

    # ----- public API ---------------------------------------------------------------------------
    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        n: int = 1,
        request_id: str | None = None,
    ) -> RequestHandle:
        """Validate and queue one request of `n` completions. Thread-safe. Raises `GenerationError`."""
        handle, sequences = self._make_request(prompt, params or SamplingParams(), n, request_id)
        self._enqueue(sequences)
        return handle

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        n: int = 1,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list (text or token ids); `n` completions each. One output per prompt.

        Every prompt is validated before any is queued. Token ids, text, logprobs and finish reasons
        are in `outputs[i].outputs[j]`.
        """
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], int)) or not len(prompts):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise GenerationError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        requests = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                requests.append(self._make_request(prompt, p, n, None, streamed=False))
        except GenerationError:
            with self._ids_lock:
                self._active_ids.difference_update(handle.request_id for handle, _ in requests)
            raise
        for _, sequences in requests:
            self._enqueue(sequences)
        return [handle.result() for handle, _ in requests]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, n: int = 1) -> Iterator[StreamEvent]:
        """Submit (validating now) and iterate the events of one request; closing the iterator early cancels it."""
        return self._events(self.submit(prompt, params, n))

    @staticmethod
    def _events(handle: RequestHandle) -> Iterator[StreamEvent]:
        try:
            yield from handle
        finally:
            if not handle.finished:
                handle.cancel()

    def beam_search(self, prompt: str | Sequence[int], params: BeamSearchParams | None = None) -> RequestOutput:
        """Beam search for one prompt: a separate mode that runs between steps of the continuous batch."""
        with self._step_lock:
            return beam_search(self, prompt, params or BeamSearchParams())

    def prompt_logprobs(
        self, prompt: str | Sequence[int], top_n: int = 0
    ) -> tuple[list[int], list[float | None], list[dict[int, float] | None] | None]:
        """(token ids, log-probability of each token given the ones before it, the `top_n` most likely
        tokens at each position) for a prompt: None for the first token, which nothing predicts.

        What `echo` + `logprobs` returns in a completions API (lm-evaluation-harness scores
        continuations this way) and vLLM's `prompt_logprobs`. One forward over the whole prompt,
        without the KV cache, between steps of the continuous batch; the model's raw distribution.
        """
        token_ids = self._prompt_ids(prompt)
        if len(token_ids) > self.max_model_len:
            raise GenerationError(f"the prompt has {len(token_ids)} tokens but the context length is {self.max_model_len}")
        if top_n < 0:
            raise GenerationError(f"top_n must be >= 0, got {top_n}")
        with self._step_lock, torch.inference_mode():
            ids = torch.tensor([token_ids], device=self.device)
            logprobs = self.model(ids, use_mtp=False).logits[0, :-1].float().log_softmax(dim=-1)
            chosen = logprobs.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
            top = None
            if top_n:
                values, indices = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
                top = [None] + [dict(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        return token_ids, [None, *chosen], top

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (vLLM's `reset_prefix_cache`). Not needed after a weight
        update: changed weights are noticed and drop them (see `prefix_caching`)."""
        with self._step_lock:
            self.cache.reset_prefix_cache()
            self._weights_seen = self._weights_signature()

    def cancel(self, request_id: str) -> None:
        """Stop a request: its completions finish with reason "cancelled" and free their cache blocks.

        Without a background thread this happens now; with one, before the engine's next forward.
        """
        self._inbox.put(("cancel", request_id))
        self._wakeup.set()
        if not self.running_in_background:
            with self._step_lock:
                self._drain_inbox()

    def start(self) -> Engine:
        """Run the engine loop in a background thread (for servers). Returns self.

        Closed at interpreter exit if still running: Python ends a daemon thread that is inside torch
        at shutdown by unwinding through C++ code that may not unwind, and the process aborts
        ("terminate called without an active exception") instead of exiting.

        Torch work done before in the calling thread gives it an OpenMP thread pool that outlives the
        work; with more pooled OpenMP threads than CPUs libgomp stops spinning between parallel
        regions, and this thread's steps slow down (1.5x on 2 cores): build the model in a thread that
        exits, as the server does (`nanoseek.serve.registry.in_own_thread`)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
            self._thread.start()
            _RUNNING.add(self)
        return self

    def close(self) -> None:
        """Stop the background thread (running requests finish with reason "cancelled")."""
        if self._thread is not None:
            self._stopping = True
            self._wakeup.set()
            self._thread.join()
            self._thread = None
            _RUNNING.discard(self)
        with self._step_lock:
            self._drain_inbox()
            for sequence in list(self._running) + list(self._waiting):
                self._finish(sequence, FINISH_CANCELLED)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def running_in_background(self) -> bool:
        return self._thread is not None and threading.current_thread() is not self._thread

    @property
    def stats(self) -> EngineStats:
        """A consistent snapshot; safe to read from another thread (waits for the current step to end)."""
        with self._step_lock:
            stats = copy.deepcopy(self._stats)
            stats.num_running, stats.num_waiting = len(self._running), sum(s.group_size for s in self._waiting)
            stats.kv_cache_usage = self.cache.usage
        return stats

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting or not self._inbox.empty())

    # ----- request validation ----------------------------------------------------------------------
    def _make_request(self, prompt, params: SamplingParams, n: int, request_id: str | None, streamed: bool = True):
        if not isinstance(params, SamplingParams):
            raise GenerationError(f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.max_num_seqs:
            raise GenerationError(f"n must be an integer in [1, max_num_seqs={self.max_num_seqs}], got {n!r}")
        prompt_ids = self._prompt_ids(prompt)
        if params.stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise GenerationError(f"stop_token_ids {bad} are outside the vocabulary (size {self.vocab_size})")
        length = len(prompt_ids)
        if length >= self.max_model_len:
            raise GenerationError(
                f"the prompt has {length} tokens but the context length is {self.max_model_len}: "
                "shorten the prompt (at least one token must be left to generate)"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - length
        if length + max_tokens > self.max_model_len:
            raise GenerationError(
                f"max_tokens={max_tokens} is too large: the prompt has {length} tokens and the context length is "
                f"{self.max_model_len}, so at most {self.max_model_len - length} new tokens fit"
            )
        if length + max_tokens + self.num_speculative_tokens * self.speculative > self.cache.capacity_tokens:
            raise GenerationError(
                f"the request needs {length + max_tokens} tokens of KV cache but the pool holds "
                f"{self.cache.capacity_tokens}; give the engine more cache_memory"
            )
        request_id = request_id or uuid.uuid4().hex
        with self._ids_lock:
            if request_id in self._active_ids:
                raise GenerationError(f"request id {request_id!r} is already in use")
            self._active_ids.add(request_id)
        handle = RequestHandle(self, request_id, prompt_ids, n, streamed)
        sequences = []
        for index in range(n):
            seed = None if params.seed is None else (params.seed + index * 0x9E3779B97F4A7C15) % 2**63
            sequence = _Sequence(handle, index, prompt_ids, params, max_tokens, RandomStream(seed),
                                 _TextTracker(self.tokenizer, params, incremental=streamed))
            if params.uses_penalties:
                sequence.penalties = PenaltyState.from_tokens(prompt_ids, [], self.vocab_size, self.device)
            elif not streamed and not params.stop:
                sequence.quiet_stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
                sequence.quiet_limit = min(length + max_tokens, self.max_model_len)
            sequences.append(sequence)
        sequences[0].followers = sequences[1:]
        return handle, sequences

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError("text prompts need a tokenizer; pass token ids or give the engine a tokenizer")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise GenerationError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            if self.bos_token_id is None:
                raise GenerationError("the prompt is empty and the model has no BOS token to start from")
            ids = [self.bos_token_id]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise GenerationError(f"prompt token ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})")
        return ids

    def _enqueue(self, sequences: list[_Sequence]) -> None:
        self._inbox.put(("add", sequences[0]))
        self._wakeup.set()

    # ----- the step -----------------------------------------------------------------------------
    def step(self) -> list[StreamEvent]:
        """Admit, prefill and decode once; return the events produced (also delivered to their handles)."""
        with self._step_lock, torch.inference_mode(), few_row_products(self.few_row_start):
            self._drain_inbox()
            events: list[StreamEvent] = []
            try:
                decode = [s for s in self._running if s.num_pending == 1]
                prefill = self._schedule_prefill()
                if prefill:
                    events += self._run_prefill(prefill)
                if decode:
                    events += self._run_speculative(decode) if self.speculative else self._run_decode(decode)
            except Exception as error:
                for sequence in list(self._running):
                    self._finish(sequence, FINISH_ERROR, error=f"{type(error).__name__}: {error}")
                raise
            return events

    def _loop(self) -> None:
        while not self._stopping:
            if not self.has_unfinished():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                self.step()
            except Exception:  # already reported to the affected requests; keep serving the others
                logger.exception("engine step failed")

    def _drain_inbox(self) -> None:
        while True:
            try:
                command, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                self._waiting.append(payload)
            else:
                self._cancel_now(payload)

    def _cancel_now(self, request_id: str) -> None:
        for sequence in [s for s in [*self._running, *self._waiting] if s.handle.request_id == request_id]:
            self._finish(sequence, FINISH_CANCELLED)

    # ----- scheduling ----------------------------------------------------------------------------
    def _schedule_prefill(self) -> dict[_Sequence, int]:
        """Pick the sequences to prefill this step and how many of their pending tokens: {sequence: count}.

        Sequences already mid-prompt go first, then waiting requests in arrival order while there are
        sequence slots, free blocks (keeping one spare block per running sequence) and prefill budget:
        rows x the longest chunk (the padded batch) stays within `max_prefill_tokens`.
        """
        chunks: dict[_Sequence, int] = {}
        budget = self.max_prefill_tokens

        def fits(count: int) -> bool:
            return (len(chunks) + 1) * max([count, *chunks.values()]) <= budget

        for sequence in sorted((s for s in self._running if s.num_pending > 1), key=lambda s: s.arrival):
            count = min(sequence.num_pending, budget)
            if not fits(count):
                break
            if self._reserve(sequence, sequence.num_computed + count):
                chunks[sequence] = count
        while self._waiting:
            sequence = self._waiting[0]
            if len(self._running) + sequence.group_size > self.max_num_seqs:
                break
            keys = self._prefix_keys(sequence) if self.prefix_caching else []
            matched = self._match_prefix(keys)
            # Under speculative decoding the last reused position is computed again: the MTP depth's
            # entry there depends on the next token, which the block's key does not cover (its copy is written).
            reused = max(0, len(matched) * self.cache.block_size - self.speculative)
            count = min(len(sequence.token_ids) - reused, budget)
            if not fits(count):
                break
            needed = (self.cache.blocks_for(reused + count) - len(matched) + self.cache.blocks_to_claim(matched)
                      + (self.speculative and bool(matched)))
            if needed + len(self._running) > self.cache.num_free_blocks and self._running:
                break
            if needed > self.cache.num_free_blocks:
                break
            self._waiting.popleft()
            self._running.append(sequence)
            if self.prefix_caching:
                sequence.table = self._claim_prefix(matched, len(sequence.token_ids), reused)
                sequence.num_computed = sequence.mtp_computed = reused
                sequence.num_hashed, sequence.last_key = len(matched), keys[len(matched) - 1] if matched else sequence.root_key
                sequence.epoch = self.cache.epoch
            self.cache.prepare_write(sequence.table, reused, reused + count)
            chunks[sequence] = count
        return chunks

    # ----- prefix caching --------------------------------------------------------------------------
    def _prefix_keys(self, sequence: _Sequence) -> list[bytes]:
        """Keys of the full blocks of `sequence`'s tokens that may be reused: all but the last token,
        which must run through the model to give the next token's logits."""
        tokens = sequence.token_ids
        if sequence.prefix_keys is None or sequence.prefix_keys[0] != len(tokens):  # else looked up last step
            count = (len(tokens) - 1) // self.cache.block_size
            sequence.prefix_keys = (len(tokens), chain_keys(tokens, self.cache.block_size, count, sequence.root_key))
        return sequence.prefix_keys[1]

    def _claim_prefix(self, matched: list[int], num_tokens: int, reused: int) -> list[int]:
        """Take the `matched` cached blocks for a new table, counting a lookup of `num_tokens` tokens of
        which `reused` are not computed again."""
        self._stats.prefix_cache_queries += num_tokens
        self._stats.prefix_cache_hits += reused
        return self.cache.claim(matched)

    def _register_full_blocks(self, sequence: _Sequence) -> None:
        """Offer the blocks `sequence` has filled since the last call to the prefix cache (under
        speculative decoding, once the MTP depth's entries are in them too)."""
        size = self.cache.block_size
        if not self.prefix_caching or sequence.epoch != self.cache.epoch:
            return
        computed = min(sequence.num_computed, sequence.mtp_computed) if self.speculative else sequence.num_computed
        while sequence.num_hashed < computed // size:
            index = sequence.num_hashed
            sequence.last_key = block_key(sequence.last_key, sequence.token_ids[index * size : (index + 1) * size])
            self.cache.register(sequence.table[index], sequence.last_key)
            sequence.num_hashed += 1

    def _match_prefix(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest registered run of `keys`, checked before any reuse: if a
        parameter or buffer of the model was replaced or changed in place since the cache last started
        empty (an optimizer step, `load_state_dict`), every cached block is stale and is dropped.
        Version counters only grow, so a changed model never looks unchanged."""
        matched = self.cache.match_prefix(keys)
        if matched:
            seen = self._weights_signature()
            if seen != self._weights_seen:
                self.cache.reset_prefix_cache()
                self._weights_seen, matched = seen, []
        return matched

    def _weights_signature(self) -> list[tuple[int, int]]:
        """(storage address, version counter) of every parameter and buffer of the model."""
        seen = []
        for tensor in itertools.chain(self.model.parameters(), self.model.buffers()):
            try:
                version = tensor._version
            except RuntimeError:  # an inference tensor: no version counter, changes only inside inference mode
                version = -1
            seen.append((tensor.data_ptr(), version))
        return seen

    def _reserve(self, sequence: _Sequence, end: int, start: int | None = None) -> bool:
        """Make cache positions [start, end) writable for `sequence`, preempting younger sequences if needed.

        Returns False if `sequence` itself had to be preempted.
        """
        start = sequence.num_computed if start is None else start
        if self.cache.writable(sequence.table, start, end):
            return True
        while self.cache.blocks_needed(sequence.table, start, end) > self.cache.num_free_blocks:
            victim = max(self._running, key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is sequence:
                return False
        self.cache.prepare_write(sequence.table, start, end)
        return True

    def _reserve_all(self, sequences: list[_Sequence], span) -> list[_Sequence]:
        """Reserve `span(sequence) = (start, end)` for each still-running sequence, oldest first.

        A reservation only ever preempts sequences younger than the one it serves, so the sequences
        returned all hold their reservation.
        """
        running, writable = set(self._running), self.cache.writable
        pending = [s for s in sequences if s not in running or not writable(s.table, *span(s))]
        if not pending:
            return sequences  # the common decode step: every write lands in a block the sequence owns alone
        for sequence in sorted(pending, key=lambda s: s.arrival):  # those that cross into a new block
            if sequence in self._running:
                start, end = span(sequence)
                self._reserve(sequence, end, start)
        running = set(self._running)  # a reservation may have preempted any younger sequence
        return [s for s in sequences if s in running]

    def _preempt(self, sequence: _Sequence) -> None:
        """Free a sequence's blocks and queue it first in line; it is recomputed from its tokens later."""
        self._running.remove(sequence)
        self.cache.release(sequence.table)
        sequence.num_computed = sequence.mtp_computed = sequence.num_hashed = 0
        sequence.last_key = sequence.root_key
        sequence.pending_hidden = None
        self._waiting.appendleft(sequence)
        self._stats.preemptions += 1

    # ----- forwards ------------------------------------------------------------------------------
    def _batch(self, sequences: list[_Sequence], tokens: list[list[int]], starts: list[int]):
        """Left-pad token lists into [batch, seq] ids, positions and a validity mask; bind the cache slots."""
        width = max(len(t) for t in tokens)
        padding = [width - len(t) for t in tokens]
        if width == 1:  # a decode step (flat lists convert to tensors twice as fast as nested ones)
            ids = long_tensor([t[0] for t in tokens], self.device).view(-1, 1)
            positions = long_tensor(starts, self.device).view(-1, 1)
        else:
            ids = torch.tensor([[0] * pad + t for pad, t in zip(padding, tokens, strict=True)], device=self.device)
            positions = torch.tensor(
                [[0] * pad + list(range(start, start + width - pad)) for pad, start in zip(padding, starts, strict=True)],
                device=self.device,
            )
        valid = None
        if any(padding):  # padding tokens write to the cache's null block
            valid = torch.tensor([[False] * pad + [True] * (width - pad) for pad in padding], device=self.device)
        write = None
        if width <= 1 + self.num_speculative_tokens:  # decode and verify steps: their few slots as ints
            write = []
            for sequence, start, pad in zip(sequences, starts, padding, strict=True):
                write += [NULL_BLOCK * self.cache.block_size] * pad
                write += self.cache.slots_of(sequence.table, start, width - pad)
        kv_length = max(start + len(t) for start, t in zip(starts, tokens, strict=True))
        self.cache.bind([s.table for s in sequences], positions, valid, write, kv_length)
        return ids, positions

    def _forward(self, sequences: list[_Sequence], tokens: list[list[int]], logits_to_keep: int) -> ModelOutput:
        ids, positions = self._batch(sequences, tokens, [s.num_computed for s in sequences])
        return self.model(ids, positions=positions, cache=self.cache, absorb=self.absorb, logits_to_keep=logits_to_keep)

    def _mtp_forward(self, sequences: list[_Sequence], next_ids: list[list[int]], starts: list[int],
                     hidden: list[torch.Tensor]) -> torch.Tensor:
        """The MTP depth over left-padded rows; returns its hidden state at each row's last position [b, hidden]."""
        ids, positions = self._batch(sequences, next_ids, starts)
        width = ids.shape[1]
        if all(row_hidden.shape[0] == width for row_hidden in hidden):  # no padding (every decode step)
            previous = torch.stack(hidden)
        else:
            previous = torch.zeros(*ids.shape, self.config.hidden_size, dtype=hidden[0].dtype, device=self.device)
            for row, row_hidden in enumerate(hidden):
                previous[row, width - row_hidden.shape[0] :] = row_hidden
        return mtp_forward(self.model, self.cache, ids, previous, positions)[:, -1]

    def _run_prefill(self, chunks: dict[_Sequence, int]) -> list[StreamEvent]:
        sequences = list(chunks)
        tokens = [s.token_ids[s.num_computed : s.num_computed + chunks[s]] for s in sequences]
        output = self._forward(sequences, tokens, logits_to_keep=1)
        width = output.hidden_states.shape[1]
        for row, sequence in enumerate(sequences):
            count = chunks[sequence]
            self._stats.prompt_tokens += count
            sequence.num_computed += count
            if self.speculative:
                self._add_pending_hidden(sequence, output.hidden_states[row, width - count :])
        if self.speculative:
            self._mtp_catch_up(sequences, keep_last=True)
        for sequence in sequences:
            self._register_full_blocks(sequence)
        done = [row for row, s in enumerate(sequences) if s.num_pending == 0]
        if not done:
            return []
        samplers, logit_rows = [], []
        for row in done:
            leader = sequences[row]
            for follower in leader.followers:
                follower.table = self.cache.fork(leader.table)
                follower.num_computed, follower.mtp_computed = leader.num_computed, leader.mtp_computed
                follower.num_hashed, follower.last_key, follower.epoch = leader.num_hashed, leader.last_key, leader.epoch
                follower.pending_hidden = leader.pending_hidden
                self._running.append(follower)
            samplers += [leader, *leader.followers]
            logit_rows += [row] * leader.group_size
            leader.followers = []
        logits = output.logits[torch.tensor(logit_rows, device=self.device), -1]
        return self._sample_and_append(samplers, logits)

    def _run_decode(self, sequences: list[_Sequence]) -> list[StreamEvent]:
        sequences = self._reserve_all(sequences, lambda s: (s.num_computed, s.num_computed + 1))
        if not sequences:
            return []
        output = self._forward(sequences, [[s.token_ids[-1]] for s in sequences], logits_to_keep=1)
        size = self.cache.block_size
        for sequence in sequences:
            sequence.num_computed += 1
            if sequence.num_computed % size == 0:
                self._register_full_blocks(sequence)
        return self._sample_and_append(sequences, output.logits[:, -1])

    # ----- sampling and output ---------------------------------------------------------------------
    def _sample_and_append(self, sequences: list[_Sequence], logits: torch.Tensor) -> list[StreamEvent]:
        """Sample one token per sequence from `logits` [rows, vocab] and append it."""
        params = [s.params for s in sequences]
        if greedy_only(params):
            tokens, logprobs = greedy_tokens(logits), [None] * len(sequences)
        else:
            tokens, logprobs = sample(logits, params, [s.penalties for s in sequences], [s.random for s in sequences])
        events = []
        quiet = 0
        for s, token, entry in zip(sequences, tokens, logprobs, strict=True):
            if (s.quiet_stops is not None and token not in s.quiet_stops and len(s.token_ids) + 1 < s.quiet_limit
                    and (entry is None or entry[1] is None)):
                # the token cannot end a quiet request: record it as `_append` would, without its calls
                # (a 64-completion rollout makes 4,000 of them)
                s.token_ids.append(token)
                if s.tracker.deferred is not None:
                    s.tracker.deferred.append(token)
                s.completion.token_ids.append(token)
                if entry is not None:
                    if s.completion.logprobs is None:
                        s.completion.logprobs = []
                    s.completion.logprobs.append(entry[0])
                quiet += 1
            elif (event := self._append(s, [token], None if entry is None else [entry])) is not None:
                events.append(event)
        self._stats.generation_tokens += quiet
        return events

    def _append(self, sequence: _Sequence, tokens: list[int], logprobs: list | None) -> StreamEvent | None:
        """Add sampled tokens to a sequence, apply every stop rule, and publish the event (None: the
        request is not streamed and goes on, so its tokens were only recorded)."""
        params = sequence.params
        added: list[int] = []
        finish, stop_reason = None, None
        for token in tokens:
            added.append(token)
            sequence.token_ids.append(token)
            if sequence.penalties is not None:
                sequence.penalties.add(token)
            if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
                finish, stop_reason = FINISH_STOP, token
                break
            matched = sequence.tracker.feed(token)
            if matched is not None:
                finish, stop_reason = FINISH_STOP, matched
                break
            if sequence.num_generated >= sequence.max_tokens or len(sequence.token_ids) >= self.max_model_len:
                finish = FINISH_LENGTH
                break
        self._stats.generation_tokens += len(added)
        if finish is not None and not isinstance(stop_reason, str):  # the text ends here: release held bytes
            matched = sequence.tracker.flush()
            if matched is not None:
                finish, stop_reason = FINISH_STOP, matched
        if finish is None and not sequence.handle.streamed:  # nobody reads the event: record the tokens only
            sequence.handle._record(sequence.index, added, None if logprobs is None else logprobs[: len(added)])
            return None
        event = StreamEvent(
            sequence.handle.request_id, sequence.index, sequence.tracker.take(final=finish is not None), added,
            prompt_tokens=sequence.prompt_length, completion_tokens=sequence.num_generated,
        )
        if logprobs is not None:
            entries = logprobs[: len(added)]
            event.logprobs = [chosen for chosen, _ in entries]
            if params.logprobs:
                event.top_logprobs = [top for _, top in entries]
        if finish is not None:
            self._finish(sequence, finish, stop_reason, event)
        else:
            sequence.handle._publish(event)
        return event

    def _finish(self, sequence: _Sequence, reason: str, stop_reason=None, event: StreamEvent | None = None,
                error: str | None = None) -> None:
        """End a sequence: free its blocks, publish the final event, forget the request id when all are done."""
        if sequence.finished:
            return
        sequence.finished = True
        if sequence in self._running:
            self._running.remove(sequence)
        elif sequence in self._waiting:
            self._waiting.remove(sequence)
        for follower in sequence.followers:  # siblings still waiting for this sequence's prefill
            self._finish(follower, reason, error=error)
        sequence.followers = []
        self.cache.release(sequence.table)
        sequence.pending_hidden = None
        if event is None:
            event = StreamEvent(sequence.handle.request_id, sequence.index, sequence.tracker.take(final=True), [],
                                prompt_tokens=sequence.prompt_length, completion_tokens=sequence.num_generated)
        event.finish_reason, event.stop_reason, event.error = reason, stop_reason, error
        self._stats.finished[reason] = self._stats.finished.get(reason, 0) + 1
        handle = sequence.handle
        handle._publish(event)
        if handle.finished:
            with self._ids_lock:
                self._active_ids.discard(handle.request_id)

    # ----- speculative decoding --------------------------------------------------------------------
    def _add_pending_hidden(self, sequence: _Sequence, hidden: torch.Tensor) -> None:
        previous = sequence.pending_hidden
        sequence.pending_hidden = hidden.clone() if previous is None else torch.cat((previous, hidden))

    def _mtp_catch_up(self, sequences: list[_Sequence], keep_last: bool) -> torch.Tensor | None:
        """Feed the MTP depth every position whose main hidden state and next token are known.

        With `keep_last` the newest position stays pending (prefill: the decode step drafts from it).
        Returns the depth's hidden state at each sequence's last fed position [b, hidden].
        """
        rows = [s for s in sequences if s.num_computed - s.mtp_computed > keep_last]
        if not rows:
            return None
        counts = [s.num_computed - s.mtp_computed - keep_last for s in rows]
        next_ids = [s.token_ids[s.mtp_computed + 1 : s.mtp_computed + 1 + c] for s, c in zip(rows, counts, strict=True)]
        hidden = [s.pending_hidden[:c] for s, c in zip(rows, counts, strict=True)]
        out = self._mtp_forward(rows, next_ids, [s.mtp_computed for s in rows], hidden)
        for sequence, count in zip(rows, counts, strict=True):
            sequence.mtp_computed += count
            sequence.pending_hidden = sequence.pending_hidden[count:]
        return out

    def _run_speculative(self, sequences: list[_Sequence]) -> list[StreamEvent]:
        """One draft-and-verify step for decoding sequences (those without MTP history decode plainly).

        Greedy batches compare argmaxes only; otherwise drafts are sampled from the MTP distribution
        and accepted by speculative sampling (speculative.py), each row with its own random stream.
        """
        k = self.num_speculative_tokens
        sequences = self._reserve_all(sequences, lambda s: (s.mtp_computed, s.num_computed + 1 + k))
        if not sequences:
            return []
        greedy = greedy_only([s.params for s in sequences])
        drafts: dict[_Sequence, list[int]] = {s: [] for s in sequences}
        draft_probs: dict[_Sequence, list[torch.Tensor]] = {s: [] for s in sequences}
        drafters = [s for s in sequences if s.mtp_computed < s.num_computed]
        if drafters:
            hidden = self._mtp_catch_up(drafters, keep_last=False)
            for depth in range(k):
                logits = self.model.lm_head(hidden).float()
                if greedy:
                    tokens = greedy_tokens(logits)
                else:
                    states = [self._penalties_after(s, drafts[s]) for s in drafters]
                    probs = sampling_probs(logits, [s.params for s in drafters], states)
                    tokens = draw(probs, uniforms([s.random for s in drafters], self.device)).tolist()
                    for row, sequence in enumerate(drafters):
                        draft_probs[sequence].append(probs[row])
                for sequence, token in zip(drafters, tokens, strict=True):
                    drafts[sequence].append(token)
                if depth + 1 < k:
                    starts = [s.num_computed + depth for s in drafters]
                    hidden = self._mtp_forward(drafters, [[t] for t in tokens], starts, [h[None] for h in hidden])
        output = self._forward(sequences, [[s.token_ids[-1], *drafts[s]] for s in sequences], logits_to_keep=1 + k)
        width = output.logits.shape[1]
        targets = greedy_tokens(output.logits) if greedy else None
        events = []
        for row, sequence in enumerate(sequences):
            row_drafts = drafts[sequence]
            count = 1 + len(row_drafts)
            logits = output.logits[row, width - count :].float()
            if greedy:
                target = targets[row][width - count :]
                accepted = next((j for j, token in enumerate(row_drafts) if token != target[j]), len(row_drafts))
                emitted = row_drafts[:accepted] + [target[accepted]]
            else:
                states = [self._penalties_after(sequence, row_drafts[:j]) for j in range(count)]
                probs = sampling_probs(logits, [sequence.params] * count, states)
                if row_drafts:
                    emitted, accepted = accept_drafts(probs, torch.stack(draft_probs[sequence]), row_drafts, sequence.random)
                else:
                    emitted, accepted = draw(probs, uniforms([sequence.random], self.device)).tolist(), 0
            if row_drafts:
                self._stats.spec_verify_steps += 1
                self._stats.spec_draft_tokens += len(row_drafts)
                self._stats.spec_accepted_tokens += accepted
            hidden_rows = output.hidden_states[row, output.hidden_states.shape[1] - count :]
            self._add_pending_hidden(sequence, hidden_rows[: 1 + accepted])
            sequence.num_computed += 1 + accepted
            entries = None
            if sequence.params.logprobs is not None:  # never greedy_only: `probs` is the target distribution
                used = len(emitted)
                chosen = torch.tensor(emitted, device=self.device)
                entries = token_logprobs(logits[:used], probs[:used], chosen, [sequence.params] * used)
            self._register_full_blocks(sequence)  # before `_append`, which may finish it and free its blocks
            event = self._append(sequence, emitted, entries)
            if event is not None:
                events.append(event)
        return events

    def _penalties_after(self, sequence: _Sequence, drafts: list[int]) -> PenaltyState | None:
        if sequence.penalties is None or not drafts:
            return sequence.penalties
        return sequence.penalties.with_tokens(drafts)
