"""Training batches: packed pretraining windows from token shards, and SFT chats with loss masks.

Both loaders are endless iterators over epochs. Each epoch is a seeded permutation of its items
(windows or SFT rows), dealt round-robin to `world_size` ranks and cut into batches, so ranks see
disjoint data, every rank has the same number of batches (no rank waits on a collective forever),
and the whole state is (epoch, batch): `state_dict()` / `load_state_dict()` resume exactly.

Batches are dicts of CPU (or `device`) tensors with shared key names, so one loss serves both:

    input_ids [B, T] int64, targets [B, T] int64 (IGNORE_INDEX where nothing is trained)
    SFT adds loss_mask [B, T] bool, position_ids [B, T] and segment_ids [B, T] (0 = padding,
    1..k = the k-th packed example, for block-diagonal attention).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoseek.data.corpus import load_manifest
from nanoseek.errors import DataError
from nanoseek.tokenizer import Tokenizer

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


class EpochSampler:
    """Item indices for one rank: a seeded permutation per epoch, strided by rank, cut into batches."""

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world size {world_size})")
        if batch_size < 1:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.batches_per_epoch = num_items // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{num_items} items cannot fill one batch of {batch_size} on each of {world_size} ranks: "
                "use more data, a smaller batch or a shorter sequence length"
            )
        self.epoch, self.batch = 0, 0
        self._order: np.ndarray | None = None

    def _rank_order(self) -> np.ndarray:
        if self._order is None:
            order = np.arange(self.num_items)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)
            used = self.batches_per_epoch * self.batch_size * self.world_size
            self._order = order[:used][self.rank :: self.world_size]
        return self._order

    def next_batch(self) -> np.ndarray:
        start = self.batch * self.batch_size
        indices = self._rank_order()[start : start + self.batch_size]
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        return indices

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("num_items", "batch_size", "world_size"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"cannot resume: the saved loader had {key}={state[key]}, this one has {getattr(self, key)}"
                )
        self.seed, self.epoch, self.batch, self._order = state["seed"], state["epoch"], state["batch"], None


class EpochLoader:
    """What both loaders share: an endless iterator whose position lives in `self.sampler`."""

    sampler: EpochSampler

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


class PretrainLoader(EpochLoader):
    """Fixed-length next-token batches from the shards of `nanoseek data prepare`.

    Each shard is cut into windows of `seq_len + 1` tokens that start every `seq_len` tokens (so each
    token is a target exactly once per epoch); windows do not cross shards. Documents are packed
    (separated by EOS) with no padding, as in GPT-style pretraining.
    """

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int,
        seq_len: int,
        split: str = "train",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
    ):
        manifest = load_manifest(data_dir)
        if split not in manifest["splits"]:
            raise DataError(f"{data_dir} has no {split!r} split (it has {', '.join(manifest['splits'])})")
        if seq_len < 1:
            raise DataError(f"sequence length must be positive, got {seq_len}")
        self.seq_len, self.device = seq_len, torch.device(device)
        self.vocab_size = manifest["vocab_size"]
        self.shards = [
            np.load(Path(data_dir) / shard["file"], mmap_mode="r")
            for shard in manifest["splits"][split]["shards"]
        ]
        windows = np.array([max(0, (len(shard) - 1) // seq_len) for shard in self.shards], dtype=np.int64)
        self.window_starts = np.concatenate([[0], np.cumsum(windows)])  # first global window of each shard
        self.sampler = EpochSampler(int(windows.sum()), batch_size, seed, rank, world_size, shuffle)

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for window in self.sampler.next_batch():
            shard = int(np.searchsorted(self.window_starts, window, side="right")) - 1
            start = int(window - self.window_starts[shard]) * self.seq_len
            rows.append(self.shards[shard][start : start + self.seq_len + 1])
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64)).to(self.device)
        return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seq_len"] != self.seq_len:
            raise DataError(
                f"cannot resume: the saved loader had seq_len={state['seq_len']}, this one has {self.seq_len}"
            )
        super().load_state_dict(state)


@dataclass
class SFTExample:
    """One tokenized conversation; `loss_mask[i]` is 1 where token i is part of an assistant reply."""

    input_ids: list[int]
    loss_mask: list[int]


def tokenize_conversations(
    conversations: Sequence[Sequence[dict]], tokenizer: Tokenizer, max_length: int
) -> tuple[list[SFTExample], int]:
    """Render and tokenize chats; keep `max_length + 1` tokens (inputs and shifted targets) at most.

    Returns the examples that still train on at least one token, and how many were truncated.
    """
    examples, truncated = [], 0
    for messages in conversations:
        ids, mask = tokenizer.encode_chat(messages)
        if len(ids) > max_length + 1:
            ids, mask, truncated = ids[: max_length + 1], mask[: max_length + 1], truncated + 1
        if any(mask[1:]):
            examples.append(SFTExample(ids, mask))
    return examples, truncated


def _pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Next-fit packing of examples (their number of target positions) into rows of `capacity`."""
    rows: list[list[int]] = []
    used = capacity
    for index, length in enumerate(lengths):
        if used + length > capacity:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


