"""`nanoseek sft`: supervised fine-tuning on chats, with the loss on assistant tokens only.

    nanoseek sft --model runs/pretrain/checkpoints/step_00002000 --from-tasks 4000 --name cold-start \\
        max_steps=400 target_accuracy=[0.2,0.4]
    nanoseek sft --model DIR --data chats.jsonl --name sft packing=false lr=2e-4

Data is a JSONL file of `{"messages": [{"role", "content"}, ...]}` chats, or (`--from-tasks N`) N
generated problems of the built-in tasks with their worked `<think>` solutions: R1's cold start
(§2.3.1). Chats are rendered with the model's chat template, packed into rows of `seq_len` tokens
(or padded, `packing=false`), and trained with the shared `Trainer` (precision, accumulation,
checkpoints, resume, MoE balancing, MTP). Every `eval_every` steps the run logs the validation loss
(`val_lm_loss`: held-out chats) and the greedy accuracy on held-out task problems through the
inference engine (`val_accuracy`, `val_format_rate`); `target_accuracy=[low,high]` ends the run at
the first evaluation reaching `low`, so a cold start stops at a modest accuracy instead of a guessed
step count (the jump in accuracy is steep and its step varies between seeds).

`key=value` arguments set `TrainConfig` and `SFTConfig` fields. The helpers at the bottom (loading
the starting model, splitting overrides, resuming) serve the GRPO stage as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoseek.checkpoint import load_pretrained
from nanoseek.config import parse_overrides
from nanoseek.data.loader import SFTLoader
from nanoseek.data.tasks import DIFFICULTIES, TASKS, Problem, make_mixed_problems
from nanoseek.errors import ConfigError, DataError, TrainingError
from nanoseek.eval.evaluate import evaluate_tasks, heldout_problems, prompt_ids
from nanoseek.infer.engine import Engine
from nanoseek.io import atomic_write_text
from nanoseek.model import CausalLM
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import checkpointing, parallel
from nanoseek.train.trainer import TrainConfig, Trainer

EVAL_SEED = 0  # the held-out problems are the same in every run, so runs compare


@dataclass
class SFTConfig:
    """What SFT adds to `TrainConfig`. Rows hold `seq_len` tokens (longer chats are truncated)."""

    packing: bool = True  # pack chats into rows (block-diagonal attention) instead of padding each
    val_fraction: float = 0.05  # JSONL data: the share of chats held out for the validation loss
    eval_problems: int = 100  # held-out task problems for greedy accuracy at each evaluation (0: none)
    eval_max_tokens: int = 128
    target_accuracy: list[float] | None = None  # [low, high]: stop at the first evaluation with accuracy >= low

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.val_fraction < 1:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.eval_problems < 0 or self.eval_max_tokens < 1:
            problems.append("eval_problems must be >= 0 and eval_max_tokens >= 1")
        band = self.target_accuracy
        if band is not None and (len(band) != 2 or not 0 <= band[0] <= band[1] <= 1):
            problems.append(f"target_accuracy must be [low, high] with 0 <= low <= high <= 1, got {band}")
        if band is not None and not self.eval_problems:
            problems.append("target_accuracy needs eval_problems > 0")
        if problems:
            raise ConfigError("invalid SFT config: " + "; ".join(problems))


# Where SFT departs from pretraining's defaults (any of them can still be overridden).
SFT_TRAIN_DEFAULTS = {"lr": 1e-3, "warmup_steps": 10, "max_steps": 500, "global_batch_size": 32,
                      "micro_batch_size": 16, "eval_every": 50, "eval_batches": 8}


@dataclass
class SFTRun:
    """An SFT run, resolved and checked: settings, data, where it starts and where it writes."""

    train: TrainConfig
    options: SFTConfig
    model_dir: Path
    tokenizer_dir: Path
    conversations: list[list[dict]]
    val_conversations: list[list[dict]]
    eval_problems: list[Problem]
    run_dir: Path
    resume_from: Path | None


def resolve_sft_run(
    model: str | Path,
    data: str | Path | None = None,
    from_tasks: int = 0,
    tasks: Sequence[str] = TASKS,
    difficulty: Sequence[int] = (1, 2),
    overrides: Sequence[str] = (),
    name: str = "sft",
    runs_dir: str | Path = "runs",
    resume: str | bool | None = None,
    tokenizer: str | Path | None = None,
) -> SFTRun:
    """Parse and check every setting and read the data (no model is built yet)."""
    train, options = split_overrides(overrides, SFTConfig, SFT_TRAIN_DEFAULTS)
    model_dir, tokenizer_dir = check_model_dir(model, tokenizer)
    if (data is None) == (from_tasks <= 0):
        raise ConfigError("give exactly one source of chats: --data FILE.jsonl or --from-tasks N")
    if data is not None:
        chats = read_chats(data)
        held_out = round(len(chats) * options.val_fraction)
        conversations, val_conversations = chats[held_out:], chats[:held_out]
    else:
        conversations = [p.messages() for p in make_mixed_problems("train", from_tasks, train.seed, difficulty, tasks)]
        val_conversations = [p.messages() for p in heldout_problems(max(64, train.eval_batches * train.micro_batch_size), tasks, difficulty, EVAL_SEED)]
    eval_problems = heldout_problems(options.eval_problems, tasks, difficulty, EVAL_SEED) if options.eval_problems else []
    run_dir = Path(runs_dir) / name
    return SFTRun(train, options, model_dir, tokenizer_dir, conversations, val_conversations, eval_problems,
                  run_dir, resume_point(run_dir, resume))


def sft(run: SFTRun) -> dict[str, Any]:
    """Fine-tune `run.model_dir` on `run.conversations`; returns the last metrics (held-out accuracy
    included). Under torchrun every rank trains; held-out accuracy is measured in one-process runs."""
    topology = parallel.init_distributed(run.train.device)
    try:
        config, options = run.train, run.options
        config.grad_accum_steps(topology.world_size)
        model, tokenizer = load_policy(run.model_dir, run.tokenizer_dir, topology.device)
        check_context(model, config.seq_len)
        loader = functools.partial(
            SFTLoader, tokenizer=tokenizer, batch_size=config.micro_batch_size, max_length=config.seq_len,
            seed=config.seed, packing=options.packing, rank=topology.rank, world_size=topology.world_size,
        )
        train_batches = loader(run.conversations, shuffle=True)
        if topology.is_main and train_batches.truncated:
            print(f"{train_batches.truncated} chats are longer than seq_len={config.seq_len} and were truncated", file=sys.stderr)
        val_batches = None
        if run.val_conversations:
            try:
                loader(run.val_conversations, shuffle=False)
                val_batches = functools.partial(loader, run.val_conversations, shuffle=False)
            except DataError as error:
                if topology.is_main:
                    print(f"no validation loss: {error}", file=sys.stderr)

        trainer = Trainer(model, config, run.run_dir, topology=topology, tokenizer=tokenizer)
        if run.resume_from is not None:
            trainer.load_checkpoint(run.resume_from, train_batches)
        if topology.is_main:
            write_run_config(run.run_dir, {"stage": "sft", "model": str(run.model_dir), "train": dataclasses.asdict(config),
                                           "sft": dataclasses.asdict(options), "chats": len(run.conversations)})
        evaluate = heldout_evaluator(trainer, tokenizer, run.eval_problems, options.eval_max_tokens)
        band = options.target_accuracy

        def on_step(metrics: dict[str, Any]) -> bool:
            if evaluate is None or not evaluation_due(trainer):
                return False
            metrics.update(evaluate())
            return band is not None and metrics["val_accuracy"] >= band[0]

        metrics = trainer.fit(train_batches, val_batches, on_step=on_step)
        if topology.is_main:
            if band is not None:
                print(target_report(metrics.get("val_accuracy"), band, trainer.step), file=sys.stderr)
            summary = {k: metrics[k] for k in ("step", "loss", "val_lm_loss", "val_accuracy", "val_format_rate") if k in metrics}
            print(json.dumps({"run": str(run.run_dir), **summary, "checkpoint": str(trainer.last_checkpoint)}))
        return metrics
    finally:
        parallel.shutdown()


def target_report(accuracy: float | None, band: Sequence[float], step: int) -> str:
    low, high = band
    if accuracy is None or accuracy < low:
        return f"held-out accuracy {accuracy} did not reach {low} in {step} steps: train longer or raise lr"
    if accuracy > high:
        return f"held-out accuracy {accuracy:.3f} overshot the band [{low}, {high}] at step {step}: evaluate more often"
    return f"held-out accuracy {accuracy:.3f} is in the band [{low}, {high}] at step {step}"


# ----- what the post-training stages share ---------------------------------------------------------------
def split_overrides(overrides: Sequence[str], stage_class: type, defaults: dict[str, Any]) -> tuple[TrainConfig, Any]:
    """`key=value` strings -> (TrainConfig, stage config): each key goes to the dataclass that has it;
    `defaults` are the stage's TrainConfig defaults, applied before the overrides. A default warmup
    is capped at a tenth of `max_steps`, so a short run needs no warmup override."""
    stage_fields = {field.name for field in dataclasses.fields(stage_class)}
    stage_items = [item for item in overrides if item.partition("=")[0].strip().replace("-", "_") in stage_fields]
    train_items = [item for item in overrides if item not in stage_items]
    given = parse_overrides(TrainConfig, train_items)
    values = {**defaults, **given}
    if "warmup_steps" not in given and "max_steps" in values:
        values["warmup_steps"] = min(values.get("warmup_steps", TrainConfig.warmup_steps), values["max_steps"] // 10)
    return TrainConfig(**values), stage_class(**parse_overrides(stage_class, stage_items))


def check_model_dir(model: str | Path, tokenizer: str | Path | None = None) -> tuple[Path, Path]:
    """The starting checkpoint and its tokenizer directory, or a ConfigError saying what is missing."""
    model_dir = Path(model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"--model {model_dir} is not a model directory (no config.json): give a checkpoint, e.g. runs/pretrain/checkpoints/step_...")
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else model_dir
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ConfigError(f"{tokenizer_dir} has no tokenizer.json: pass --tokenizer DIR")
    return model_dir, tokenizer_dir


def load_policy(model_dir: Path, tokenizer_dir: Path, device: torch.device) -> tuple[CausalLM, Tokenizer]:
    """The starting model in fp32 (the trainer's master weights) and its tokenizer."""
    model = load_pretrained(model_dir, dtype=torch.float32, device=device)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size}")
    return model.train(), tokenizer


