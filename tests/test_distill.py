"""Distillation: the divergences against their formulas (limits, zero at equality, gradients, TRL's
GKD loss), a dense student's KL to a MoE teacher falling, on-policy batches, sequence-level
distillation through rejection sampling + SFT, resume, and the errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from post_training_fixtures import TASK_ARGS, WORKDIR, memorizing_model, random_model
from tokenizers import Tokenizer as BackendTokenizer
from train_fixtures import single_thread  # noqa: F401 (autouse)

from nanoseek.checkpoint import load_pretrained
from nanoseek.config import ModelConfig
from nanoseek.data.loader import IGNORE_INDEX, SFTLoader
from nanoseek.data.tasks import check_answer, check_format, make_mixed_problems
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.infer.engine import Engine
from nanoseek.model import build_model
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.distill import (
    DIVERGENCES,
    DistillConfig,
    OnPolicyBatches,
    check_same_tokenizer,
    distill,
    divergence,
    log_probs,
    prompt_ids,
)

# a few fast steps; no held-out generation (eval_problems=0), a validation loss at the end
TRAIN = ["max_steps=12", "global_batch_size=8", "micro_batch_size=8", "seq_len=64", "warmup_steps=2", "lr=3e-3",
         "eval_every=0", "eval_batches=2", "eval_problems=0", "checkpoint_every=0", "peak_tflops=1"]
STUDENT = ["model.num_hidden_layers=2"]  # qwen2-nano, two layers


def _logits(seed: int, shape=(6, 13), scale: float = 3.0) -> torch.Tensor:
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----- the divergences ----------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergences_match_their_definitions(temperature):
    student_logits, teacher_logits = _logits(0), _logits(1)
    p_s, p_t = (torch.softmax(x / temperature, -1) for x in (student_logits, teacher_logits))
    student, teacher = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    torch.testing.assert_close(divergence(student, teacher, "forward_kl"), _kl(p_t, p_s))
    torch.testing.assert_close(divergence(student, teacher, "reverse_kl"), _kl(p_s, p_t))
    for beta in (0.1, 0.5, 0.9):
        mixture = beta * p_t + (1 - beta) * p_s
        expected = beta * _kl(p_t, mixture) + (1 - beta) * _kl(p_s, mixture)
        torch.testing.assert_close(divergence(student, teacher, "jsd", beta), expected)
    # beta = 0.5 is the Jensen-Shannon divergence: symmetric and at most log 2
    jsd = divergence(student, teacher, "jsd", 0.5)
    torch.testing.assert_close(jsd, divergence(teacher, student, "jsd", 0.5))
    assert bool((jsd <= math.log(2)).all()) and bool((jsd > 0).all())


def test_jsd_limits_are_the_two_kls():
    student, teacher = log_probs(_logits(2)), log_probs(_logits(3))
    forward, reverse = divergence(student, teacher, "forward_kl"), divergence(student, teacher, "reverse_kl")
    # JSD_beta / beta = KL(p_T || p_S) + O(beta), JSD_beta / (1 - beta) = KL(p_S || p_T) + O(1 - beta)
    for limit, near in ((forward, lambda small: small), (reverse, lambda small: 1 - small)):
        errors = [float(((divergence(student, teacher, "jsd", near(small)) / small - limit) / limit).abs().max())
                  for small in (1e-6, 1e-7, 1e-8)]
        assert errors[1] < errors[0] / 8 and errors[2] < errors[1] / 8 and errors[2] < 1e-5  # linear in beta
    assert torch.equal(divergence(student, teacher, "jsd", 0.0), forward)  # TRL's convention at the ends
    assert torch.equal(divergence(student, teacher, "jsd", 1.0), reverse)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_zero_with_zero_gradient_when_the_student_is_the_teacher(kind):
    logits = _logits(4).requires_grad_()
    value = divergence(log_probs(logits, 1.5), log_probs(logits.detach(), 1.5), kind, 0.3)
    torch.testing.assert_close(value, torch.zeros_like(value), atol=1e-12, rtol=0)
    value.sum().backward()
    torch.testing.assert_close(logits.grad, torch.zeros_like(logits), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradients(kind):
    teacher = log_probs(_logits(5, (3, 7)), 2.0)
    torch.autograd.gradcheck(lambda z: divergence(log_probs(z, 2.0), teacher, kind, 0.3), (_logits(6, (3, 7)).requires_grad_(),))
    # closed form of the classic KD gradient: d KL(p_T || p_S) / d z_S = (p_S - p_T) / tau
    student_logits = _logits(7, (3, 7)).requires_grad_()
    divergence(log_probs(student_logits, 2.0), teacher, "forward_kl").sum().backward()
    torch.testing.assert_close(student_logits.grad, (torch.softmax(student_logits.detach() / 2.0, -1) - teacher.exp()) / 2.0)


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_matches_trl_generalized_jsd_loss(beta, monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd")
    student_logits, teacher_logits = _logits(8, (2, 5, 11)).float(), _logits(9, (2, 5, 11)).float()
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 3, 4], [IGNORE_INDEX, 5, 6, 7, IGNORE_INDEX]])
    expected = gkd.GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta=beta, temperature=0.9)
    mask = labels != IGNORE_INDEX
    ours = divergence(log_probs(student_logits[mask], 0.9), log_probs(teacher_logits[mask], 0.9), "jsd", beta).mean()
    torch.testing.assert_close(ours, expected)


# ----- training ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [["divergence=forward_kl"], ["divergence=reverse_kl"], ["divergence=jsd", "beta=0.5", "temperature=2.0"]])
def test_dense_student_kl_to_moe_teacher_falls(tmp_path, settings):
    metrics = distill(memorizing_model(), "qwen2-nano", from_tasks=64, tasks=["arithmetic"], difficulty=[1],
                      overrides=TRAIN + STUDENT + settings + ["max_steps=20"], name="kd", runs_dir=tmp_path)
    log = _metrics(tmp_path / "kd")
    first, last = log[0], log[-1]  # the first step's metrics are measured before its update
    assert [r["step"] for r in log] == list(range(1, 21))
    assert last["loss"] < 0.85 * first["loss"]  # the trained divergence
    assert last["forward_kl"] < 0.7 * first["forward_kl"] and last["reverse_kl"] < first["reverse_kl"]
    if settings == ["divergence=forward_kl"]:
        assert last["forward_kl"] < 0.5 * first["forward_kl"]
    assert "val_loss" in metrics
    student = load_pretrained(tmp_path / "kd" / "checkpoints" / "step_00000020")
    assert student.config.model_type == "qwen2" and student.config.num_hidden_layers == 2
    assert ModelConfig.from_hf(memorizing_model()).model_type == "deepseek_v3"
    assert student.config.vocab_size == ModelConfig.from_hf(memorizing_model()).vocab_size


def test_on_policy_batches_are_the_students_own_replies():
    tokenizer = Tokenizer.from_pretrained(random_model())
    student = load_pretrained(random_model())
    chats = [p.messages() for p in make_mixed_problems("train", 16, 0, [1], ["arithmetic"])]
    prompts = [prompt_ids(tokenizer, chat) for chat in chats]
    engine = Engine(student, tokenizer, max_num_seqs=4, max_model_len=64)

    def batches(fraction: float) -> OnPolicyBatches:
        dataset = SFTLoader(chats, tokenizer, batch_size=4, max_length=48, seed=0)
        return OnPolicyBatches(dataset, prompts, engine, DistillConfig(on_policy_fraction=fraction, on_policy_max_tokens=8), seed=0)

    batch = next(batches(1.0))
    assert batch["on_policy"] == 1 and batch["input_ids"].shape[0] == 4
    for inputs, targets in zip(batch["input_ids"], batch["targets"], strict=True):
        trained = (targets != IGNORE_INDEX).nonzero().flatten()
        assert 1 <= len(trained) <= 8 and torch.equal(trained, torch.arange(trained[0], trained[-1] + 1))
        prompt = inputs[: trained[0] + 1].tolist()
        assert prompt in prompts  # replies follow one of the prompts
        assert torch.equal(inputs[trained[0] + 1 : trained[-1] + 1], targets[trained[:-1]])  # teacher-forced reply
    assert next(batches(0.0))["on_policy"] == 0

    mixed = batches(0.5)
    kinds = [int(next(mixed)["on_policy"]) for _ in range(6)]
    assert 0 < sum(kinds) < 6
    replay = batches(0.5)
    replay.load_state_dict(batches(0.5).state_dict())
    state = mixed.state_dict()
    continued = [int(next(mixed)["on_policy"]) for _ in range(4)]
    replay.load_state_dict(state)
    assert [int(next(replay)["on_policy"]) for _ in range(4)] == continued


def test_on_policy_distillation_trains(tmp_path):
    distill(memorizing_model(), "qwen2-nano", from_tasks=64, tasks=["arithmetic"], difficulty=[1], name="gkd", runs_dir=tmp_path,
            overrides=TRAIN + STUDENT + ["max_steps=4", "on_policy_fraction=1.0", "on_policy_max_tokens=16"])
    log = _metrics(tmp_path / "gkd")
    assert [r["on_policy"] for r in log] == [1.0] * 4 and all(math.isfinite(r["loss"]) for r in log)


def test_sequence_level_distillation_is_rejection_sampling_then_sft(tmp_path):
    distill(memorizing_model(), "qwen2-nano", overrides=TRAIN + STUDENT + ["global_batch_size=4", "micro_batch_size=4",
            "mode=sequence", "sample.samples_per_prompt=4", "sample.max_tokens=32", "sample.temperature=0.5"],
            name="seq", runs_dir=tmp_path, **TASK_ARGS)
    run = tmp_path / "seq"
    stats = json.loads((run / "teacher_samples.stats.json").read_text())
    assert stats["prompts"] == 8 and stats["kept"] >= 8  # the teacher memorized these problems
    problems = {p.prompt: p for p in make_mixed_problems("train", 8, 0, [1], ["arithmetic"])}
    for line in (run / "teacher_samples.jsonl").read_text().splitlines():
        user, reply = json.loads(line)["messages"]
        assert check_format(reply["content"]).correct and check_answer(problems[user["content"]], reply["content"]).correct
    log = _metrics(run)
    assert log[-1]["step"] == 12 and log[-1]["lm_loss"] < log[0]["lm_loss"]
    assert load_pretrained(run / "checkpoints" / "step_00000012").config.model_type == "qwen2"


def test_resume_continues_and_a_finished_run_is_not_overwritten(tmp_path):
    settings = dict(from_tasks=64, tasks=["arithmetic"], difficulty=[1], name="kd", runs_dir=tmp_path)
    distill(memorizing_model(), "qwen2-nano", overrides=TRAIN + STUDENT + ["max_steps=3"], **settings)
    with pytest.raises(TrainingError, match="already holds a run"):
        distill(memorizing_model(), "qwen2-nano", overrides=TRAIN + STUDENT + ["max_steps=3"], **settings)
    distill(memorizing_model(), "qwen2-nano", overrides=TRAIN + STUDENT + ["max_steps=5"], resume=True, **settings)
    assert [r["step"] for r in _metrics(tmp_path / "kd")] == [1, 2, 3, 4, 5]


# ----- bad input ----------------------------------------------------------------------------------------
def _student_with_tokenizer(directory, tokenizer: Tokenizer):
    build_model(ModelConfig.from_preset("qwen2-nano", vocab_size=max(tokenizer.vocab_size, 16)), seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_tokenizer_mismatch_is_a_clear_error(tmp_path):
    teacher_tokenizer = Tokenizer.from_pretrained(memorizing_model())
    state = json.loads(teacher_tokenizer.backend.to_str())
    vocab = state["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two learned tokens swap ids
    swapped = Tokenizer(BackendTokenizer.from_str(json.dumps(state)), teacher_tokenizer.config, teacher_tokenizer.chat_template)
    with pytest.raises(ConfigError, match="both tokenizers have 700 tokens but split text into different ids"):
        check_same_tokenizer(teacher_tokenizer, swapped)
    check_same_tokenizer(teacher_tokenizer, Tokenizer.from_pretrained(memorizing_model()))

    smaller = Tokenizer.train(["Compute 1+2. <think>1+2=3</think>"] * 8, vocab_size=300, min_frequency=1)
    student = _student_with_tokenizer(WORKDIR / "other-tokenizer-student", smaller)
    with pytest.raises(ConfigError, match=r"tokenizers differ \(the teacher's tokenizer has 700 tokens, the student's \d+\).*mode=sequence"):
        distill(memorizing_model(), str(student), overrides=TRAIN, name="x", runs_dir=tmp_path, **TASK_ARGS)
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(overrides=["divergence=kl"]), ConfigError, "divergence 'kl' is not one of"),
    (dict(overrides=["beta=2"]), ConfigError, r"beta must be in \[0, 1\]"),
    (dict(overrides=["lrr=1"]), ConfigError, "did you mean 'lr'"),
    (dict(overrides=["sample.samples_per_prompt=0"]), ConfigError, "samples_per_prompt must be >= 1"),
    (dict(overrides=["mode=sequence"], data="prompts.jsonl"), ConfigError, "give exactly one source of prompts"),
    (dict(student="missing/dir"), ConfigError, "is not a model directory"),
    (dict(teacher="missing/dir"), ConfigError, "is not a model directory"),
])
def test_bad_settings_fail_before_any_work(tmp_path, kwargs, error, message):
    arguments = dict(teacher=memorizing_model(), student="qwen2-nano", name="x", runs_dir=tmp_path, **TASK_ARGS) | kwargs
    with pytest.raises(error, match=message):
        distill(**arguments)
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_model_settings_need_a_preset_student(tmp_path):
    with pytest.raises(ConfigError, match="model.* settings apply to a preset student"):
        distill(memorizing_model(), str(random_model()), overrides=STUDENT, name="x", runs_dir=tmp_path, **TASK_ARGS)


def test_a_teacher_that_solves_nothing_stops_sequence_distillation(tmp_path):
    with pytest.raises(TrainingError, match="kept nothing.*nothing to train on"):
        distill(random_model(), "qwen2-nano", overrides=TRAIN + ["mode=sequence", "sample.samples_per_prompt=2", "sample.max_tokens=8"],
                name="x", runs_dir=tmp_path, **TASK_ARGS)
    assert not (tmp_path / "x" / "metrics.jsonl").exists()
