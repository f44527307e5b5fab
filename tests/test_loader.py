"""Loaders: packed pretraining windows and SFT batches; determinism, resume, rank sharding, loss masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_fixtures import small_tokenizer

from nanoseek.data.corpus import load_manifest, prepare_corpus
from nanoseek.data.loader import IGNORE_INDEX, EpochSampler, PretrainLoader, SFTLoader
from nanoseek.data.tasks import make_problems
from nanoseek.errors import DataError

SEQ_LEN = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards") / "tasks"
    prepare_corpus([], small_tokenizer(), path, from_tasks=120, val_fraction=0.05, shard_tokens=2000)
    return path


@pytest.fixture(scope="module")
def shard_tokens(shards):
    manifest = load_manifest(shards)
    return [np.load(shards / shard["file"]) for shard in manifest["splits"]["train"]["shards"]]


def take(loader, count):
    return [next(loader) for _ in range(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def window_of(row: torch.Tensor, shard_tokens) -> tuple[int, int]:
    """(shard, start) of the window whose first seq_len tokens are `row`."""
    matches = [
        (index, start)
        for index, tokens in enumerate(shard_tokens)
        for start in range(0, len(tokens) - SEQ_LEN, SEQ_LEN)
        if np.array_equal(tokens[start : start + SEQ_LEN], row.numpy())
    ]
    assert len(matches) == 1, "row is not exactly one window of the shards"
    return matches[0]


def test_pretrain_batches_are_shifted_windows_of_the_shards(shards, shard_tokens):
    loader = PretrainLoader(shards, batch_size=4, seq_len=SEQ_LEN, seed=0)
    batch = next(loader)
    assert batch["input_ids"].shape == batch["targets"].shape == (4, SEQ_LEN)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].device.type == "cpu"
    for inputs, targets in zip(batch["input_ids"], batch["targets"], strict=True):
        shard, start = window_of(inputs, shard_tokens)
        assert np.array_equal(targets.numpy(), shard_tokens[shard][start + 1 : start + SEQ_LEN + 1])
    windows = sum((len(tokens) - 1) // SEQ_LEN for tokens in shard_tokens)
    assert loader.batches_per_epoch == windows // 4


def test_pretrain_epoch_covers_every_window_once_and_reshuffles(shards, shard_tokens):
    loader = PretrainLoader(shards, batch_size=5, seq_len=SEQ_LEN, seed=3)
    epochs = [take(loader, loader.batches_per_epoch) for _ in range(2)]
    firsts = [
        [window_of(row, shard_tokens) for batch in epoch for row in batch["input_ids"]] for epoch in epochs
    ]
    assert len(set(firsts[0])) == len(firsts[0]) == loader.batches_per_epoch * 5
    assert firsts[0] != firsts[1] and set(firsts[0]) != set() and loader.sampler.epoch == 2


def test_pretrain_is_deterministic_by_seed(shards):
    first = take(PretrainLoader(shards, batch_size=4, seq_len=SEQ_LEN, seed=7), 3)
    assert_same_batches(first, take(PretrainLoader(shards, batch_size=4, seq_len=SEQ_LEN, seed=7), 3))
    other = take(PretrainLoader(shards, batch_size=4, seq_len=SEQ_LEN, seed=8), 3)
    assert not torch.equal(first[0]["input_ids"], other[0]["input_ids"])


@pytest.mark.parametrize("before_epoch_end", [10, 2])  # the 5 batches after the state cross into epoch 2
def test_pretrain_resumes_from_state_dict(shards, before_epoch_end):
    loader = PretrainLoader(shards, batch_size=8, seq_len=SEQ_LEN, seed=1)
    take(loader, loader.batches_per_epoch - before_epoch_end)
    state = loader.state_dict()
    expected = take(loader, 5)
    resumed = PretrainLoader(shards, batch_size=8, seq_len=SEQ_LEN, seed=999)  # the state restores the seed
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 5), expected)
    with pytest.raises(DataError, match="seq_len"):
        PretrainLoader(shards, batch_size=8, seq_len=16).load_state_dict(state)


def test_pretrain_ranks_get_disjoint_equal_shares(shards, shard_tokens):
    world = 3
    loaders = [
        PretrainLoader(shards, batch_size=2, seq_len=SEQ_LEN, seed=5, rank=r, world_size=world)
        for r in range(world)
    ]
    assert len({loader.batches_per_epoch for loader in loaders}) == 1
    seen = [
        {
            window_of(row, shard_tokens)
            for batch in take(loader, loader.batches_per_epoch)
            for row in batch["input_ids"]
        }
        for loader in loaders
    ]
    assert all(len(windows) == loaders[0].batches_per_epoch * 2 for windows in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_pretrain_errors(shards):
    with pytest.raises(DataError, match="cannot fill one batch"):
        PretrainLoader(shards, batch_size=10_000, seq_len=SEQ_LEN)
    with pytest.raises(DataError, match="no 'dev' split"):
        PretrainLoader(shards, batch_size=1, seq_len=SEQ_LEN, split="dev")
    with pytest.raises(DataError, match="rank"):
        EpochSampler(10, 1, rank=2, world_size=2)
    with pytest.raises(DataError, match="no manifest.json"):
        PretrainLoader(shards.parent, batch_size=1, seq_len=SEQ_LEN)
    validation = PretrainLoader(shards, batch_size=1, seq_len=SEQ_LEN, split="val", shuffle=False)
    assert validation.batches_per_epoch >= 1


@pytest.fixture(scope="module")
def conversations():
    problems = make_problems("arithmetic", "train", 24, seed=0, difficulty=2)
    multi_turn = [
        {"role": "system", "content": "Be exact."},
        *problems[0].messages(),
        {"role": "user", "content": problems[1].prompt},
        {"role": "assistant", "content": problems[1].solution},
    ]
    return [p.messages() for p in problems] + [multi_turn]


def expected_replies(conversation) -> str:
    """The assistant text an SFT loss should train on: replies with EOS, earlier reasoning stripped (R1)."""
    assistant = [i for i, m in enumerate(conversation) if m["role"] == "assistant"]
    replies = [conversation[i]["content"] for i in assistant]
    replies = [r.split("</think>")[-1] for r in replies[:-1]] + replies[-1:]
    return "".join(reply + "<｜end▁of▁sentence｜>" for reply in replies)


@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_mask_covers_exactly_the_assistant_replies(conversations, packing):
    tokenizer = small_tokenizer()
    loader = SFTLoader(
        conversations,
        tokenizer,
        batch_size=len(conversations) if not packing else 2,
        max_length=256,
        packing=packing,
        shuffle=False,
    )
    trained, seen = [], []
    for batch in take(loader, loader.batches_per_epoch):
        assert torch.equal(batch["loss_mask"], batch["targets"] != IGNORE_INDEX)
        for row in range(batch["input_ids"].shape[0]):
            for segment in batch["segment_ids"][row].unique().tolist():
                if segment == 0:
                    continue
                where = batch["segment_ids"][row] == segment
                mask = batch["loss_mask"][row] & where
                trained.append(tokenizer.decode(batch["targets"][row][mask].tolist()))
                seen.append(tokenizer.decode(batch["input_ids"][row][where].tolist()))
                assert torch.equal(batch["position_ids"][row][where], torch.arange(int(where.sum())))
    expected = {tokenizer.apply_chat_template(c): expected_replies(c) for c in conversations}
    assert len(trained) == len(conversations)
    for inputs, replies in zip(seen, trained, strict=True):
        rendered = next(text for text in expected if text.startswith(inputs))
        assert replies == expected[rendered]


def test_sft_padding_and_packing_layout(conversations):
    tokenizer = small_tokenizer()
    padded = next(SFTLoader(conversations, tokenizer, batch_size=4, max_length=256, seed=0))
    lengths = (padded["segment_ids"] > 0).sum(dim=1)
    assert padded["input_ids"].shape[1] == int(lengths.max())
    for row, length in enumerate(lengths.tolist()):
        assert (padded["input_ids"][row, length:] == tokenizer.pad_id).all()
        assert (padded["targets"][row, length:] == IGNORE_INDEX).all()
    packed_loader = SFTLoader(conversations, tokenizer, batch_size=2, max_length=128, seed=0, packing=True)
    assert len(packed_loader.rows) < len(conversations) and all(len(row) >= 1 for row in packed_loader.rows)
    packed = next(packed_loader)
    assert packed["input_ids"].shape[1] <= 128 and int(packed["segment_ids"].max()) > 1
    # no target crosses into the next conversation: a segment's last target is its EOS
    for row in range(2):
        segments = packed["segment_ids"][row]
        for segment in set(segments.tolist()) - {0}:
            last = int(torch.nonzero(segments == segment).max())
            assert int(packed["targets"][row, last]) == tokenizer.eos_id


def test_sft_truncation_resume_and_ranks(conversations):
    tokenizer = small_tokenizer()
    short = SFTLoader(conversations, tokenizer, batch_size=2, max_length=24)
    assert short.truncated == len(conversations) and next(short)["input_ids"].shape[1] == 24
    loader = SFTLoader(conversations, tokenizer, batch_size=3, max_length=256, seed=2)
    take(loader, 10)
    state = loader.state_dict()
    expected = take(loader, 4)
    resumed = SFTLoader(conversations, tokenizer, batch_size=3, max_length=256, seed=2)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 4), expected)
    ranks = [
        SFTLoader(conversations, tokenizer, batch_size=2, max_length=256, seed=2, rank=r, world_size=2)
        for r in range(2)
    ]
    first_inputs = [
        {tuple(row.tolist()) for b in take(r, r.batches_per_epoch) for row in b["input_ids"]} for r in ranks
    ]
    assert first_inputs[0] and not first_inputs[0] & first_inputs[1]
    with pytest.raises(DataError, match="assistant token"):
        SFTLoader(
            [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]],
            tokenizer,
            1,
            max_length=3,
        )
