"""Evaluation: the pass@k estimator, majority voting, task metrics through a scripted engine and a real
one, perplexity, and the CLI."""

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
from data_fixtures import small_tokenizer
from post_training_fixtures import memorized_problems, memorizing_model, random_model
from train_fixtures import single_thread, tiny_config, token_shards  # noqa: F401 (single_thread: autouse)

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main
from nanoseek.data.tasks import make_problems
from nanoseek.errors import ConfigError
from nanoseek.eval.evaluate import evaluate_tasks, heldout_problems, majority_answer, pass_at_k, perplexity
from nanoseek.infer.engine import Engine
from nanoseek.model import build_model


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in [(5, 2, 2), (8, 3, 4), (6, 0, 3), (4, 4, 1), (10, 1, 10)]:
        # brute force: the share of k-subsets of the n samples that contain a correct one
        subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    with pytest.raises(ConfigError):
        pass_at_k(4, 1, 5)


def test_majority_answer_votes_over_extracted_answers():
    texts = ["<answer>3</answer>", "the answer is 4", "<answer>4</answer>", "nothing", "<answer>3</answer>"]
    assert majority_answer(texts) == 0  # 3 and 4 tie: the answer seen first wins
    assert majority_answer(texts[:3]) == 1
    assert majority_answer(["no", "answers"]) is None


class ScriptedEngine:
    """Answers each problem with the completions listed for it (greedy: the first one)."""

    def __init__(self, answers):
        self.answers, self.tokenizer = answers, small_tokenizer()
        self.model = torch.nn.Linear(1, 1)

    def generate(self, prompts, params, n=1):
        greedy = not isinstance(params, list)
        outputs = []
        for index in range(len(prompts)):
            texts = self.answers[index][:1] if greedy else self.answers[index][1 : 1 + n]
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(text=t, token_ids=[0] * len(t)) for t in texts]))
        return outputs


def test_task_metrics_from_scripted_completions():
    problems = make_problems("arithmetic", count=2, difficulty=1, language="en") + make_problems("countdown", count=1, difficulty=1)
    right = [f"<think>\nx\n</think>\n<answer>{p.answer}</answer>" for p in problems]
    wrong = "<think>\nx\n</think>\n<answer>999999</answer>"
    engine = ScriptedEngine([
        [right[0], wrong, right[0], right[0], wrong],  # greedy right; samples 2 of 4 right, the tie goes to wrong
        [f"<answer>{problems[1].answer}</answer>", wrong, wrong, wrong, wrong],  # right but badly formatted; samples wrong
        [wrong, right[2], right[2], right[2], wrong],  # greedy wrong; 3 of 4 right
    ])
    metrics = evaluate_tasks(engine, problems, samples=4, max_tokens=32)
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["format_rate"] == pytest.approx(2 / 3)
    assert metrics["accuracy/arithmetic"] == 1.0 and metrics["accuracy/countdown"] == 0.0
    assert metrics["pass@1"] == pytest.approx((2 / 4 + 0 + 3 / 4) / 3)
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    assert metrics["maj@4"] == pytest.approx(1 / 3)  # problem 0 ties 2-2 (wrong first), problem 2 wins 3-1


def test_a_memorizing_model_is_right_on_its_problems_through_the_engine():
    model = load_pretrained(memorizing_model())
    engine = Engine(model, small_tokenizer(), max_model_len=128)
    metrics = evaluate_tasks(engine, list(memorized_problems()), samples=2, temperature=0.5, max_tokens=48)
    assert metrics["accuracy"] >= 0.75 and metrics["format_rate"] >= 0.75 and metrics["pass@2"] >= metrics["pass@1"]


def test_heldout_problems_come_from_the_test_split():
    problems = heldout_problems(20, ["arithmetic", "countdown"], [1, 2])
    assert len(problems) == 20 and {p.split for p in problems} == {"test"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return token_shards(tmp_path_factory.getbasetemp() / "shards")


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(shards):
    model = build_model(tiny_config(vocab_size=small_tokenizer().vocab_size), seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = perplexity(model, shards, "val", seq_len=32, batch_size=2, max_batches=2)
    assert result["perplexity"] == pytest.approx(small_tokenizer().vocab_size, rel=1e-4)
    assert result["tokens"] == 2 * 2 * 32 and result["loss"] == pytest.approx(math.log(small_tokenizer().vocab_size), rel=1e-5)


def test_cli_prints_one_json_line(shards, capsys):
    code = main(["eval", "--model", str(random_model()), "--count", "4", "--samples", "2", "--max-tokens", "8",
                 "--tasks", "arithmetic", "--difficulty", "1", "--data", str(shards), "--seq-len", "32", "--batches", "1"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert {"accuracy", "format_rate", "pass@1", "pass@2", "maj@2", "val_perplexity", "problems"} <= set(report)
    assert report["problems"] == 4
