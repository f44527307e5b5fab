"""`nanoseek rejection-sample`: sample k completions per prompt, keep the verified ones, write SFT data.

R1's stage 3 (R1 paper §2.3.3): sample several responses per reasoning prompt from the RL checkpoint,
keep only correct ones, drop chain-of-thought that mixes languages, and fine-tune on the result. The
same routine run on a teacher is sequence-level distillation (the R1-Distill recipe, `nanoseek distill
mode=sequence`).

    nanoseek rejection-sample --model runs/r1/reasoning_rl/checkpoints/step_00000300 \\
        --out data/rejection.jsonl --tasks arithmetic,countdown --count 512 samples_per_prompt=8

Each completion passes these filters in order; the first one it fails is counted in the stats:

    truncated   no EOS before max_tokens: not a finished answer
    format      not `<think>...</think><answer>...</answer>` (`data.tasks.check_format`)
    incorrect   the task's checker rejects the answer (`data.tasks.check_answer`)
    language    the reasoning is not in the prompt's language: the share of its words in that language
                (R1's language-consistency measure) is below `min_language_share`
    duplicate   the same text (whitespace-normalized) as a completion already kept for this prompt
    over_limit  the prompt already has `max_per_prompt` kept completions

The output is JSONL, one `{"messages": [user, assistant], "problem_id": ...}` per kept completion, and
`<out>.stats.json` (prompts, samples, kept, drops per filter, prompts with no correct sample). Both are
written atomically. If nothing survives, the stats are written and a TrainingError says so: a later
SFT stage must not train on nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nanoseek.checkpoint import load_pretrained
from nanoseek.config import parse_overrides
from nanoseek.data.tasks import (
    DIFFICULTIES,
    LANGUAGES,
    TASKS,
    Problem,
    check_answer,
    check_format,
    make_mixed_problems,
)
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.infer.engine import FINISH_LENGTH, Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.io import atomic_write_text
from nanoseek.tokenizer import THINK_END, THINK_START, Tokenizer
from nanoseek.train.parallel import resolve_device

FILTERS = ("truncated", "format", "incorrect", "language", "duplicate", "over_limit")
_LATIN_WORD = re.compile(r"[A-Za-z\u00c0-\u024f]+")
_HAN_CHARACTER = re.compile(r"[\u4e00-\u9fff]")


@dataclass
class RejectionConfig:
    """How many samples to draw and what to keep. CLI: `key=value`."""

    samples_per_prompt: int = 8  # k
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256  # completion budget; longer completions count as truncated
    max_per_prompt: int = 4  # distinct correct completions kept per prompt at most (0 = all)
    min_language_share: float = 0.9  # share of reasoning words in the prompt's language
    seed: int = 0
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
    model_dir: str | Path, problems: Sequence[Problem], config: RejectionConfig, out: str | Path
) -> RejectionStats:
    """Sample `samples_per_prompt` completions of every problem from the model in `model_dir`, keep the
    verified ones and write them to `out` (JSONL) with `<out>.stats.json`; returns the stats."""
    start = time.perf_counter()
    if not problems:
        raise ConfigError("rejection sampling needs at least one prompt")
    model, tokenizer = load_model_and_tokenizer(model_dir, config.device)
    completions = sample_completions(model, tokenizer, problems, config)

    stats = RejectionStats(prompts=len(problems))
    records = []
    for problem, (texts, finish_reasons) in zip(problems, completions, strict=True):
        selection = select_completions(problem, texts, finish_reasons, config)
        records += [{"messages": conversation(problem, text), "problem_id": problem.id} for text in selection.kept]
        _count(stats, problem, len(texts), selection)
    stats.seconds = round(time.perf_counter() - start, 2)

    out = Path(out)
    atomic_write_text(stats_path(out), json.dumps(stats.to_dict(), indent=2) + "\n")
    if not records:
        raise TrainingError(
            f"rejection sampling kept nothing: none of {stats.samples} completions of {stats.prompts} prompts "
            f"passed the filters (dropped: {_drops_text(stats)}); nothing to train on. Sample from a "
            f"stronger model, more samples_per_prompt, easier problems or a larger max_tokens "
            f"(stats in {stats_path(out)})"
        )
    atomic_write_text(out, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return stats


def load_model_and_tokenizer(model_dir: str | Path, device: str | None = None) -> tuple[torch.nn.Module, Tokenizer]:
    """A checkpoint directory's model (bf16 on GPUs, fp32 on CPU, in eval mode) and its tokenizer."""
    resolved = resolve_device(device)
    dtype = torch.bfloat16 if resolved.type == "cuda" else torch.float32
    model = load_pretrained(model_dir, dtype=dtype, device=resolved).eval()
    return model, Tokenizer.from_pretrained(model_dir)


