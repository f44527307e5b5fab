"""Seconds per GRPO step: `nanoseek grpo` vs TRL's GRPOTrainer on the same tiny model, prompts and settings.

The model is preset `qwen2-nano` (a Qwen2-shaped model both can run) with random weights, saved with
our `save_pretrained` next to a byte-level BPE tokenizer trained on the built-in tasks; TRL loads
both from that directory with transformers (generation with `model.generate`, `use_vllm=False`).
Both sides run the same arithmetic prompts (chats through the same template), G completions each of
at most `--completion-length` tokens at temperature 1, the same reward functions (TRL's signature is
ours), beta, learning rate, loss type (dapo), one optimizer step per rollout, in one process with
the same thread count. A step is rollout + rewards + advantages + update; the first `--warmup` steps
are not timed; the sides alternate for `--rounds` runs each and each figure is the median of the
per-run median steps (the load of a shared machine drifts). Each round runs with its own seed (both
sides), so no run replays an earlier run's rollouts: caches keyed by shape (oneDNN's prepared
products) stay as cold as in a real run, where every step's token count is new.

Two reward settings, because ours does not run rows whose gradient is exactly zero (advantage 0 at
beta = 0): `task` (accuracy + format, the R1 rewards: with random weights nearly every group scores
all-equal, so ours mostly skips the update) and `dense` (a reward that differs between completions,
so every row is trained on both sides: the like-for-like cost of a step). Prints one JSON line.

    python benchmarks/grpo_step.py [--steps 4] [--prompts 8] [--generations 8] [--completion-length 64] [--beta 0]
                                   [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nanoseek import ModelConfig
from nanoseek.data.tasks import make_problems, task_documents
from nanoseek.model import build_model
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import grpo, problem_rows, resolve_grpo_run
from nanoseek.train.rewards import accuracy_reward, format_reward


def text_of(completions: list) -> list[str]:
    """TRL hands conversational completions as [{"role": "assistant", "content": ...}]; ours are text."""
    return [c[0]["content"] if isinstance(c, list) else c for c in completions]


def accuracy(prompts, completions, **columns):
    return accuracy_reward(prompts, text_of(completions), **columns)


def format_(prompts, completions, **columns):
    return format_reward(prompts, text_of(completions), **columns)


def digit_share(prompts, completions, **columns):
    """A dense reward: the share of digits in the text (differs between almost any two completions)."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in text_of(completions)]


REWARDS = {"task": [accuracy, format_], "dense": [digit_share]}


def make_model_directory(directory: Path, seed: int = 0) -> None:
    tokenizer = Tokenizer.train(task_documents(3000, seed=seed), vocab_size=1024)
    config = ModelConfig.from_preset("qwen2-nano", vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                                     eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    build_model(config, seed=seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def benchmark_rows(count: int) -> list[dict]:
    """Arithmetic prompts as chats, with the columns the accuracy reward reads."""
    rows = problem_rows(make_problems("arithmetic", "train", count, seed=0, difficulty=[1, 2]))
    return [{"prompt": row["prompt"], "answer": row["answer"], "task": row["task"]} for row in rows]


def run_ours(directory: Path, args: argparse.Namespace, runs: Path, rewards: str, seed: int = 0) -> dict:
    completions = args.prompts * args.generations
    overrides = [
        f"max_steps={args.warmup + args.steps}", f"num_generations={args.generations}", f"global_batch_size={completions}",
        f"micro_batch_size={completions}", f"max_completion_length={args.completion_length}", f"beta={args.beta}",
        f"lr={args.lr}", "loss_type=dapo", "eval_problems=0", "checkpoint_every=0", "peak_tflops=1",
        "bias_update_speed=0", f"seed={seed}", f"device={args.device}", "precision=fp32",  # TRL's precision here
    ]
    runs.mkdir(parents=True, exist_ok=True)
    prompts = runs / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in benchmark_rows(args.problems)))
    name = f"ours-{rewards}"
    grpo(resolve_grpo_run(directory, data=prompts, overrides=overrides, runs_dir=runs, name=name, reward_functions=REWARDS[rewards]))
    lines = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
    timed = [line for line in lines if line["step"] > args.warmup]
    return {
        "seconds": statistics.median(line["step_seconds"] for line in timed),
        "generation_seconds": statistics.median(line["generation_seconds"] for line in timed),
        "mean_completion_length": statistics.mean(line["completions/mean_length"] for line in timed),
        "frac_rows_skipped": statistics.mean(line["frac_rows_skipped"] for line in timed),
    }


def run_trl(directory: Path, args: argparse.Namespace, runs: Path, rewards: str, seed: int = 0) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    step_times: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, arguments, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, arguments, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)

        def on_log(self, arguments, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    completions = args.prompts * args.generations
    config = GRPOConfig(
        output_dir=str(runs / f"trl-{rewards}"), max_steps=args.warmup + args.steps, per_device_train_batch_size=completions,
        gradient_accumulation_steps=1, num_generations=args.generations, max_completion_length=args.completion_length,
        temperature=1.0, beta=args.beta, learning_rate=args.lr, loss_type="dapo", use_vllm=False,
        use_cpu=args.device == "cpu",
        bf16=False, gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no",
        disable_tqdm=True, seed=seed, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=str(directory), reward_funcs=REWARDS[rewards], args=config,
                          train_dataset=Dataset.from_list(benchmark_rows(args.problems)),
                          processing_class=AutoTokenizer.from_pretrained(directory), callbacks=[Timer()])
    trainer.train()
    return {"seconds": statistics.median(step_times[args.warmup:]),
            "mean_completion_length": statistics.mean(lengths[args.warmup:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side and reward setting")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="G")
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--problems", type=int, default=256, help="prompt pool")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="alternating ours/TRL runs per reward setting")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both sides run (fp32 on both)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import trl

    results = {}
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / "model"
        make_model_directory(directory)
        for rewards in REWARDS:
            ours, theirs = [], []
            for round_ in range(args.rounds):  # alternate the sides: load on a shared machine drifts
                runs = Path(temporary) / f"runs-{round_}"
                ours.append(run_ours(directory, args, runs, rewards, seed=round_))
                theirs.append(run_trl(directory, args, runs, rewards, seed=round_))
            ours_s = statistics.median(r["seconds"] for r in ours)
            theirs_s = statistics.median(r["seconds"] for r in theirs)
            results[rewards] = {
                "ours": round(ours_s, 4), "baseline": round(theirs_s, 4), "ratio": round(theirs_s / ours_s, 2),
                "ours_generation": round(statistics.median(r["generation_seconds"] for r in ours), 4),
                "ours_frac_rows_skipped": round(statistics.mean(r["frac_rows_skipped"] for r in ours), 3),
                "mean_completion_length": {"ours": round(statistics.mean(r["mean_completion_length"] for r in ours), 1),
                                           "baseline": round(statistics.mean(r["mean_completion_length"] for r in theirs), 1)},
            }
    print(json.dumps({
        "bench": "grpo_step", "ours": results["task"]["ours"], "baseline": results["task"]["baseline"],
        "ratio": results["task"]["ratio"], "ratio_dense": results["dense"]["ratio"], "unit": "s/step (median)",
        "baseline_name": f"trl {trl.__version__} GRPOTrainer (transformers generate)", "rewards": results,
        "config": {"model": "qwen2-nano", "prompts_per_step": args.prompts, "num_generations": args.generations,
                   "max_completion_length": args.completion_length, "beta": args.beta, "loss_type": "dapo",
                   "timed_steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds},
        "threads": args.threads, "torch": torch.__version__, "device": args.device,
    }))


if __name__ == "__main__":
    main()
