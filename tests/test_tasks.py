"""Verifiable tasks: determinism, disjoint splits, correct worked solutions, strict and safe checkers."""

from __future__ import annotations

import operator
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoseek.data.tasks import (
    DIFFICULTIES,
    LANGUAGES,
    TASKS,
    check_answer,
    check_countdown,
    check_format,
    check_number,
    evaluate_expression,
    extract_answer,
    make_mixed_problems,
    make_problems,
    split_of,
    task_corpus_text,
    task_documents,
)
from nanoseek.errors import ConfigError, DataError

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def test_generation_is_deterministic_by_seed():
    for task in TASKS:
        first = make_problems(task, "train", 30, seed=3, difficulty=3)
        assert make_problems(task, "train", 30, seed=3, difficulty=3) == first
        assert make_problems(task, "train", 30, seed=4, difficulty=3) != first
        assert len({p.prompt for p in first}) == 30 and len({p.id for p in first}) == 30


def test_train_and_test_splits_never_overlap():
    train = [p for task in TASKS for p in make_problems(task, "train", 400, seed=0, difficulty=(1, 2))]
    test = [p for task in TASKS for p in make_problems(task, "test", 150, seed=0, difficulty=(1, 2))]
    assert all(p.split == "train" == split_of(p.key) for p in train)
    assert all(p.split == "test" == split_of(p.key) for p in test)
    # disjoint by wording and by content: "12+34" in a word problem is the same problem as "Compute 34+12."
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert not {p.key for p in train} & {p.key for p in test}
    assert make_problems("arithmetic", "train", 1, difficulty=1)[0].key.split(":")[0] in ("add", "sub", "mul")


def test_split_is_a_hash_of_content_not_of_the_seed():
    keys = [f"add:{a}:{a + 1}" for a in range(2000)]
    held_out = sum(split_of(key) == "test" for key in keys) / len(keys)
    assert 0.07 < held_out < 0.13
    assert [split_of(key) for key in keys] == [split_of(key) for key in keys]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("difficulty", DIFFICULTIES)
def test_worked_solutions_are_correct_and_well_formed(task, difficulty):
    for problem in make_problems(task, "train", 25, seed=difficulty, difficulty=difficulty):
        assert problem.solution.startswith("<think>\n") and problem.solution.endswith(
            f"\n</think>\n<answer>{problem.answer}</answer>"
        )
        assert check_answer(problem, problem.solution).correct
        assert check_format(problem.solution).correct
        assert problem.difficulty == difficulty and problem.language in LANGUAGES
        assert problem.messages()[1]["content"] == problem.solution


def test_arithmetic_answers_and_column_steps_are_right():
    for problem in make_problems("arithmetic", "train", 300, seed=1, difficulty=(1, 2, 3, 4, 5)):
        a, op, b = re.search(r"(\d+)([+\-*])(\d+)", problem.prompt).groups()
        assert int(problem.answer) == OPERATORS[op](int(a), int(b))
        steps = problem.solution.split("\n")[1:-2]
        if (
            op == "+"
        ):  # the answer reads off the columns: last column's sum whole, then the others' last digits
            assert problem.answer == steps[-1].split("=")[1] + "".join(s[-1] for s in reversed(steps[:-1]))
        elif op == "-" and int(a) >= int(b):
            assert problem.answer == str(int("".join(s.split("=")[1] for s in reversed(steps))))


def test_worked_solutions_are_short():
    for problem in make_mixed_problems("train", 300, seed=0, difficulty=3):
        assert problem.solution.count("\n") <= 8 and len(problem.solution) < 200


def test_countdown_gold_uses_only_the_given_numbers():
    for problem in make_problems("countdown", "train", 100, seed=2, difficulty=(1, 3, 5)):
        value, literals = evaluate_expression(problem.answer)
        assert value == problem.target and sorted(literals) == sorted(problem.numbers)
        assert str(problem.target) in problem.prompt and all(
            str(n) in problem.prompt for n in problem.numbers
        )


def test_word_problems_are_bilingual_over_the_same_arithmetic():
    english = make_problems("word_problem", "train", 60, seed=5, difficulty=2, language="en")
    chinese = make_problems("word_problem", "train", 60, seed=5, difficulty=2, language="zh")
    assert all(p.prompt.isascii() for p in english)
    assert all(re.search(r"[\u4e00-\u9fff]", p.prompt) for p in chinese)
    for problem in english + chinese:
        a, op, b = re.match(r"<think>\n(\d+)([+\-*])(\d+)\n", problem.solution).groups()
        assert a in problem.prompt and b in problem.prompt
        assert int(problem.answer) == OPERATORS[op](int(a), int(b)) >= 0