def prompt_ids(tokenizer: Tokenizer, problem: Problem) -> list[int]:
    """The problem as a one-turn chat rendered up to the assistant's turn (as its SFT example renders)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.prompt}], add_generation_prompt=True, tokenize=True
    )


def conversation(problem: Problem, completion: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": completion}]


@torch.no_grad()
def sample_completions(
    model: torch.nn.Module, tokenizer: Tokenizer, problems: Sequence[Problem], config: RejectionConfig
) -> list[tuple[list[str], list[str | None]]]:
    """(texts, finish reasons) of `samples_per_prompt` completions per problem, through the engine.

    Each prompt gets its own seed (the engine derives one per completion from it), so prompts do not
    share random streams and a run is reproducible whatever the batch composition.
    """
    prompts = [prompt_ids(tokenizer, problem) for problem in problems]
    longest = max(map(len, prompts))
    engine = Engine(model, tokenizer, max_num_seqs=config.max_num_seqs, max_model_len=longest + config.max_tokens)
    params = [
        SamplingParams(
            temperature=config.temperature, top_p=config.top_p, max_tokens=config.max_tokens,
            seed=(config.seed * 1_000_003 + index) % 2**63,
        )
        for index in range(len(problems))
    ]
    outputs = engine.generate(prompts, params, n=config.samples_per_prompt)
    return [
        ([c.text for c in output.outputs], [c.finish_reason for c in output.outputs]) for output in outputs
    ]


@dataclass
class Selection:
    """The completions of one problem that passed every filter, why the others were dropped, and how
    many were correct at all (whatever their format)."""

    kept: list[str]
    dropped: Counter
    correct: int


def select_completions(
    problem: Problem, texts: Sequence[str], finish_reasons: Sequence[str | None], config: RejectionConfig
) -> Selection:
    """Run the filters over the completions of one problem, in sampling order."""
    selection = Selection([], Counter(), 0)
    seen: set[str] = set()
    for text, finish_reason in zip(texts, finish_reasons, strict=True):
        text = text.strip()
        key = " ".join(text.split())
        correct = check_answer(problem, text).correct
        selection.correct += correct
        if finish_reason == FINISH_LENGTH:
            selection.dropped["truncated"] += 1
        elif not check_format(text).correct:
            selection.dropped["format"] += 1
        elif not correct:
            selection.dropped["incorrect"] += 1
        elif language_share(reasoning(text), problem.language) < config.min_language_share:
            selection.dropped["language"] += 1
        elif key in seen:
            selection.dropped["duplicate"] += 1
        elif config.max_per_prompt and len(selection.kept) >= config.max_per_prompt:
            selection.dropped["over_limit"] += 1
        else:
            selection.kept.append(text)
            seen.add(key)
    return selection


def reasoning(text: str) -> str:
    """The text between `<think>` and `</think>` (of a well-formed completion)."""
    return text.split(THINK_START, 1)[-1].split(THINK_END, 1)[0]


def language_share(text: str, language: str) -> float:
    """Share of the words of `text` that are in `language` ("en" or "zh"): R1's language-consistency
    measure (R1 paper eq. 7), with each Han character counted as a word (Chinese has no spaces).
    Text without words (digits and symbols only) counts as consistent: 1.0."""
    if language not in LANGUAGES:
        raise ConfigError(f"unknown language {language!r}: choose one of {', '.join(LANGUAGES)}")
    latin, han = len(_LATIN_WORD.findall(text)), len(_HAN_CHARACTER.findall(text))
    if latin + han == 0:
        return 1.0
    return (latin if language == "en" else han) / (latin + han)


def stats_path(out: Path) -> Path:
    return out.with_name(out.stem + ".stats.json")


def _count(stats: RejectionStats, problem: Problem, samples: int, selection: Selection) -> None:
    stats.samples += samples
    stats.kept += len(selection.kept)
    for name, count in selection.dropped.items():
        stats.dropped[name] += count
    stats.prompts_without_kept += not selection.kept
    stats.prompts_without_correct += not selection.correct
    task = stats.by_task.setdefault(problem.task, {"prompts": 0, "samples": 0, "kept": 0})
    task["prompts"] += 1
    task["samples"] += samples
    task["kept"] += len(selection.kept)


def _drops_text(stats: RejectionStats) -> str:
    return ", ".join(f"{count} {name}" for name, count in stats.dropped.items() if count) or "none"


# ----- command line -------------------------------------------------------------------------------
def add_problem_arguments(parser: argparse.ArgumentParser, count: int = 256) -> None:
    """Flags that choose generated task problems (shared by the stages that sample from prompts)."""
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--count", type=int, default=count, help="number of prompts")
    parser.add_argument("--difficulty", default="1,2", help="levels 1-5, comma-separated")
    parser.add_argument("--split", default="train", choices=("train", "test"))
    parser.add_argument("--language", default=None, choices=LANGUAGES, help="default: both, drawn per problem")
    parser.add_argument("--problem-seed", type=int, default=0, help="seed of the problem generator")


def problems_from_args(args: argparse.Namespace) -> list[Problem]:
    try:
        difficulty = [int(level) for level in args.difficulty.split(",")]
    except ValueError:
        raise ConfigError(f"--difficulty {args.difficulty!r}: give levels from {DIFFICULTIES}, comma-separated") from None
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    return make_mixed_problems(args.split, args.count, args.problem_seed, difficulty, tasks, args.language)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory to sample from")
    parser.add_argument("--out", required=True, metavar="FILE.jsonl", help="the SFT dataset to write")
    add_problem_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="RejectionConfig fields, e.g. samples_per_prompt=16")


def cli_main(args: argparse.Namespace) -> int:
    config = RejectionConfig(**parse_overrides(RejectionConfig, args.overrides))
    stats = rejection_sample(args.model, problems_from_args(args), config, args.out)
    print(json.dumps({"out": str(args.out), **stats.to_dict()}), file=sys.stdout)
    return 0
