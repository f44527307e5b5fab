"""Does GRPO improve a model trained from scratch? Held-out accuracy before and after, against continued SFT.

The R1 recipe in miniature on the built-in tasks, with the stage commands' Python API:
1. a byte-level BPE tokenizer and token shards of generated task documents;
2. `pretrain` a `nano` DeepSeek-V3-shaped model (MLA, MoE, MTP) briefly on them (shared by all seeds);
3. per seed, cold-start `sft` on worked `<think>` solutions, stopped at the first evaluation whose
   held-out greedy accuracy reaches the band's low end (`target_accuracy`);
4. `grpo` from that checkpoint with the accuracy + format rewards;
5. the control: continued `sft` from the same checkpoint for as long as GRPO's steps took (rollouts
   and updates; held-out evaluations excluded).
Finished pretraining and cold starts in OUT are reused, so GRPO settings can be rerun alone.
Every model is scored by `evaluate_tasks` on the same held-out problems (test split): greedy
accuracy, format rate, pass@1 / pass@k / maj@k from k samples at temperature 1. Prints one JSON line
(per-seed results, means, GRPO reward curves smoothed over 10 steps) and writes it to OUT/results.json.

    python benchmarks/grpo_learning.py --out runs/grpo-learning [--seeds 0 1 2] [--grpo-steps 150]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nanoseek.checkpoint import load_pretrained
from nanoseek.data.corpus import prepare_corpus
from nanoseek.data.tasks import task_documents
from nanoseek.eval.evaluate import evaluate_tasks, heldout_problems
from nanoseek.infer.engine import Engine
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import grpo, resolve_grpo_run
from nanoseek.train.pretrain import pretrain, resolve_run
from nanoseek.train.sft import resolve_sft_run, sft

SFT_BATCH = ["global_batch_size=16", "micro_batch_size=16", "seq_len=128"]  # ~40 packed worked solutions a step


def score(checkpoint: Path, problems, samples: int) -> dict[str, float]:
    model = load_pretrained(checkpoint, dtype=torch.float32)
    engine = Engine(model, Tokenizer.from_pretrained(checkpoint), max_model_len=256, max_num_seqs=128)
    return {key: round(value, 4) for key, value in evaluate_tasks(engine, problems, samples, 1.0, 128, seed=1).items()}


def final_checkpoint(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").iterdir())[-1]


def metrics_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/grpo-learning", type=Path)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["arithmetic"])
    parser.add_argument("--difficulty", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--sft-max-steps", type=int, default=600)
    parser.add_argument("--band", nargs=2, type=float, default=[0.3, 0.6], help="cold-start target accuracy band")
    parser.add_argument("--grpo-steps", type=int, default=150)
    parser.add_argument("--grpo-lr", type=float, default=5e-5, help="at 8 prompts per step 5e-5 collapsed; 32 held")
    parser.add_argument("--grpo-prompts", type=int, default=32, help="prompts per GRPO step (8 completions each)")
    parser.add_argument("--eval-problems", type=int, default=200)
    parser.add_argument("--samples", type=int, default=8, help="k of pass@k / maj@k")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: Path = args.out
    task_flags = dict(tasks=args.tasks, difficulty=args.difficulty, runs_dir=out)
    problems = heldout_problems(args.eval_problems, args.tasks, args.difficulty, seed=1)
    clock = time.perf_counter()

    base = out / "pretrain" / "checkpoints"
    pretrained_here = not base.is_dir()
    if pretrained_here:
        tokenizer = Tokenizer.train(task_documents(4000, seed=0), vocab_size=1024)
        prepare_corpus([], tokenizer, out / "shards", from_tasks=20000, val_fraction=0.02)
        run = resolve_run(out / "shards", "nano", [f"max_steps={args.pretrain_steps}", f"warmup_steps={min(20, args.pretrain_steps // 10)}", "seq_len=256",
                                                     "global_batch_size=16", "micro_batch_size=16", "lr=3e-3",
                                                     "eval_every=100", "checkpoint_every=0"], "pretrain", out)
        pretrain(run)
    base = final_checkpoint(out / "pretrain")
    results = {"pretrain_seconds": round(time.perf_counter() - clock, 1) if pretrained_here else None,
               "base": score(base, problems, 0), "seeds": []}

    for seed in args.seeds:
        cold_dir, grpo_dir, control_dir = out / f"cold-{seed}", out / f"grpo-{seed}", out / f"control-{seed}"
        if not (cold_dir / "checkpoints").is_dir():  # a finished cold start is reused (rerun GRPO alone)
            sft(resolve_sft_run(base, from_tasks=8000, name=cold_dir.name, overrides=[
                f"seed={seed}", f"max_steps={args.sft_max_steps}", "eval_every=20", "eval_problems=64",
                "checkpoint_every=0", f"target_accuracy={list(args.band)}", *SFT_BATCH], **task_flags))
        cold = final_checkpoint(cold_dir)
        cold_steps = metrics_of(cold_dir)[-1]["step"]
        sft_step_seconds = statistics.median(line["step_seconds"] for line in metrics_of(cold_dir))

        grpo(resolve_grpo_run(cold, from_tasks=8000, name=grpo_dir.name, overrides=[
            f"seed={seed}", f"max_steps={args.grpo_steps}", f"lr={args.grpo_lr}", "max_completion_length=80",
            f"global_batch_size={8 * args.grpo_prompts}", f"micro_batch_size={min(64, 8 * args.grpo_prompts)}",
            "eval_every=25", "eval_problems=64", "eval_samples=0", "checkpoint_every=0"], **task_flags))
        grpo_seconds = sum(line["step_seconds"] for line in metrics_of(grpo_dir) if "step_seconds" in line)

        # the control: as many more SFT steps as fit in GRPO's training time (rollouts + updates, held-out
        # evaluations excluded), same recipe as the cold start
        control_steps = max(1, round(grpo_seconds / sft_step_seconds))
        sft(resolve_sft_run(cold, from_tasks=8000, name=control_dir.name, overrides=[
            f"seed={seed + 100}", f"max_steps={control_steps}", "warmup_steps=0", "eval_every=0", "eval_problems=0",
            "checkpoint_every=0", *SFT_BATCH], **task_flags))

        rewards = [line["reward"] for line in metrics_of(grpo_dir) if "reward" in line]
        curve = [round(statistics.mean(rewards[i : i + 10]), 3) for i in range(0, len(rewards), 10)]
        results["seeds"].append({
            "seed": seed, "cold_start_steps": cold_steps,
            "grpo_steps": args.grpo_steps, "grpo_seconds": round(grpo_seconds, 1), "control_sft_steps": control_steps,
            "cold_start": score(cold, problems, args.samples), "grpo": score(final_checkpoint(grpo_dir), problems, args.samples),
            "control_sft": score(final_checkpoint(control_dir), problems, args.samples), "grpo_reward_curve": curve,
        })
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    for model in ("cold_start", "grpo", "control_sft"):
        for metric in ("accuracy", f"pass@{args.samples}", f"maj@{args.samples}", "format_rate"):
            values = [entry[model][metric] for entry in results["seeds"]]
            results.setdefault("mean", {}).setdefault(model, {})[metric] = round(statistics.mean(values), 4)
            if len(values) > 1:
                results.setdefault("std", {}).setdefault(model, {})[metric] = round(statistics.stdev(values), 4)
    results.update(total_seconds=round(time.perf_counter() - clock, 1), threads=args.threads, tasks=args.tasks,
                   difficulty=args.difficulty, eval_problems=len(problems), torch=torch.__version__)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
