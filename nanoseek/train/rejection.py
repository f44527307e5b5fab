"""`nanoseek rejection-sample`: sample k completions per prompt, keep the verified ones, write SFT data.

R1's stage 3 (R1 paper §2.3.3): sample several responses per reasoning prompt from the RL checkpoint,
keep only correct ones, drop chain-of-thought that mixes languages, and fine-tune on the result. The
same routine run on a teacher is sequence-level distillation (the R1-Distill recipe, `nanoseek distill
mode=sequence`).

    nanoseek rejection-sample --model runs/r1/reasoning_rl/checkpoints/step_00000300 \\
        --out data/rejection.jsonl --from-tasks 512 --tasks arithmetic countdown samples_per_prompt=8
    nanoseek rejection-sample --model DIR --data prompts.jsonl --out data/rejection.jsonl

Prompts are GRPO's (`nanoseek grpo`): generated task problems (`--from-tasks N`) or a JSONL of
`{"prompt": text or messages, "answer": ..., ...}` rows, verified by the same rule rewards
(`nanoseek.train.rewards`: the task checkers of `nanoseek.data.tasks`). Each completion passes these
filters in order; the first one it fails is counted in the stats:

    truncated   no EOS before max_tokens: not a finished answer
    format      not `<think>...</think><answer>...</answer>` (`format_reward`)
    incorrect   the answer checker rejects it (`accuracy_reward`)
    language    the reasoning is not in the prompt's language: its share of words in that language
                (R1's language-consistency measure, `language_consistency_reward`) < min_language_share
    duplicate   the same text (whitespace-normalized) as a completion already kept for this prompt
    over_limit  the prompt already has `max_per_prompt` kept completions

The output is JSONL, one `{"messages": [...prompt, assistant reply], "id": ...}` per kept completion
(what `nanoseek sft --data` reads), and `<out stem>.stats.json` (prompts, samples, kept, drops per
filter, prompts with no correct sample, per task); both written atomically. If nothing survives, the
stats are written and a TrainingError says so: a later SFT stage must not train on nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.checkpoint import load_pretrained
from nanoseek.config import parse_overrides
from nanoseek.data.tasks import DIFFICULTIES, TASKS, make_mixed_problems
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.infer.engine import FINISH_LENGTH, Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.io import atomic_write_text
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import problem_rows, read_prompts
from nanoseek.train.parallel import resolve_device
from nanoseek.train.rewards import (
    accuracy_reward,
    check_reward_columns,
    format_reward,
    language_consistency_reward,
)
from nanoseek.train.sft import check_model_dir

FILTERS = ("truncated", "format", "incorrect", "language", "duplicate", "over_limit")


@dataclass
class RejectionConfig:
    """How many samples to draw and what to keep. CLI: `key=value`."""

    samples_per_prompt: int = 8  # k
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256  # completion budget; longer completions count as truncated
    max_per_prompt: int = 4  # distinct correct completions kept per prompt at most (0 = all)
    min_language_share: float = 0.9  # share of reasoning words in the prompt's language
    seed: int = 0  # sampling, and the problems of --from-tasks
    max_num_seqs: int = 128  # sequences the engine decodes together
    device: str | None = None  # None: cuda if available, else cpu

    def __post_init__(self) -> None:
        problems = []
        for name in ("samples_per_prompt", "max_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_per_prompt < 0:
            problems.append(f"max_per_prompt must be >= 0 (0 = keep all), got {self.max_per_prompt}")
        if not 0 <= self.min_language_share <= 1:
            problems.append(f"min_language_share must be in [0, 1], got {self.min_language_share}")
        if problems:
            raise ConfigError("invalid rejection-sampling config: " + "; ".join(problems))


@dataclass
class RejectionStats:
    """What rejection sampling drew and kept; `dropped` counts completions per failed filter."""

    prompts: int = 0
    samples: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    prompts_without_correct: int = 0  # no completion passed the answer checker (whatever its format)
    prompts_without_kept: int = 0
    seconds: float = 0.0
    by_task: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> prompts, samples, kept

    @property
    def kept_fraction(self) -> float:
        return self.kept / max(self.samples, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "kept_fraction": round(self.kept_fraction, 4)}


# ----- the stage -------------------------------------------------------------------------------------
def rejection_sample(
    model_dir: str | Path, rows: Sequence[dict], config: RejectionConfig, out: str | Path,
    tokenizer_dir: str | Path | None = None,
) -> RejectionStats:
    """Sample `samples_per_prompt` completions of every prompt row from the model in `model_dir`, keep
    the verified ones and write them to `out` (JSONL) with `<out stem>.stats.json`; returns the stats."""
    start = time.perf_counter()
    if not rows:
        raise ConfigError("rejection sampling needs at least one prompt")
    check_reward_columns([accuracy_reward], [key for key in rows[0] if key != "prompt"])
    model_dir, tokenizer_dir = check_model_dir(model_dir, tokenizer_dir)
    device = resolve_device(config.device)
    model = load_pretrained(model_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    chats = [chat_prompt(row) for row in rows]
    completions = sample_completions(model, Tokenizer.from_pretrained(tokenizer_dir), chats, config)

    stats = RejectionStats(prompts=len(rows))
    records = []
    for row, chat, (texts, finish_reasons) in zip(rows, chats, completions, strict=True):
        selection = select_completions(row, texts, finish_reasons, config)
        identity = {"id": row["id"]} if "id" in row else {}
        records += [{"messages": [*chat, {"role": "assistant", "content": text}], **identity} for text in selection.kept]
        _count(stats, str(row.get("task", "all")), len(texts), selection)
    stats.seconds = round(time.perf_counter() - start, 2)

    out = Path(out)
    atomic_write_text(stats_path(out), json.dumps(stats.to_dict(), indent=2) + "\n")
    if not records:
        raise TrainingError(
            f"rejection sampling kept nothing: none of {stats.samples} completions of {stats.prompts} prompts "
            f"passed the filters (dropped: {_drops_text(stats)}), so there is nothing to train on. Sample from "
            f"a stronger model, or with more samples_per_prompt, easier prompts or a larger max_tokens "
            f"(stats in {stats_path(out)})"
        )
    atomic_write_text(out, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return stats


def chat_prompt(row: dict) -> list[dict]:
    """A row's prompt as a chat: a text prompt becomes one user message, so that the kept samples are
    chats rendered the same way for sampling and for SFT."""
    prompt = row["prompt"]
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module, tokenizer: Tokenizer, chats: Sequence[list[dict]], config: RejectionConfig
) -> list[tuple[list[str], list[str | None]]]:
    """(texts, finish reasons) of `samples_per_prompt` completions per chat, through the engine.

    Each prompt gets its own seed (the engine derives one per completion from it), so prompts do not
    share random streams and a run is reproducible whatever the batch composition.
    """
    prompts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) for chat in chats]
    context = min(max(map(len, prompts)) + config.max_tokens, model.config.max_position_embeddings)
    engine = Engine(model.eval(), tokenizer, max_num_seqs=config.max_num_seqs, max_model_len=context)
    params = [
        SamplingParams(
            temperature=config.temperature, top_p=config.top_p, max_tokens=min(config.max_tokens, context - len(ids)),
            seed=(config.seed * 1_000_003 + index) % 2**63,
        )
        for index, ids in enumerate(prompts)
    ]
    outputs = engine.generate(prompts, params, n=config.samples_per_prompt)
    return [([c.text for c in output.outputs], [c.finish_reason for c in output.outputs]) for output in outputs]


@dataclass
class Selection:
    """The completions of one prompt that passed every filter, why the others were dropped, and how
    many were correct at all (whatever their format)."""

    kept: list[str]
    dropped: Counter
    correct: int


def select_completions(row: dict, texts: Sequence[str], finish_reasons: Sequence[str | None], config: RejectionConfig) -> Selection:
    """Run the filters over the completions of one prompt row, in sampling order."""
    texts = [text.strip() for text in texts]
    prompts = [chat_prompt(row)] * len(texts)
    columns = {key: [value] * len(texts) for key, value in row.items() if key != "prompt"}
    well_formed = format_reward(prompts, texts)
    correct = [reward == 1.0 for reward in accuracy_reward(prompts, texts, **columns)]
    language = language_consistency_reward(prompts, texts, **columns)
    selection = Selection([], Counter(), sum(correct))
    seen: set[str] = set()
    for index, text in enumerate(texts):
        key = " ".join(text.split())
        if finish_reasons[index] == FINISH_LENGTH:
            selection.dropped["truncated"] += 1
        elif not well_formed[index]:
            selection.dropped["format"] += 1
        elif not correct[index]:
            selection.dropped["incorrect"] += 1
        elif language[index] < config.min_language_share:
            selection.dropped["language"] += 1
        elif key in seen:
            selection.dropped["duplicate"] += 1
        elif config.max_per_prompt and len(selection.kept) >= config.max_per_prompt:
            selection.dropped["over_limit"] += 1
        else:
            selection.kept.append(text)
            seen.add(key)
    return selection


def stats_path(out: Path) -> Path:
    return out.with_name(out.stem + ".stats.json")


def _count(stats: RejectionStats, task: str, samples: int, selection: Selection) -> None:
    stats.samples += samples
    stats.kept += len(selection.kept)
    for name, count in selection.dropped.items():
        stats.dropped[name] += count
    stats.prompts_without_kept += not selection.kept
    stats.prompts_without_correct += not selection.correct
    per_task = stats.by_task.setdefault(task, {"prompts": 0, "samples": 0, "kept": 0})
    per_task["prompts"] += 1
    per_task["samples"] += samples
    per_task["kept"] += len(selection.kept)


def _drops_text(stats: RejectionStats) -> str:
    return ", ".join(f"{count} {name}" for name, count in stats.dropped.items() if count) or "none"


def prompt_rows(data: str | Path | None, from_tasks: int, tasks: Sequence[str], difficulty: Sequence[int], seed: int) -> list[dict]:
    """GRPO's prompt rows: a JSONL file, or `from_tasks` generated problems of the training split."""
    if (data is None) == (from_tasks <= 0):
        raise ConfigError("give exactly one source of prompts: --data FILE.jsonl or --from-tasks N")
    return read_prompts(data) if data is not None else problem_rows(make_mixed_problems("train", from_tasks, seed, difficulty, tasks))


# ----- command line -------------------------------------------------------------------------------
def settings_listing(config_class: type) -> str:
    """`name=default, ...` of a settings dataclass, for `--help`."""
    return ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(config_class))


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = f"RejectionConfig: {settings_listing(RejectionConfig)}."
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory to sample from")
    parser.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: the model's)")
    parser.add_argument("--out", required=True, metavar="FILE.jsonl", help="the SFT dataset to write")
    parser.add_argument("--data", default=None, metavar="FILE", help='JSONL of {"prompt": text or messages, "answer": ..., ...} rows')
    parser.add_argument("--from-tasks", type=int, default=0, metavar="N", help="use N generated problems of the built-in tasks")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--difficulty", nargs="+", type=int, default=[1, 2], choices=DIFFICULTIES)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="RejectionConfig fields, e.g. samples_per_prompt=16")


def cli_main(args: argparse.Namespace) -> int:
    config = RejectionConfig(**parse_overrides(RejectionConfig, args.overrides))
    rows = prompt_rows(args.data, args.from_tasks, args.tasks, args.difficulty, config.seed)
    stats = rejection_sample(args.model, rows, config, args.out, args.tokenizer)
    print(json.dumps({"out": str(args.out), **stats.to_dict()}))
    return 0
