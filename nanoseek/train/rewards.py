"""Rule-based rewards for GRPO (DeepSeek-R1 §2.2.2 and §2.3.2) and how several are combined.

A reward function is any callable with TRL's signature

    reward(prompts, completions, completion_ids, **columns) -> list[float | None]

`prompts` are the dataset's prompts (a chat `[{"role", "content"}, ...]` or a string), `completions`
the generated texts (reasoning tags included, control tokens dropped), `completion_ids` their token
ids, and every other dataset column arrives as a keyword argument with one value per completion.
Parameters without a default name the columns a function needs: GRPO checks them against the dataset
before training. `None` means "does not apply" (left out of that function's mean); a completion for
which every function returns None is unscorable and gets advantage 0.

Built in: `accuracy_reward` (the task checkers of `nanoseek.data.tasks`), `format_reward`
(`<think>...</think><answer>...</answer>`, each exactly once), `language_consistency_reward` (R1's
share of the reasoning in the prompt's language) and `overlong_penalty` (DAPO's soft length penalty).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nanoseek.data.tasks import check_countdown, check_format, check_number
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.tokenizer import THINK_END, THINK_START

RewardFunction = Callable[..., list[float | None]]
# Arguments every reward receives; any other parameter without a default is a dataset column.
STANDARD_ARGUMENTS = ("prompts", "completions", "completion_ids")


# ----- built-in rewards ------------------------------------------------------------------------------
def accuracy_reward(
    prompts: Sequence, completions: Sequence[str], answer: Sequence, task: Sequence | None = None,
    numbers: Sequence | None = None, target: Sequence | None = None, **columns: Any,
) -> list[float | None]:
    """1.0 if the final answer is right, else 0.0, by the checkers of `nanoseek.data.tasks`.

    Needs the column `answer`; countdown rows (`task == "countdown"`) are checked against their
    `numbers` and `target` instead (any expression that uses each number at most once and equals the
    target is right). A row without an answer gives None.
    """
    rewards: list[float | None] = []
    for index, text in enumerate(completions):
        if task is not None and task[index] == "countdown":
            result = check_countdown(text, numbers[index], target[index])
        elif answer[index] is None:
            rewards.append(None)
            continue
        else:
            result = check_number(text, answer[index])
        rewards.append(float(result.correct))
    return rewards


def format_reward(prompts: Sequence, completions: Sequence[str], **columns: Any) -> list[float]:
    """1.0 for `<think>...</think>` then `<answer>...</answer>`, each exactly once and nothing else
    around them (`nanoseek.data.tasks.check_format`: counting the tags defeats repeated-tag hacks)."""
    return [float(check_format(text).correct) for text in completions]


_CJK = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_TAGS = re.compile(r"</?(?:think|answer)>")


def count_words(text: str) -> dict[str, int]:
    """Words per language: each CJK character is a Chinese word, each run of Latin letters an English
    one; digits and symbols belong to no language."""
    text = _TAGS.sub(" ", text)
    return {"zh": len(_CJK.findall(text)), "en": len(_LATIN_WORD.findall(text))}


def prompt_language(prompt: str | Sequence[dict]) -> str:
    """"zh" if the (last user message of the) prompt has more Chinese than English words, else "en"."""
    if not isinstance(prompt, str):
        users = [message["content"] for message in prompt if message.get("role") == "user"]
        prompt = users[-1] if users else ""
    words = count_words(prompt)
    return "zh" if words["zh"] > words["en"] else "en"


def reasoning_text(completion: str) -> str:
    """The chain of thought: the text inside `<think>...</think>` (up to `</think>`, or everything,
    when the tags are missing)."""
    if THINK_END in completion:
        completion = completion.split(THINK_END)[0]
    return completion.split(THINK_START)[-1]


def language_consistency_reward(
    prompts: Sequence, completions: Sequence[str], language: Sequence[str] | None = None, **columns: Any,
) -> list[float]:
    """R1's language-consistency reward: the share of the reasoning's words in the target language,
    R_lang = #words in target language / #words (R1 §2.3.2). The target is the `language` column when
    the dataset has one, else the prompt's language. Reasoning without words (digits and symbols
    only) mixes no languages and scores 1.0."""
    rewards = []
    for index, text in enumerate(completions):
        target = language[index] if language is not None else prompt_language(prompts[index])
        words = count_words(reasoning_text(text))
        total = sum(words.values())
        rewards.append(words.get(target, 0) / total if total else 1.0)
    return rewards


def overlong_penalty(max_completion_length: int, buffer: int) -> RewardFunction:
    """DAPO's soft overlong punishment (eq. 13), in tokens: 0 up to `max_completion_length - buffer`,
    then falling linearly to -1 at `max_completion_length` (and -1 beyond)."""
    if not 0 < buffer <= max_completion_length:
        raise ConfigError(f"the overlong buffer must be in (0, max_completion_length={max_completion_length}], got {buffer}")
    free = max_completion_length - buffer

    def overlong_reward(prompts: Sequence, completions: Sequence[str], completion_ids: Sequence[Sequence[int]], **columns: Any) -> list[float]:
        return [max(-1.0, min(0.0, (free - len(ids)) / buffer)) for ids in completion_ids]

    return overlong_reward


BUILTIN_REWARDS: dict[str, RewardFunction] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "language": language_consistency_reward,
}


def resolve_reward(spec: str, max_completion_length: int, overlong_buffer: int) -> RewardFunction:
    """A reward by name: a built-in (`accuracy`, `format`, `language`, `overlong`) or `module:function`."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if spec == "overlong":
        return overlong_penalty(max_completion_length, overlong_buffer or max(1, max_completion_length // 4))
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        names = ", ".join([*BUILTIN_REWARDS, "overlong"])
        raise ConfigError(f"unknown reward {spec!r}: use one of {names} or module.path:function")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"cannot load reward {spec!r}: {error}") from None
    if not callable(function):
        raise ConfigError(f"reward {spec!r} is not callable")
    return function


def reward_name(function: RewardFunction) -> str:
    return getattr(function, "__name__", None) or type(function).__name__


def required_columns(function: RewardFunction) -> list[str]:
    """Dataset columns a reward cannot do without: its parameters without defaults beyond the standard ones."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables have no signature: assume nothing
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [
        p.name for p in parameters
        if p.kind in kinds and p.default is inspect.Parameter.empty and p.name not in STANDARD_ARGUMENTS
    ]


def check_reward_columns(functions: Sequence[RewardFunction], columns: Sequence[str]) -> None:
    """ConfigError naming every reward whose required columns the dataset lacks."""
    problems = []
    for function in functions:
        missing = [name for name in required_columns(function) if name not in columns]
        if missing:
            problems.append(f"reward {reward_name(function)!r} needs column(s) {', '.join(missing)}")
    if problems:
        raise ConfigError("; ".join(problems) + f" (the dataset has: {', '.join(sorted(columns)) or 'nothing'})")


# ----- combining rewards -------------------------------------------------------------------------------
@dataclass
class Rewards:
    """The scores of one rollout. per_function [N, F] (NaN where a function returned None); total [N]
    = sum_k w_k r_k over the functions that scored the row (NaN if none did: unscorable)."""

    names: list[str]
    per_function: torch.Tensor
    total: torch.Tensor


def compute_rewards(
    functions: Sequence[RewardFunction],
    weights: Sequence[float],
    prompts: Sequence,
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    columns: dict[str, Sequence],
) -> Rewards:
    """Call every reward on the whole batch and combine them (TRL's `sum_then_normalize`).

    A function that raises, returns the wrong number of values or a non-number stops training with a
    TrainingError that names it.
    """
    count = len(completions)
    scores = torch.full((count, len(functions)), math.nan, dtype=torch.float64)
    names = []
    for column, function in enumerate(functions):
        name = reward_name(function)
        names.append(name)
        try:
            values = function(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as error:
            raise TrainingError(f"reward function {name!r} raised {type(error).__name__}: {error}") from error
        if not isinstance(values, (list, tuple)) or len(values) != count:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
            raise TrainingError(f"reward function {name!r} must return a list of {count} floats (one per completion), got {got}")
        for row, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TrainingError(f"reward function {name!r} returned {value!r} for completion {row}: expected a finite float or None")
            scores[row, column] = float(value)
    weight = torch.tensor(list(weights), dtype=torch.float64)
    scored = ~scores.isnan()
    total = (scores.nan_to_num() * weight).sum(dim=1)
    total[~scored.any(dim=1)] = math.nan
    return Rewards(names, scores.float(), total.float())
