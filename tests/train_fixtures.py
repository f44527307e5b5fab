"""Shared pieces of the training tests: a tiny MoE + MTP model, token shards, synthetic batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import small_tokenizer

from nanoseek.config import ModelConfig
from nanoseek.data.corpus import prepare_corpus

REPO = Path(__file__).resolve().parent.parent

# nano's routing (8 experts, top-2, 2 groups, sigmoid + bias, 1 shared expert), one dense and one MoE
# layer plus one MTP depth, at a width where a step takes milliseconds.
TINY_MODEL = {
    "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
    "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
}
TINY_MODEL_ARGS = [f"model.{key}={value}" for key, value in TINY_MODEL.items()]
FAST_TRAIN_ARGS = [
    "global_batch_size=4", "micro_batch_size=2", "seq_len=32", "warmup_steps=1", "eval_batches=2",
    "peak_tflops=1", "seed=0",
]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
    spinning at barriers make a 20 ms step take seconds. Subprocesses get OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig.from_preset("nano", **{**TINY_MODEL, "vocab_size": 128, **overrides})


def token_shards(directory: Path) -> Path:
    """Generated task text tokenized into train/val shards (built once per directory)."""
    if not (directory / "manifest.json").exists():
        prepare_corpus([], small_tokenizer(), directory, from_tasks=1500, val_fraction=0.05)
    return directory


class SyntheticBatches:
    """Seeded random token batches with a resumable position; `skew` concentrates tokens on a few ids."""

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, seed: int = 0, skew: int | None = None):
        self.vocab_size, self.batch_size, self.seq_len, self.seed, self.skew = vocab_size, batch_size, seq_len, seed, skew
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.index)
        self.index += 1
        high = self.skew or self.vocab_size
        tokens = torch.randint(0, high, (self.batch_size, self.seq_len + 1), generator=generator)
        return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = state["index"]


def run_nanoseek(args: list[str], cwd: Path, launcher: list[str] | None = None, **popen) -> subprocess.Popen:
    """Start `python -m nanoseek ARGS` (or `LAUNCHER -m nanoseek ARGS`) single-threaded, output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = (launcher or [sys.executable]) + ["-m", "nanoseek", *args]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
