"""Forward + backward tokens/s: nanoseek vs transformers DeepseekV3ForCausalLM on the same weights.

Model: preset `small` (= ../shared/bench/small.json), batch 4 x 256, next-token loss (MTP off for a
like-for-like comparison: transformers' model has no MTP head). Prints one JSON line per precision
(fp32, bf16 autocast): {"bench", "ours", "baseline", "ratio", "unit", "config", "threads", ...}.

    python benchmarks/train_step.py [--precision fp32|bf16|all] [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import tempfile
import time

import torch
import transformers

from nanoseek import ModelConfig
from nanoseek.allocator import keep_freed_memory
from nanoseek.model import build_model


def time_alternating(steps: list, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each step function, run alternately so machine noise hits all of them."""
    for _ in range(warmup):
        for step in steps:
            step()
    durations: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, times in zip(steps, durations, strict=True):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in durations]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["fp32", "bf16", "all"], default="all")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    keep_freed_memory()  # as nanoseek's CLI and Trainer do; both sides run with it

    torch.manual_seed(0)
    config = ModelConfig.from_preset("small", num_nextn_predict_layers=0)
    ours = build_model(config, seed=0).train()
    with tempfile.TemporaryDirectory() as directory:
        ours.save_pretrained(directory)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
    tokens = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    autocast = contextlib.nullcontext

    # Forward under autocast, backward outside, a fresh autocast context per step: what a training
    # loop does (nanoseek's Trainer, transformers' Trainer), so weight casts are paid every step.
    def our_step():
        ours.zero_grad(set_to_none=True)
        with autocast():
            loss = ours(inputs, labels=targets, balance_alpha=0.0).loss
        loss.backward()

    def their_step():
        theirs.zero_grad(set_to_none=True)
        with autocast():
            logits = theirs(inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()

    with torch.no_grad():  # same weights, same loss before timing anything
        assert abs(ours(inputs, labels=targets).lm_loss.item() - torch.nn.functional.cross_entropy(
            theirs(inputs).logits.flatten(0, 1), targets.flatten()).item()) < 1e-3

    precisions = ["fp32", "bf16"] if args.precision == "all" else [args.precision]
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    for precision in precisions:
        if precision == "bf16":
            autocast = functools.partial(torch.autocast, device_type, dtype=torch.bfloat16)
        else:
            autocast = contextlib.nullcontext
        our_time, their_time = time_alternating([our_step, their_step], args.steps)
        tokens_per_step = args.batch * args.seq
        ours_tps, theirs_tps = tokens_per_step / our_time, tokens_per_step / their_time
        print(json.dumps({
            "bench": f"train_step_{precision}",
            "ours": round(ours_tps, 1),
            "baseline": round(theirs_tps, 1),
            "ratio": round(ours_tps / theirs_tps, 3),
            "unit": "tokens/s (forward+backward)",
            "config": f"small, batch {args.batch}x{args.seq}, {precision}",
            "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "transformers": transformers.__version__,
        }), flush=True)


if __name__ == "__main__":
    main()
