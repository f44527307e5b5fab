"""`nanoseek eval`: task accuracy, pass@k, maj@k and format rate on held-out tasks; perplexity on shards.

    nanoseek eval --model runs/grpo/checkpoints/step_00000200 --count 200 --samples 8
    nanoseek eval --model DIR --tasks countdown --difficulty 1 2 --data data/shards

Task metrics are measured on the test split of the built-in tasks (`nanoseek.data.tasks`, disjoint
from training by content hash), generated through the inference engine:

    accuracy     greedy decoding, the task's checker (what SFT and GRPO runs log as `val_accuracy`)
    format_rate  greedy completions that are `<think>...</think><answer>...</answer>` exactly once
    pass@1, pass@k, maj@k   from k samples per problem at `temperature`: pass@k by the unbiased
                 estimator 1 - C(n-c, k) / C(n, k) (Chen et al. 2021, Codex); maj@k scores the most
                 frequent extracted answer (self-consistency, Wang et al. 2022; R1's cons@64)

Prints one JSON line. Used by SFT and GRPO for held-out evaluation and by the pipeline's report.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nanoseek.data.loader import PretrainLoader
from nanoseek.data.tasks import (
    DIFFICULTIES,
    TASKS,
    Problem,
    check_answer,
    check_format,
    extract_answer,
    make_mixed_problems,
)
from nanoseek.errors import ConfigError
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.io import atomic_write_text
from nanoseek.tokenizer import Tokenizer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
    if not 0 < k <= n:
        raise ConfigError(f"pass@k needs 0 < k <= n samples, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(texts: Sequence[str]) -> int | None:
    """Index of a completion carrying the most frequent extracted answer (first on ties); None if no
    completion has an answer."""
    answers = [extract_answer(text) for text in texts]
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return None
    winner = counts.most_common(1)[0][0]
    return answers.index(winner)


def heldout_problems(
    count: int, tasks: Sequence[str] = TASKS, difficulty: int | Sequence[int] = (1, 2), seed: int = 0
) -> list[Problem]:
    """`count` problems of the test split (never trained on), mixed over `tasks`."""
    return make_mixed_problems("test", count, seed, difficulty, tasks)


def prompt_ids(tokenizer: Tokenizer, problems: Sequence[Problem]) -> list[list[int]]:
    """Each problem's user turn rendered with the chat template and a generation prompt."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True, tokenize=True)
        for p in problems
    ]


@torch.no_grad()
def evaluate_tasks(
    engine: Engine,
    problems: Sequence[Problem],
    samples: int = 0,
    temperature: float = 1.0,
    max_tokens: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """Greedy accuracy and format rate (overall and per task), plus pass@1 / pass@k / maj@k from
    `samples` completions per problem when `samples` > 0. The engine's model is put in eval mode."""
    if not problems:
        raise ConfigError("no problems to evaluate")
    engine.model.eval()
    ids = prompt_ids(engine.tokenizer, problems)
    greedy = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    texts = [output.outputs[0].text for output in greedy]
    correct = [check_answer(p, text).correct for p, text in zip(problems, texts, strict=True)]
    metrics = {
        "accuracy": _mean(correct),
        "format_rate": _mean([check_format(text).correct for text in texts]),
        "mean_length": _mean([len(output.outputs[0].token_ids) for output in greedy]),
    }
    for task in sorted({p.task for p in problems}):
        metrics[f"accuracy/{task}"] = _mean([c for p, c in zip(problems, correct, strict=True) if p.task == task])
    if samples > 0:
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed * 1_000_003 + i) for i in range(len(ids))]
        sampled = engine.generate(ids, params, n=samples)
        pass_1, pass_k, majority = [], [], []
        for problem, output in zip(problems, sampled, strict=True):
            group = [completion.text for completion in output.outputs]
            hits = sum(check_answer(problem, text).correct for text in group)
            pass_1.append(hits / samples)
            pass_k.append(pass_at_k(samples, hits, samples))
            voted = majority_answer(group)
            majority.append(voted is not None and check_answer(problem, group[voted]).correct)
        metrics.update({"pass@1": _mean(pass_1), f"pass@{samples}": _mean(pass_k), f"maj@{samples}": _mean(majority)})
    return metrics


