"""Serving under load: N concurrent streaming clients against `nanoseek serve`, and the same work offline.

Model: preset `small` (../shared/bench/small.json, random weights) with a 32,000-token BPE trained
here on generated text (pseudo-words plus generated tasks), saved once under runs/bench-serve-small.
The server runs as a subprocess (`nanoseek serve`, loopback only). Each of N clients streams
/v1/completions requests back to back (a 32-token prompt, 32 new tokens, EOS ignored, temperature 1
with a per-request seed) until its request budget or the time limit is spent. The requests the
server completed are then submitted to an `Engine` in this process with the same settings,
and their texts must match (the seeds make sampling reproducible).

Server and offline runs alternate (--repeats each; medians reported). One JSON line per concurrency:
{"bench": "serve_load_c{N}", "ours": server tok/s, "baseline": offline tok/s, "ratio" (target >= 0.8),
"unit", "config", "threads", "notes": {requests, errors (must be 0), p50/p99 time to first token and
inter-token latency in seconds, identical_outputs}}.

    python benchmarks/serve_load.py [--clients 16 32 64] [--requests-per-client 2] [--seconds 120] [--repeats 3]
                                    [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from nanoseek import ModelConfig
from nanoseek.checkpoint import load_pretrained
from nanoseek.data.tasks import task_documents
from nanoseek.infer import Engine, SamplingParams
from nanoseek.model import build_model
from nanoseek.serve.registry import in_own_thread
from nanoseek.tokenizer import Tokenizer

CHECKPOINT = Path("runs/bench-serve-small")
PROMPT_TOKENS, NEW_TOKENS, MAX_MODEL_LEN, MAX_NUM_SEQS = 32, 32, 512, 64


def checkpoint() -> Path:
    """The small preset with random weights and a 32k tokenizer trained on generated text (built once)."""
    if (CHECKPOINT / "tokenizer.json").is_file():
        return CHECKPOINT
    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "sh", "ch", "qu", "ng"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(60000)]
    documents = [" ".join(rng.choice(words) for _ in range(200)) for _ in range(3000)] + task_documents(2000, seed=0)
    config = ModelConfig.from_preset("small")
    tokenizer = Tokenizer.train(documents, vocab_size=config.vocab_size)
    build_model(config, seed=0).save_pretrained(CHECKPOINT)
    tokenizer.save_pretrained(CHECKPOINT)
    return CHECKPOINT


def prompts(tokenizer: Tokenizer, count: int) -> list[list[int]]:
    documents = task_documents(count, seed=1)
    return [tokenizer.encode(document, add_special_tokens=True)[:PROMPT_TOKENS] for document in documents]


@dataclass
class Result:
    prompt: int
    text: str = ""
    tokens: int = 0
    first_token: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str | None = None


async def stream_one(client: httpx.AsyncClient, prompt_number: int, prompt: list[int]) -> Result:
    result = Result(prompt_number)
    body = {"model": "small", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 1.0, "seed": prompt_number,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    started = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                elif chunk["choices"] and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    if result.first_token is None:
                        result.first_token = now - started
                    else:
                        result.gaps.append(now - last)
                    last = now
                    result.text += chunk["choices"][0]["text"]
                elif chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


async def load(url: str, all_prompts: list[list[int]], clients: int, requests_per_client: int,
               seconds: float) -> tuple[list[Result], float]:
    """Every client streams its requests back to back until its budget or the deadline; (results, seconds)."""
    deadline = time.perf_counter() + seconds
    queue = iter(range(clients * requests_per_client))
    results: list[Result] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        for number in queue:
            if time.perf_counter() > deadline:
                return
            results.append(await stream_one(client, number, all_prompts[number]))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return results, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0], 4)


def start_server(directory: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "nanoseek", "serve", "--model", f"small={directory}", "--host", "127.0.0.1",
               "--port", str(port), "--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN),
               "--max-queued-requests", "1024", "--log-level", "warning"]
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    server = subprocess.Popen(command, env=environment)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def offline(engine: Engine, all_prompts: list[list[int]], numbers: list[int]) -> tuple[dict[int, str], float]:
    """The same requests submitted at once to an engine that runs as many together as there were clients,
    stepping in its background thread as in the server.

    (Stepping in the main thread instead is no fair baseline on a busy 2-core machine: there torch's two
    OpenMP threads ran 10x slower than the engine thread's.)
    """
    started = time.perf_counter()
    handles = {number: engine.submit(all_prompts[number], SamplingParams(
        max_tokens=NEW_TOKENS, temperature=1.0, seed=number, ignore_eos=True)) for number in numbers}
    texts = {number: handle.result().outputs[0].text for number, handle in handles.items()}
    return texts, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=120, help="no new requests after this long (per row)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the server and the offline engine (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3, help="server and offline runs per row (medians reported)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = checkpoint()
    tokenizer = Tokenizer.from_pretrained(directory)
    all_prompts = prompts(tokenizer, max(args.clients) * args.requests_per_client)
    # Torch work in this main thread would give it an OpenMP pool and slow the offline engines' threads
    # (see nanoseek.serve.registry.in_own_thread): models and engines are built as the server builds them.
    model = asyncio.run(in_own_thread(load_pretrained, directory))
    server, url = start_server(directory, args.threads)
    try:
        asyncio.run(load(url, all_prompts, 1, 1, args.seconds))  # warm-up
        ok = True
        for clients in args.clients:
            server_runs, offline_runs, identical = [], [], True
            for _ in range(args.repeats):  # alternately, so that load from elsewhere hits both sides alike
                results, seconds = asyncio.run(load(url, all_prompts, clients, args.requests_per_client, args.seconds))
                done = [r for r in results if r.error is None]
                server_runs.append((sum(r.tokens for r in done) / seconds, seconds, results))
                build = functools.partial(Engine, model, tokenizer, max_num_seqs=clients, max_model_len=MAX_MODEL_LEN)
                with asyncio.run(in_own_thread(build)).start() as engine:
                    expected, offline_seconds = offline(engine, all_prompts, [r.prompt for r in done])
                offline_runs.append((len(done) * NEW_TOKENS / offline_seconds, offline_seconds))
                identical = identical and all(r.text == expected[r.prompt] for r in done)
            ours, server_seconds, results = sorted(server_runs, key=lambda run: run[0])[len(server_runs) // 2]
            baseline, offline_seconds = sorted(offline_runs)[len(offline_runs) // 2]
            done = [r for r in results if r.error is None]
            errors = sum(len(run[2]) - sum(r.error is None for r in run[2]) for run in server_runs)
            ok = ok and errors == 0 and identical
            notes = {"requests": len(results), "errors": errors, "repeats": args.repeats, "identical_outputs": identical,
                     "ttft_p50_s": percentile([r.first_token for r in done if r.first_token is not None], 50),
                     "ttft_p99_s": percentile([r.first_token for r in done if r.first_token is not None], 99),
                     "itl_p50_s": percentile([g for r in done for g in r.gaps], 50),
                     "itl_p99_s": percentile([g for r in done for g in r.gaps], 99),
                     "server_seconds": round(server_seconds, 2), "offline_seconds": round(offline_seconds, 2),
                     "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "target_ratio": 0.8,
                     "first_error": next((r.error for r in results if r.error), None)}
            row = {"bench": f"serve_load_c{clients}", "ours": round(ours, 3), "baseline": round(baseline, 3),
                   "ratio": round(ours / baseline, 3), "unit": "tok/s", "config": "small (random weights)",
                   "threads": torch.get_num_threads(), "notes": notes}
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
