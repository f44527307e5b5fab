"""Rewards: the built-in rules, TRL-style user functions, how rewards combine, and bad reward functions."""

import math

import pytest
import torch

from nanoseek.data.tasks import make_problems
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.train.grpo import problem_rows
from nanoseek.train.rewards import (
    accuracy_reward,
    check_reward_columns,
    compute_rewards,
    format_reward,
    language_consistency_reward,
    overlong_penalty,
    required_columns,
    resolve_reward,
)


def columns(rows):
    return {key: [row[key] for row in rows] for key in rows[0] if key != "prompt"}


def test_accuracy_uses_the_task_checkers():
    arithmetic = problem_rows(make_problems("arithmetic", count=1, difficulty=1, language="en"))[0]
    countdown = problem_rows(make_problems("countdown", count=1, difficulty=1, language="en"))[0]
    rows = [arithmetic, arithmetic, countdown, countdown, {**arithmetic, "answer": None}]
    numbers = countdown["numbers"]
    completions = [
        f"<think>\nwork\n</think>\n<answer>{arithmetic['answer']}</answer>",
        "<answer>-1</answer>",
        f"<answer>{countdown['answer']}</answer>",  # the gold expression
        f"<answer>{'+'.join(map(str, numbers + numbers))}</answer>",  # uses every number twice
        "<answer>3</answer>",
    ]
    rewards = accuracy_reward([r["prompt"] for r in rows], completions, **columns(rows))
    assert rewards == [1.0, 0.0, 1.0, 0.0, None]


def test_format_wants_think_then_answer_exactly_once():
    completions = [
        "<think>\n1+2=3\n</think>\n<answer>3</answer>",
        "<answer>3</answer>",
        "<think>a</think><answer>3</answer><answer>3</answer>",
        "<think>a</think><answer></answer>",
        "<think>a</think><answer>3</answer> and more",
    ]
    assert format_reward([""] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_language_consistency_is_the_share_of_reasoning_words_in_the_prompt_language():
    english = [{"role": "user", "content": "Tom has 3 apples and gets 4 more."}]
    chinese = [{"role": "user", "content": "小明有3个苹果，又得到了4个。"}]
    prompts = [english, english, chinese, chinese, english]
    completions = [
        "<think>add three and four</think><answer>7</answer>",  # 4 English words
        "<think>add 三 and 四</think><answer>7</answer>",  # 2 of 4 words English
        "<think>三加四</think><answer>7</answer>",
        "<think>three plus 四</think><answer>7</answer>",  # 1 of 3 words Chinese
        "<think>3+4+0=7</think><answer>7</answer>",  # no words: nothing mixed
    ]
    rewards = language_consistency_reward(prompts, completions)
    assert rewards == pytest.approx([1.0, 0.5, 1.0, 1 / 3, 1.0])
    # an explicit `language` column wins over the prompt's language
    assert language_consistency_reward(prompts[:1], completions[:1], language=["zh"]) == [0.0]


def test_overlong_penalty_is_dapo_soft_punishment_in_tokens():
    reward = overlong_penalty(max_completion_length=10, buffer=4)
    ids = [[0] * n for n in (3, 6, 8, 10, 12)]
    assert reward([""] * 5, [""] * 5, completion_ids=ids) == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    with pytest.raises(ConfigError, match="buffer"):
        overlong_penalty(10, 0)


def test_rewards_combine_as_a_weighted_sum_and_none_means_not_applicable():
    def first(prompts, completions, **kwargs):
        return [1.0, None, None, 0.5]

    def second(prompts, completions, **kwargs):
        return [0.5, 2.0, None, 0.0]

    rewards = compute_rewards([first, second], [1.0, 0.5], ["p"] * 4, ["a", "b", "c", "d"], [[1]] * 4, {})
    assert rewards.names == ["first", "second"]
    assert torch.equal(rewards.per_function.isnan(), torch.tensor([[False, False], [True, False], [True, True], [False, False]]))
    assert rewards.total[[0, 1, 3]].tolist() == pytest.approx([1.25, 1.0, 0.5])
    assert math.isnan(rewards.total[2])  # unscorable: every function said None


def test_user_reward_gets_trl_arguments_and_dataset_columns():
    seen = {}

    def brevity(prompts, completions, completion_ids, solution, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, solution=solution, **kwargs)
        return [-len(ids) / 10 for ids in completion_ids]

    rewards = compute_rewards([brevity], [1.0], ["p1", "p2"], ["x", "yy"], [[1], [1, 2]], {"solution": ["1", "2"], "task": ["a", "b"]})
    assert rewards.total.tolist() == pytest.approx([-0.1, -0.2])
    assert seen == {"prompts": ["p1", "p2"], "completions": ["x", "yy"], "completion_ids": [[1], [1, 2]],
                    "solution": ["1", "2"], "task": ["a", "b"]}
    assert required_columns(brevity) == ["solution"]
    assert required_columns(accuracy_reward) == ["answer"]
    assert required_columns(format_reward) == []


def test_missing_columns_are_named_before_training():
    def needs_solution(prompts, completions, solution, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match=r"'needs_solution' needs column\(s\) solution.*reward 'accuracy_reward' needs column\(s\) answer.*has: task"):
        check_reward_columns([needs_solution, accuracy_reward, format_reward], ["task"])


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (RuntimeError("boom"), "reward function 'bad' raised RuntimeError: boom"),
        ([1.0], "must return a list of 2 floats .* got 1 values"),
        (0.5, "must return a list of 2 floats .* got float"),
        ([1.0, "yes"], r"returned 'yes' for completion 1"),
        ([1.0, float("nan")], r"returned nan for completion 1"),
        ([True, 1.0], r"returned True for completion 0"),
    ],
)
def test_bad_reward_functions_stop_with_an_error_naming_them(returned, message):
    def bad(prompts, completions, **kwargs):
        if isinstance(returned, Exception):
            raise returned
        return returned

    with pytest.raises(TrainingError, match=message):
        compute_rewards([bad], [1.0], ["p", "q"], ["a", "b"], [[1], [2]], {})


def test_resolve_reward_names_and_module_paths():
    assert resolve_reward("accuracy", 64, 0) is accuracy_reward
    assert resolve_reward("nanoseek.train.rewards:format_reward", 64, 0) is format_reward
    overlong = resolve_reward("overlong", 64, 0)  # buffer defaults to a quarter of the length
    assert overlong([""], [""], completion_ids=[[0] * 56]) == [-0.5]
    with pytest.raises(ConfigError, match="unknown reward 'acc'"):
        resolve_reward("acc", 64, 0)
    with pytest.raises(ConfigError, match="cannot load reward 'nanoseek.train.rewards:nothing'"):
        resolve_reward("nanoseek.train.rewards:nothing", 64, 0)
