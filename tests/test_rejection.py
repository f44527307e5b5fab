"""Rejection sampling: each filter in isolation, whole runs on a model that memorized some problems
(kept samples verified and unique, stats that add up, reproducible output), on a random model
(nothing kept: a clear error, no dataset), prompts from a JSONL file, and the command line."""

from __future__ import annotations

import json

import pytest
from post_training_fixtures import memorized_problems, memorizing_model, random_model, unseen_problems
from train_fixtures import single_thread  # noqa: F401 (autouse)

from nanoseek.cli import main as nanoseek_main
from nanoseek.data.loader import SFTLoader
from nanoseek.data.tasks import Problem, check_answer, check_format, make_problems
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.grpo import problem_rows
from nanoseek.train.rejection import (
    FILTERS,
    RejectionConfig,
    rejection_sample,
    select_completions,
    stats_path,
)


def _reply(problem: Problem, answer: str | None = None, steps: str = "x") -> str:
    return f"<think>\n{steps}\n</think>\n<answer>{answer or problem.answer}</answer>"


def test_each_filter_drops_what_it_names_in_order():
    problem = make_problems("arithmetic", count=1, difficulty=1, language="zh", seed=3)[0]
    wrong = str(int(problem.answer) + 1)
    good = _reply(problem, steps="1+2=3")
    cases = [
        (good, "length", "truncated"),  # even a correct answer: it never finished
        (problem.solution.replace("</think>", ""), "stop", "format"),
        (_reply(problem, wrong, steps="1+2=3"), "stop", "incorrect"),
        (_reply(problem, steps="first add the units"), "stop", "language"),  # English reasoning, Chinese prompt
        (good, "stop", None),
        ("  " + good.replace("\n", "\n  ") + " ", "stop", "duplicate"),  # same text up to whitespace
        (problem.solution, "stop", None),
        (_reply(problem, steps="3=1+2"), "stop", "over_limit"),
    ]
    config = RejectionConfig(max_per_prompt=2)
    row = problem_rows([problem])[0]
    selection = select_completions(row, [c[0] for c in cases], [c[1] for c in cases], config)
    assert selection.kept == [good, problem.solution]
    expected = {name: sum(c[2] == name for c in cases) for name in FILTERS}
    assert dict(selection.dropped) == {name: n for name, n in expected.items() if n}
    assert selection.correct == 7  # answers the checker accepts, whatever the format: all but the wrong one
    assert select_completions(row, [good] * 3, ["stop"] * 3, RejectionConfig(max_per_prompt=0)).kept == [good]
    assert select_completions(row, [good], ["stop"], RejectionConfig(min_language_share=0)).kept == [good]


def test_rejection_sampling_keeps_verified_unique_samples(tmp_path):
    problems = list(memorized_problems()) + list(unseen_problems())
    config = RejectionConfig(samples_per_prompt=6, temperature=1.0, max_tokens=32, max_per_prompt=3)
    out = tmp_path / "rs.jsonl"
    stats = rejection_sample(memorizing_model(), problem_rows(problems), config, out)

    assert stats.prompts == len(problems) and stats.samples == 6 * len(problems)
    assert stats.kept + sum(stats.dropped.values()) == stats.samples
    assert stats.kept >= len(memorized_problems())  # the memorized problems come back correct
    assert stats.prompts_without_correct >= 1  # unseen problems: mostly wrong
    assert json.loads(stats_path(out).read_text()) == json.loads(json.dumps(stats.to_dict()))

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == stats.kept
    by_id = {problem.id: problem for problem in problems}
    per_prompt: dict[str, list[str]] = {}
    for record in records:
        user, assistant = record["messages"]
        problem = by_id[record["id"]]
        assert user == {"role": "user", "content": problem.prompt}
        assert check_format(assistant["content"]).correct and check_answer(problem, assistant["content"]).correct
        per_prompt.setdefault(problem.id, []).append(assistant["content"])
    assert all(len(texts) == len(set(texts)) <= 3 for texts in per_prompt.values())
    # the dataset trains as is
    tokenizer = Tokenizer.from_pretrained(memorizing_model())
    assert len(SFTLoader([r["messages"] for r in records], tokenizer, batch_size=1, max_length=64).examples) == len(records)

    again = tmp_path / "again.jsonl"
    rejection_sample(memorizing_model(), problem_rows(problems), config, again)
    assert again.read_bytes() == out.read_bytes()  # seeded per prompt: the same samples


def test_nothing_kept_is_an_error_and_writes_no_dataset(tmp_path):
    out = tmp_path / "rs.jsonl"
    with pytest.raises(TrainingError, match="kept nothing.*nothing to train on"):
        rejection_sample(random_model(), problem_rows(memorized_problems()[:3]), RejectionConfig(samples_per_prompt=2, max_tokens=8), out)
    assert not out.exists()
    stats = json.loads(stats_path(out).read_text())
    assert stats["kept"] == 0 and stats["samples"] == 6 and stats["prompts_without_correct"] == 3
    assert stats["dropped"]["truncated"] + stats["dropped"]["format"] == 6


def test_prompts_from_a_jsonl_file_and_bad_prompt_rows(tmp_path):
    problems = memorized_problems()[:2]
    rows = [{"prompt": p.prompt, "answer": p.answer} for p in problems]  # text prompts, no other column
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "rs.jsonl"
    assert nanoseek_main(["rejection-sample", "--model", str(memorizing_model()), "--data", str(prompts), "--out", str(out),
                          "samples_per_prompt=4", "max_tokens=32", "temperature=0.5"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["messages"][0]["content"] for r in records} == {p.prompt for p in problems}
    assert all(r["messages"][0]["role"] == "user" and "id" not in r for r in records)
    with pytest.raises(ConfigError, match="reward 'accuracy_reward' needs column\\(s\\) answer"):
        rejection_sample(memorizing_model(), [{"prompt": "Compute 1+2."}], RejectionConfig(), out)
    with pytest.raises(ConfigError, match="is not a model directory"):
        rejection_sample(tmp_path / "missing", rows, RejectionConfig(), out)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    args = ["rejection-sample", "--model", str(memorizing_model()), "--out", str(out), "--from-tasks", "4"]
    problems = ["--tasks", "arithmetic", "--difficulty", "1"]  # after the settings: these take several values
    assert nanoseek_main([*args, "samples_per_prompt=2", "max_tokens=32", *problems]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["prompts"] == 4 and summary["samples"] == 8 and summary["kept"] > 0
    assert nanoseek_main([*args, "samples_per_promt=2", *problems]) == 2
    assert "did you mean 'samples_per_prompt'" in capsys.readouterr().err
    assert nanoseek_main([*args, "max_per_prompt=-1", *problems]) == 2
    assert "max_per_prompt must be >= 0" in capsys.readouterr().err
    assert nanoseek_main(args[:5] + ["max_tokens=8"]) == 2
    assert "give exactly one source of prompts" in capsys.readouterr().err