def test_mixed_generator_and_corpus_text():
    problems = make_mixed_problems("test", 90, seed=1, difficulty=(1, 2, 3))
    assert problems == make_mixed_problems("test", 90, seed=1, difficulty=(1, 2, 3))
    assert {p.task for p in problems} == set(TASKS) and all(p.split == "test" for p in problems)
    documents = task_documents(50, seed=0)
    assert len(documents) == 50 and all("</think>\n<answer>" in d for d in documents)
    text = task_corpus_text(50, seed=0)
    assert text == "\n\n".join(documents) and re.search(r"[\u4e00-\u9fff]", text) and "Compute" in text


def test_bad_arguments():
    with pytest.raises(DataError, match="distinct"):
        make_problems("arithmetic", "test", 500, difficulty=1)  # 1-digit test problems are few
    with pytest.raises(ConfigError, match="unknown task"):
        make_problems("chess", "train", 1)
    with pytest.raises(ConfigError, match="difficulty"):
        make_problems("arithmetic", "train", 1, difficulty=9)
    with pytest.raises(ConfigError, match="split"):
        make_problems("arithmetic", "validation", 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\n2+2=4\n</think>\n<answer> 4 </answer>", "4"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # the last answer counts
        ("so \\boxed{\\frac{1}{2}} and 7", "\\frac{1}{2}"),  # nested braces
        ("<answer>5</answer> \\boxed{6}", "5"),  # the tag wins over \\boxed
        ("5+7=12, so 12.", "12"),
        ("it is -3", "-3"),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_check_number():
    assert check_number("<answer>9,022</answer>", 9022).correct
    assert check_number("<answer>-62</answer>", "-62").correct
    assert check_number("<answer>12.0</answer>", 12).correct
    result = check_number("<answer>631</answer>", 632)
    assert not result.correct and result.reason == "expected 632, got 631" and result.extracted == "631"
    assert check_number("<answer>many</answer>", 3).reason == "answer 'many' is not a number"
    assert check_number("", 3).reason == "no answer found"


@pytest.mark.parametrize(
    ("answer", "correct", "reason"),
    [
        ("(8*3)-4", True, "correct"),
        ("8 × 3 − 4 = 20", True, "correct"),  # unicode operators and a trailing "= target"
        ("4*3+8", True, "correct"),
        ("8*3-4-4", False, "not available: 4"),  # 4 used twice
        ("8*3-5+1", False, "not available: 1, 5"),
        ("8*3", False, "equals 24, not 20"),
        ("-4+8*3", False, "is not allowed"),  # unary minus is not one of the operations
        ("8**3", False, "is not allowed"),
        ("__import__('os').system('x')", False, "characters other than"),
        ("8/(4-4)", False, "division by zero"),
        ("(" * 150 + "8" + ")" * 150, False, "longer than"),
        ("8*3-", False, "not a valid expression"),
    ],
)
def test_countdown_checker(answer, correct, reason):
    result = check_countdown(f"<think>\n...\n</think>\n<answer>{answer}</answer>", [8, 3, 4], 20)
    assert result.correct is correct and reason in result.reason and result.extracted == answer


def test_countdown_uses_exact_rational_arithmetic():
    assert check_countdown("<answer>6/(1-3/4)</answer>", [1, 3, 4, 6], 24).correct
    assert evaluate_expression("1/3+1/3+1/3")[0] == Fraction(1)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<think>\nsteps\n</think>\n<answer>5</answer>", "well formed"),
        ("  <think>x</think>\n\n<answer>5</answer>\n", "well formed"),
        ("<answer>5</answer>", "<think> appears 0 times"),
        ("<think>a</think><answer>5</answer><answer>6</answer>", "<answer> appears 2 times"),
        ("<think>a</think></think><answer>5</answer>", "</think> appears 2 times"),
        ("<answer>5</answer><think>a</think>", "out of order"),
        ("Sure! <think>a</think><answer>5</answer>", "text before <think>"),
        ("<think>a</think> so <answer>5</answer>", "between </think> and <answer>"),
        ("<think>a</think><answer>5</answer> done", "text after </answer>"),
        ("<think>a</think><answer>  </answer>", "empty answer"),
    ],
)
def test_format_checker(text, reason):
    result = check_format(text)
    assert reason in result.reason and result.correct is (reason == "well formed")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("0123456789+-*/()x=<>answer/think \\boxed{}.,")), max_size=80))
def test_checkers_never_raise_on_model_text(text):
    arithmetic = make_problems("arithmetic", "train", 1, seed=0)[0]
    countdown = make_problems("countdown", "train", 1, seed=0)[0]
    for problem in (arithmetic, countdown):
        result = check_answer(problem, text)
        assert isinstance(result.correct, bool) and result.reason
    assert isinstance(check_format(text).correct, bool)
