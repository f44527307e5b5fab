"""Shared pieces of the rejection-sampling, distillation and pipeline tests: a tiny model that has
memorized a few arithmetic problems (so sampling from it yields verified-correct answers), built once."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
from data_fixtures import small_tokenizer
from train_fixtures import tiny_config

from nanoseek.data.loader import SFTLoader
from nanoseek.data.tasks import Problem, make_mixed_problems
from nanoseek.model import build_model
from nanoseek.train.trainer import TrainConfig, Trainer

# The models built once per test session live here (removed when the interpreter exits).
_TEMPORARY = tempfile.TemporaryDirectory(prefix="nanoseek-post-training-")
WORKDIR = Path(_TEMPORARY.name)
FAST_TRAIN = dict(peak_tflops=1.0, checkpoint_every=0, eval_every=0, log_every=1000, seed=0)


# The problems `--from-tasks 8 --tasks arithmetic --difficulty 1` gives with seed 0 (English and Chinese).
TASK_ARGS = dict(from_tasks=8, tasks=["arithmetic"], difficulty=[1])


@functools.cache
def memorized_problems() -> tuple[Problem, ...]:
    return tuple(make_mixed_problems("train", 8, 0, [1], ["arithmetic"]))


@functools.cache
def unseen_problems() -> tuple[Problem, ...]:
    """Arithmetic problems the memorizing model was not trained on (it mostly gets them wrong)."""
    trained = {problem.prompt for problem in memorized_problems()}
    pool = make_mixed_problems("train", 40, 1, [1], ["arithmetic"])
    return tuple([problem for problem in pool if problem.prompt not in trained][:4])


def train_model(directory: Path, problems, steps: int, seed: int = 0, **model_overrides) -> Path:
    """SFT a tiny random model on `problems`' worked solutions; returns its final checkpoint."""
    tokenizer = small_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(
            global_batch_size=8, micro_batch_size=8, seq_len=64, max_steps=steps, lr=1e-2, warmup_steps=5,
            **FAST_TRAIN,
        )
        loader = SFTLoader([p.messages() for p in problems], tokenizer, batch_size=8, max_length=64, seed=seed)
        model = build_model(tiny_config(vocab_size=tokenizer.vocab_size, **model_overrides), seed=seed)
        trainer = Trainer(model, config, directory, tokenizer=tokenizer)
        trainer.fit(loader)
    finally:
        torch.set_num_threads(threads)
    assert trainer.last_checkpoint is not None
    return trainer.last_checkpoint


@functools.cache
def memorizing_model() -> Path:
    """A tiny MoE model trained until it reproduces the solutions of `memorized_problems()` (about 2 s)."""
    return train_model(WORKDIR / "memorizer", memorized_problems(), steps=100)


@functools.cache
def random_model() -> Path:
    """The same architecture, untrained: its samples are never correct."""
    directory = WORKDIR / "random"
    tokenizer = small_tokenizer()
    build_model(tiny_config(vocab_size=tokenizer.vocab_size), seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