@torch.no_grad()
def perplexity(
    model: torch.nn.Module, data_dir: str | Path, split: str = "val", seq_len: int = 256, batch_size: int = 8,
    max_batches: int = 16,
) -> dict[str, float]:
    """Mean next-token loss and its exponential over the first `max_batches` windows of a shard split."""
    model.eval()
    device = next(model.parameters()).device
    loader = PretrainLoader(data_dir, batch_size, seq_len, split=split, shuffle=False)
    total, tokens = 0.0, 0
    for _ in range(min(max_batches, loader.batches_per_epoch)):
        batch = next(loader)
        inputs, targets = batch["input_ids"].to(device), batch["targets"].to(device)
        logits = model(inputs, use_mtp=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
        tokens += targets.numel()
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


@torch.no_grad()
def speculative_probe(model: torch.nn.Module, tokenizer: Tokenizer, problems: Sequence[Problem], max_tokens: int = 128) -> dict[str, float]:
    """Batch-1 greedy decoding of each problem without and with MTP self-speculation.

    Reports plain decode tokens/s, the drafts' acceptance rate, tokens per verify forward and the
    speedup (speculative tokens/s over plain). Models without an MTP layer report tokens/s only.
    Both runs must produce the same tokens (greedy speculation is exact); `spec_identical` says so.
    """
    ids = prompt_ids(tokenizer, problems)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    modes = [False, True] if len(getattr(model, "mtp", ())) else [False]
    engines = {speculative: Engine(model, tokenizer, max_num_seqs=1, speculative=speculative) for speculative in modes}
    tokens = dict.fromkeys(modes, 0)
    seconds = dict.fromkeys(modes, 0.0)
    outputs: dict[bool, list] = {speculative: [] for speculative in modes}
    for engine in engines.values():
        engine.generate(ids[:1], params)  # warm-up: allocations and first-call overheads
    for index, prompt in enumerate(ids):
        # Both modes on each problem in turn, alternating which goes first: a shared machine's speed drifts.
        for speculative in modes if index % 2 == 0 else modes[::-1]:
            start = time.perf_counter()
            completion = engines[speculative].generate(prompt, params)[0].outputs[0]
            seconds[speculative] += time.perf_counter() - start
            tokens[speculative] += len(completion.token_ids)
            outputs[speculative].append(completion.token_ids)
    runs = {speculative: (tokens[speculative] / seconds[speculative], engines[speculative].stats, outputs[speculative])
            for speculative in modes}
    metrics = {"tokens_per_second": runs[False][0]}
    if True in runs:
        tokens_per_second, stats, spec_outputs = runs[True]
        metrics.update({
            "mtp_acceptance": stats.acceptance_rate,
            "mtp_mean_accepted_length": stats.mean_accepted_length,
            "spec_tokens_per_second": tokens_per_second,
            "spec_speedup": tokens_per_second / runs[False][0],
            "spec_identical": float(spec_outputs == runs[False][2]),
        })
    return metrics


@torch.no_grad()
def expert_load(model: torch.nn.Module, tokenizer: Tokenizer, problems: Sequence[Problem]) -> dict[str, Any]:
    """Tokens per routed expert of each main-model MoE layer over the problems' prompts and worked
    solutions, relative to the layer mean (1.0 = balanced), and MaxVio = max_i load_i / mean - 1."""
    num_layers = sum(1 for layer in model.model.layers if hasattr(layer.mlp, "gate"))
    if num_layers == 0:
        return {}
    device = next(model.parameters()).device
    counts = None
    for problem in problems:
        ids = tokenizer.apply_chat_template(problem.messages(), tokenize=True)
        stats = model(torch.tensor([ids], device=device), use_mtp=False).router_stats[:num_layers]
        layer_counts = torch.stack([s.tokens_per_expert for s in stats])
        counts = layer_counts if counts is None else counts + layer_counts
    relative = counts / counts.mean(dim=1, keepdim=True).clamp_min(1e-9)
    return {
        "expert_load": [[round(v, 4) for v in row] for row in relative.tolist()],
        "expert_load_max_violation": float(relative.amax(dim=1).mean()) - 1.0,
    }


def _mean(values: Sequence[float | bool]) -> float:
    return sum(values) / len(values) if values else math.nan


# ----- command line -------------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory with its tokenizer (a checkpoint)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the model's)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--difficulty", nargs="+", type=int, default=[1, 2], choices=DIFFICULTIES)
    parser.add_argument("--count", type=int, default=200, help="held-out problems (0: no task evaluation)")
    parser.add_argument("--samples", type=int, default=0, metavar="K", help="samples per problem for pass@k and maj@k")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of pass@k / maj@k")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=None, metavar="DIR", help="token shards: also report perplexity")
    parser.add_argument("--split", default="val", help="shard split for perplexity")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batches", type=int, default=16, help="perplexity batches (of 8 windows)")
    parser.add_argument("--speculative", type=int, default=0, metavar="N",
                        help="also decode N problems at batch 1 with and without MTP speculation (tokens/s, acceptance, speedup)")
    parser.add_argument("--expert-load", action="store_true", help="also report per-layer expert load on the problems")
    parser.add_argument("--out", default=None, metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument("--device", default=None)


def cli_main(args: argparse.Namespace) -> int:
    from nanoseek.checkpoint import load_pretrained
    from nanoseek.train.parallel import resolve_device

    device = resolve_device(args.device)
    model = load_pretrained(args.model, device=device)
    report: dict[str, Any] = {"model": str(args.model)}
    start = time.perf_counter()
    if args.count > 0:
        tokenizer = Tokenizer.from_pretrained(args.tokenizer or args.model)
        engine = Engine(model, tokenizer)
        problems = heldout_problems(args.count, args.tasks, args.difficulty, args.seed)
        report.update(evaluate_tasks(engine, problems, args.samples, args.temperature, args.max_tokens, args.seed))
        report["problems"] = len(problems)
        if args.speculative > 0:
            report.update(speculative_probe(model, tokenizer, problems[: args.speculative], args.max_tokens))
        if args.expert_load:
            report.update(expert_load(model, tokenizer, problems))
    if args.data is not None:
        report.update({f"{args.split}_{k}": v for k, v in perplexity(model, args.data, args.split, args.seq_len, max_batches=args.batches).items()})
    report["seconds"] = round(time.perf_counter() - start, 2)
    line = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()})
    if args.out:
        atomic_write_text(args.out, line + "\n")
    print(line)
    return 0