class SFTLoader(EpochLoader):
    """Batches of chat examples whose loss covers only the assistant replies (and their EOS).

    Without packing, each row is one conversation, right-padded with the pad id to the longest row
    of the batch. With `packing`, conversations (in a seeded order) are concatenated into rows of
    `max_length` positions; `position_ids` restart and `segment_ids` change at each conversation, and
    no target crosses from one conversation into the next.
    """

    def __init__(
        self,
        conversations: Sequence[Sequence[dict]],
        tokenizer: Tokenizer,
        batch_size: int,
        max_length: int,
        seed: int = 0,
        packing: bool = False,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
    ):
        self.examples, self.truncated = tokenize_conversations(conversations, tokenizer, max_length)
        if not self.examples:
            raise DataError(
                f"none of the {len(conversations)} conversations has an assistant token to train on"
            )
        pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        if pad_id is None:
            raise DataError("the tokenizer has neither a pad nor an eos token to pad with")
        self.pad_id, self.max_length, self.device = pad_id, max_length, torch.device(device)
        if packing:
            order = (
                np.random.default_rng(seed).permutation(len(self.examples))
                if shuffle
                else np.arange(len(self.examples))
            )
            groups = _pack([len(self.examples[i].input_ids) - 1 for i in order], max_length)
            self.rows = [[int(order[i]) for i in group] for group in groups]
        else:
            self.rows = [[index] for index in range(len(self.examples))]
        self.sampler = EpochSampler(len(self.rows), batch_size, seed, rank, world_size, shuffle)

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = [self.rows[index] for index in self.sampler.next_batch()]
        width = max(sum(len(self.examples[i].input_ids) - 1 for i in row) for row in rows)
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        segment_ids = torch.zeros((len(rows), width), dtype=torch.long)
        for row_index, row in enumerate(rows):
            offset = 0
            for segment, example_index in enumerate(row, start=1):
                example = self.examples[example_index]
                length = len(example.input_ids) - 1
                ids = torch.tensor(example.input_ids, dtype=torch.long)
                mask = torch.tensor(example.loss_mask[1:], dtype=torch.bool)
                span = slice(offset, offset + length)
                inputs[row_index, span] = ids[:-1]
                targets[row_index, span] = torch.where(mask, ids[1:], IGNORE_INDEX)
                position_ids[row_index, span] = torch.arange(length)
                segment_ids[row_index, span] = segment
                offset += length
        batch = {
            "input_ids": inputs,
            "targets": targets,
            "loss_mask": targets != IGNORE_INDEX,
            "position_ids": position_ids,
            "segment_ids": segment_ids,
        }
        return {key: value.to(self.device) for key, value in batch.items()}
