"""Prefix caching: the nanoseek engine with automatic prefix caching against the same engine without it.

Two workloads on the shared `qwen2-small` config (random weights, fp32, greedy, EOS ignored), requests
sent one after another as a chat server receives them:
  system_prompt   `--requests` requests sharing a `--system-tokens`-token system prompt, each with its
                  own `--question-tokens`-token question and `--max-tokens` new tokens; headline:
                  mean time to first token (the prefill the cache saves)
  multi_turn      one conversation of `--turns` turns: each prompt is the previous prompt, its answer
                  and a new `--question-tokens`-token message; seconds for the whole conversation
The sides alternate for `--repeats` rounds (each round on a fresh engine: the cache starts cold, and
the first system-prompt request pays the full prefill on both sides); medians. Tokens are asserted
identical. Prints one JSON line: ours = with prefix caching, baseline = without.

    python benchmarks/prefix_cache.py [--requests 8] [--system-tokens 512] [--turns 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nanoseek import ModelConfig
from nanoseek.infer import Engine, SamplingParams
from nanoseek.model import build_model


def timed_request(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[float, float, list[int]]:
    """(seconds to the first token, seconds to the end, token ids) of one streamed request."""
    start, first, tokens = time.perf_counter(), None, []
    for event in engine.stream(prompt, params):
        if event.token_ids and first is None:
            first = time.perf_counter() - start
        tokens += event.token_ids
    return first, time.perf_counter() - start, tokens


def system_prompt_workload(engine: Engine, prompts: list[list[int]], params: SamplingParams):
    """(mean seconds to first token, token ids of every request)."""
    results = [timed_request(engine, prompt, params) for prompt in prompts]
    return statistics.mean(first for first, _, _ in results), [tokens for _, _, tokens in results]


def multi_turn_workload(engine: Engine, system: list[int], messages: list[list[int]], params: SamplingParams):
    """(seconds for the whole conversation, the answers)."""
    start, history, answers = time.perf_counter(), list(system), []
    for message in messages:
        history += message
        _, _, answer = timed_request(engine, history, params)
        answers.append(answer)
        history += answer
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen2-small")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_preset(args.config)
    model = build_model(config, seed=0).eval()
    generator = torch.Generator().manual_seed(0)

    def random_tokens(count: int) -> list[int]:
        return torch.randint(2, config.vocab_size, (count,), generator=generator).tolist()

    system = random_tokens(args.system_tokens)
    prompts = [system + random_tokens(args.question_tokens) for _ in range(args.requests)]
    messages = [random_tokens(args.question_tokens) for _ in range(args.turns)]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    context = args.system_tokens + args.turns * (args.question_tokens + args.max_tokens) + 16

    results: dict[bool, dict[str, list]] = {on: {"ttft": [], "turns": [], "hits": [], "queries": []} for on in (True, False)}
    tokens: dict[bool, tuple] = {}
    for _ in range(args.repeats):  # alternate: the load of a shared machine drifts
        for caching in (True, False):
            engine = Engine(model, max_model_len=context, max_num_seqs=4, prefix_caching=caching)
            ttft, system_tokens = system_prompt_workload(engine, prompts, params)
            seconds, answers = multi_turn_workload(engine, system, messages, params)
            stats = engine.stats
            results[caching]["ttft"].append(ttft)
            results[caching]["turns"].append(seconds)
            results[caching]["hits"].append(stats.prefix_cache_hits)
            results[caching]["queries"].append(stats.prefix_cache_queries)
            tokens[caching] = (system_tokens, answers)
    identical = tokens[True] == tokens[False]
    ours, theirs = (statistics.median(results[on]["ttft"]) for on in (True, False))
    ours_turns, theirs_turns = (statistics.median(results[on]["turns"]) for on in (True, False))
    print(json.dumps({
        "bench": "prefix_cache_ttft", "ours": round(ours, 4), "baseline": round(theirs, 4),
        "ratio": round(theirs / ours, 2), "unit": "s mean time to first token (median of rounds)",
        "baseline_name": "the same engine with prefix_caching=False", "config": args.config,
        "threads": torch.get_num_threads(),
        "notes": {"identical_tokens": identical, "requests": args.requests, "system_tokens": args.system_tokens,
                  "question_tokens": args.question_tokens, "max_tokens": args.max_tokens,
                  "hit_rate": round(results[True]["hits"][-1] / max(results[True]["queries"][-1], 1), 3),
                  "multi_turn_seconds": {"ours": round(ours_turns, 3), "baseline": round(theirs_turns, 3),
                                         "ratio": round(theirs_turns / ours_turns, 2), "turns": args.turns}},
    }))
    if not identical:
        raise SystemExit("prefix caching changed the tokens")


if __name__ == "__main__":
    main()
