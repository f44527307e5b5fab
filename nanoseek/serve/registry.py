"""The model manager: several models served at once, loaded, unloaded and switched at run time.

Each model name maps to a checkpoint directory and, once loaded, to a `Deployment`: an engine running
in its own thread, its tokenizer, and the sequences it is serving. Requests route by the `model`
field; a registered model that is not loaded is loaded on demand (Ollama's behaviour), and requests
for it wait for the load. Loading a different checkpoint under a loaded name switches it: the new
engine takes new requests as soon as it is ready while the old one finishes its in-flight requests
and is then closed, so nothing is dropped. Unloading retires the engine the same way.

Checkpoints are only loaded from the configured model roots: a path (absolute, or relative to a
root) is resolved with symlinks followed and refused unless it lies inside a root.

Back-pressure: a deployment accepts `max_num_seqs + max_queued_requests` sequences in flight; beyond
that a request gets a 503 with Retry-After instead of waiting in an unbounded queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.checkpoint import load_pretrained
from nanoseek.errors import NanoseekError
from nanoseek.infer import Engine
from nanoseek.serve.protocol import ModelCard, ServeError, busy
from nanoseek.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
MODEL_NAME = re.compile(r"[A-Za-z0-9][\w.:/-]{0,127}")


async def in_own_thread(function, *args):
    """`function(*args)` in a thread of its own that ends with it, for torch work outside the engines.

    A thread that runs torch's parallel ops keeps an OpenMP thread pool for as long as it lives (so a
    worker of asyncio's default executor would keep one). Once the pooled OpenMP threads outnumber the
    CPUs, libgomp stops spinning between parallel regions, and every region of every engine step pays
    a sleep and a wake-up: a 400-token stream from `small` took 3.2 s through the server against 2.1 s
    from the engine alone (2 cores). A thread that exits frees its pool.
    """
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoseek-work")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(function, *args))
    finally:
        executor.shutdown(wait=False)


@dataclass
class EngineSettings:
    """How every model's engine is built (the serve command's flags)."""

    max_model_len: int | None = None
    max_num_seqs: int = 64
    cache_memory: int | None = None  # bytes
    speculative: bool = False
    num_speculative_tokens: int = 1
    prefix_caching: bool = True
    device: str | None = None
    dtype: str | None = None
    max_queued_requests: int = 256  # sequences waiting beyond max_num_seqs before requests get a 503


class Deployment:
    """One loaded checkpoint: its engine and tokenizer, and the sequences in flight on it."""

    def __init__(self, name: str, path: Path, engine: Engine, tokenizer: Tokenizer, thinking: bool,
                 max_queued_requests: int):
        self.name = name
        self.path = path
        self.engine = engine
        self.tokenizer = tokenizer
        self.thinking = thinking
        self.capacity = engine.max_num_seqs + max_queued_requests
        self.in_flight = 0  # sequences (a request with n=4 holds 4)
        self.last_used = time.time()
        self.retired = False  # no new requests; closed once in_flight reaches 0
        self.idle = asyncio.Event()
        self.idle.set()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def reserve(self, prompts: int, n: int) -> Lease:
        """Hold room for `prompts` x `n` sequences until the lease is released; a 503 when full or
        retiring, a 400 when more than the model ever holds at once (no retry could serve it)."""
        sequences = prompts * n
        if sequences > self.capacity:
            raise ServeError(400, f"{prompts} prompt(s) x n={n} is {sequences} sequences, more than the "
                             f"{self.capacity} this model holds at once (running and queued); send fewer prompts "
                             "per request", param="prompt")
        if self.retired:
            raise busy(f"model {self.name!r} is being unloaded or switched; retry")
        if self.in_flight + sequences > self.capacity:
            raise busy(f"model {self.name!r} has {self.in_flight} sequences in flight and its queue is full; "
                       "retry shortly")
        self.in_flight += sequences
        self.idle.clear()
        return Lease(self, sequences)

    def _release(self, n: int) -> None:
        self.in_flight -= n
        self.last_used = time.time()
        if self.in_flight == 0:
            self.idle.set()


class Lease:
    """Room for some sequences on a deployment; `release()` (idempotent) gives it back."""

    def __init__(self, deployment: Deployment, n: int):
        self.deployment = deployment
        self.n = n

    def release(self) -> None:
        if self.n:
            self.deployment._release(self.n)
            self.n = 0


@dataclass
class ModelEntry:
    name: str
    path: Path
    thinking: bool
    created: int
    state: str = "unloaded"  # unloaded | loading | loaded | switching | failed
    deployment: Deployment | None = None
    error: str | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # serializes load, switch and unload


class ModelManager:
    """Route requests to models by name; load, unload and switch them; unload idle ones.

    roots: directories checkpoints may be loaded from (the serve command defaults them to the
    directories of its --model flags). idle_unload: seconds without requests after which a model is
    unloaded (None = never); it is loaded again by the next request for it.
    """

    def __init__(self, roots: Sequence[str | Path], settings: EngineSettings | None = None,
                 idle_unload: float | None = None):
        self.roots = [Path(root).resolve() for root in roots]
        self.settings = settings or EngineSettings()
        self.idle_unload = idle_unload
        self.entries: dict[str, ModelEntry] = {}
        self._tasks: set[asyncio.Task] = set()
        self._retiring: set[Deployment] = set()
        self._reaper: asyncio.Task | None = None

    # ----- configuration -------------------------------------------------------------------------
    def resolve_path(self, path: str | Path) -> Path:
        """The checkpoint directory `path` names, resolved inside a model root; a 403/400 otherwise."""
        candidate = Path(path).expanduser()
        candidates = [candidate] if candidate.is_absolute() else [root / candidate for root in self.roots]
        for option in candidates:
            try:
                resolved = option.resolve()
            except (OSError, RuntimeError):  # a symlink loop, an unreadable component
                continue
            if any(resolved.is_relative_to(root) for root in self.roots):
                if not (resolved / "config.json").is_file():
                    raise ServeError(400, f"{path} is not a checkpoint directory (no config.json)", param="path")
                return resolved
        raise ServeError(403, f"{path} is outside the model roots this server may load from", param="path")

    def register(self, name: str, path: str | Path, thinking: bool = False) -> ModelEntry:
        """Add a model name (not loaded yet). Raises `ServeError` for a bad name or path."""
        if not MODEL_NAME.fullmatch(name):
            raise ServeError(400, f"invalid model name {name!r}: use letters, digits and . _ - : / "
                             "(at most 128 characters)", param="model")
        if name in self.entries:
            raise ServeError(400, f"model {name!r} is already registered", param="model")
        entry = ModelEntry(name, self.resolve_path(path), thinking, int(time.time()))
        self.entries[name] = entry
        return entry

    def entry(self, name: str) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self.entries)) or "none"
            raise ServeError(404, f"the model {name!r} does not exist (served models: {known})", param="model")
        return entry

    def cards(self) -> list[ModelCard]:
        return [self.card(entry) for entry in self.entries.values()]

    def card(self, entry: ModelEntry) -> ModelCard:
        deployment = entry.deployment
        expires = None
        if deployment is not None and self.idle_unload is not None and deployment.in_flight == 0:
            expires = int(deployment.last_used + self.idle_unload)
        return ModelCard(id=entry.name, created=entry.created, state=entry.state, thinking=entry.thinking,
                         max_model_len=deployment.max_model_len if deployment else None,
                         expires_at=expires, error=entry.error)

    def deployments(self) -> list[Deployment]:
        return [entry.deployment for entry in self.entries.values() if entry.deployment is not None]

    # ----- routing -------------------------------------------------------------------------------
    async def get(self, name: str) -> Deployment:
        """The deployment serving `name`, loading it first if needed (404 unknown, 503 failed load)."""
        entry = self.entry(name)
        if entry.deployment is None:
            await self.load(name)
        if entry.deployment is None:  # unloaded again while this request waited
            raise busy(f"model {name!r} was unloaded while loading; retry")
        return entry.deployment

    # ----- admin ---------------------------------------------------------------------------------
    async def load(self, name: str, path: str | None = None, thinking: bool | None = None) -> ModelCard:
        """Load a model (registering `name` if `path` is given and it is new).

        With a `path` other than the loaded one this is a switch: the new checkpoint serves new
        requests once loaded, the old engine finishes its requests and closes.
        """
        if name not in self.entries and path is not None:
            self.register(name, path, bool(thinking))
        entry = self.entry(name)
        new_path = self.resolve_path(path) if path is not None else entry.path
        async with entry.lock:
            if entry.deployment is not None and new_path == entry.path:
                if thinking is not None:
                    entry.thinking = entry.deployment.thinking = thinking
                return self.card(entry)
            old = entry.deployment
            entry.state = "switching" if old is not None else "loading"
            thinking = entry.thinking if thinking is None else thinking
            try:
                deployment = await in_own_thread(self._build, name, new_path, thinking)
            except Exception as error:
                if not isinstance(error, NanoseekError):
                    logger.exception("loading model %s from %s failed", name, new_path)
                entry.state, entry.error = ("loaded" if old is not None else "failed"), str(error)
                raise ServeError(400 if path is not None else 503, f"cannot load model {name!r}: {error}",
                                 param="path" if path is not None else None) from None
            entry.deployment, entry.path, entry.thinking = deployment, new_path, thinking
            entry.state, entry.error = "loaded", None
            if old is not None:
                self._spawn(self._retire(old))
            logger.info("model %s loaded from %s", name, new_path)
            return self.card(entry)

    async def unload(self, name: str) -> ModelCard:
        """Stop routing to a model; its engine closes once its in-flight requests have finished."""
        entry = self.entry(name)
        async with entry.lock:
            if entry.deployment is not None:
                old, entry.deployment, entry.state = entry.deployment, None, "unloaded"
                await self._retire(old)
                logger.info("model %s unloaded", name)
            return self.card(entry)

    def _build(self, name: str, path: Path, thinking: bool) -> Deployment:
        settings = self.settings
        model = load_pretrained(path, dtype=settings.dtype, device=settings.device)
        tokenizer = Tokenizer.from_pretrained(path)
        engine = Engine(model, tokenizer, max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                        cache_memory=settings.cache_memory, speculative=settings.speculative,
                        num_speculative_tokens=settings.num_speculative_tokens,
                        prefix_caching=settings.prefix_caching).start()
        return Deployment(name, path, engine, tokenizer, thinking, settings.max_queued_requests)

    async def _retire(self, deployment: Deployment) -> None:
        deployment.retired = True
        self._retiring.add(deployment)
        await deployment.idle.wait()
        await asyncio.to_thread(deployment.engine.close)
        self._retiring.discard(deployment)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----- lifetime ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load every registered model, then start unloading idle ones (if configured)."""
        for name in list(self.entries):
            await self.load(name)
        if self.idle_unload is not None:
            self._reaper = asyncio.get_running_loop().create_task(self._unload_idle())

    async def _unload_idle(self) -> None:
        period = min(max(self.idle_unload / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period)
            now = time.time()
            for entry in list(self.entries.values()):
                deployment = entry.deployment
                if (deployment is not None and deployment.in_flight == 0 and not entry.lock.locked()
                        and now - deployment.last_used >= self.idle_unload):
                    try:
                        await self.unload(entry.name)
                    except Exception:  # keep watching the other models
                        logger.exception("unloading idle model %s failed", entry.name)

    async def close(self) -> None:
        """Cancel the reaper and close every engine (requests still running end as cancelled)."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for task in list(self._tasks):
            task.cancel()
        engines = [d.engine for d in [*self.deployments(), *self._retiring]]
        for entry in self.entries.values():
            entry.deployment, entry.state = None, "unloaded"
        for engine in engines:
            await asyncio.to_thread(engine.close)