def check_context(model: CausalLM, length: int) -> None:
    if length > model.config.max_position_embeddings:
        raise ConfigError(f"{length} tokens per sequence exceed the model's context of {model.config.max_position_embeddings}")


def resume_point(run_dir: Path, resume: str | bool | None) -> Path | None:
    """None for a new run (TrainingError if `run_dir` already holds one), the latest checkpoint for
    `resume=True`, or the given checkpoint path."""
    if resume is True:
        latest = checkpointing.latest_checkpoint(run_dir)
        if latest is None:
            raise TrainingError(f"--resume: {run_dir} has no checkpoint to continue from")
        return latest
    if resume:
        if not Path(resume).is_dir():
            raise TrainingError(f"--resume: checkpoint {resume} does not exist")
        return Path(resume)
    if checkpointing.list_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists():
        raise TrainingError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --name")
    return None


def read_chats(path: str | Path) -> list[list[dict]]:
    """Chats from a JSONL file of `{"messages": [{"role": ..., "content": ...}, ...]}` lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    chats = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{number}: expected a JSON object with a \"messages\" list") from None
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
            ):
                raise DataError(f"{path}:{number}: every message needs a string \"role\" and \"content\"")
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{path}:{number}: the chat has no assistant message to train on")
            chats.append(messages)
    if not chats:
        raise DataError(f"{path} holds no chats")
    return chats


def heldout_evaluator(trainer: Trainer, tokenizer: Tokenizer, problems: Sequence[Problem], max_tokens: int,
                      samples: int = 0, temperature: float = 1.0, engine: Engine | None = None):
    """A function returning `val_*` task metrics of the current weights, measured through an engine
    that shares the trainer's model (so it always samples with the weights being trained): `engine`,
    or a new one sized for the problems. None when there is nothing to evaluate or the run is
    distributed (the engine needs whole weights)."""
    if not problems or trainer.topology.is_distributed:
        return None
    longest = max(len(ids) for ids in prompt_ids(tokenizer, problems))
    if engine is None:
        context = min(longest + max_tokens, trainer.model.config.max_position_embeddings)
        engine = Engine(trainer.model, tokenizer, max_model_len=context, max_num_seqs=64, pack_weights=False)
        trainer.model.train()
    context = engine.max_model_len

    def evaluate() -> dict[str, float]:
        with trainer.precision.autocast():
            metrics = evaluate_tasks(engine, problems, samples, temperature, min(max_tokens, context - longest), EVAL_SEED)
        return {f"val_{key}": value for key, value in metrics.items()}

    return evaluate


def evaluation_due(trainer: Trainer) -> bool:
    every = trainer.config.eval_every
    return trainer.step == trainer.config.max_steps or bool(every and trainer.step % every == 0)


def write_run_config(run_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(run_dir / "run_config.json", json.dumps(record, indent=2) + "\n")


# ----- command line -------------------------------------------------------------------------------------
def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags SFT and GRPO share: the starting model, the built-in tasks, the run's name."""
    parser.add_argument("--model", required=True, metavar="DIR", help="starting checkpoint (a model directory)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the model's)")
    parser.add_argument("--from-tasks", type=int, default=0, metavar="N", help="use N generated problems of the built-in tasks")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks for --from-tasks and held-out accuracy")
    parser.add_argument("--difficulty", nargs="+", type=int, default=[1, 2], choices=DIFFICULTIES)
    parser.add_argument("--runs-dir", default="runs", metavar="DIR")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue the run from its latest checkpoint (or from CHECKPOINT)")


def settings_help(stage_class: type, defaults: dict[str, Any]) -> str:
    """The `key=value` settings of a stage and their defaults, for `--help`."""
    def listing(config_class: type, overrides: dict[str, Any]) -> str:
        values = {f.name: overrides.get(f.name, f.default) for f in dataclasses.fields(config_class)}
        return ", ".join(f"{name}={value}" for name, value in values.items())

    return f"{stage_class.__name__}: {listing(stage_class, {})}. TrainConfig: {listing(TrainConfig, defaults)}."


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = settings_help(SFTConfig, SFT_TRAIN_DEFAULTS)
    add_data_arguments(parser)
    parser.add_argument("--data", default=None, metavar="FILE", help='JSONL of {"messages": [...]} chats')
    parser.add_argument("--name", default="sft", help="run name: outputs go to RUNS_DIR/NAME")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="TrainConfig / SFTConfig settings, e.g. max_steps=300 packing=false target_accuracy=[0.2,0.4]")


def cli_main(args: argparse.Namespace) -> int:
    run = resolve_sft_run(args.model, args.data, args.from_tasks, args.tasks, args.difficulty, args.overrides,
                          args.name, args.runs_dir, args.resume, args.tokenizer)
    sft(run)
    return 0
