"""Checkpoints and resume: a run killed with SIGKILL and resumed ends bit-exactly where an uninterrupted
run ends; checkpoints are atomic, Hugging Face loadable, and refuse to resume into a different run."""

import json
import signal
import time

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import (
    FAST_TRAIN_ARGS,
    TINY_MODEL_ARGS,
    SyntheticBatches,
    run_nanoseek,
    single_thread,  # noqa: F401 (autouse: tiny models run single-threaded)
    tiny_config,
    token_shards,
)

from nanoseek.checkpoint import load_pretrained
from nanoseek.errors import CheckpointError, TrainingError
from nanoseek.model import build_model
from nanoseek.train import checkpointing
from nanoseek.train.checkpointing import latest_checkpoint, list_checkpoints
from nanoseek.train.trainer import TrainConfig, Trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return token_shards(tmp_path_factory.getbasetemp() / "shards")


def metrics(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time", "step_seconds", "tokens_per_second", "mfu")} for r in records]


def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_exactly(shards, tmp_path):
    arguments = [
        "pretrain", "--data", str(shards), "--runs-dir", str(tmp_path), "--sample-tokens", "8",
        *TINY_MODEL_ARGS, *FAST_TRAIN_ARGS, "max_steps=14", "checkpoint_every=4", "eval_every=7",
        "lr_schedule=wsd", "keep_checkpoints=5",
    ]
    reference = run_nanoseek([*arguments, "--name", "reference"], cwd=tmp_path)
    victim = run_nanoseek([*arguments, "--name", "victim"], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (tmp_path / "victim" / "checkpoints" / "step_00000004").exists():
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    killed_at = latest_checkpoint(tmp_path / "victim")
    assert killed_at.name != "step_00000014"  # it really died mid-run

    resumed = run_nanoseek([*arguments, "--name", "victim", "--resume"], cwd=tmp_path)
    resumed_out, resumed_err = resumed.communicate(timeout=300)
    reference_out, reference_err = reference.communicate(timeout=300)
    assert reference.returncode == 0, reference_err
    assert resumed.returncode == 0, resumed_err

    assert metrics(tmp_path / "victim") == metrics(tmp_path / "reference")  # every step, losses bit-equal
    assert json.loads(resumed_out)["loss"] == json.loads(reference_out)["loss"]
    final = "checkpoints/step_00000014"
    for name in ("model.safetensors",):
        ours, theirs = load_file(tmp_path / "victim" / final / name), load_file(tmp_path / "reference" / final / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    optimizer = [torch.load(tmp_path / run / final / "optimizer.pt", weights_only=True) for run in ("victim", "reference")]
    for key, state in optimizer[0]["state"].items():
        assert all(torch.equal(state[k], optimizer[1]["state"][key][k]) for k in state)
    sample = [line for line in resumed_err.splitlines() if line.startswith("sample:")]
    assert sample == [line for line in reference_err.splitlines() if line.startswith("sample:")]


def test_resume_restores_loss_scale_data_position_and_accumulation_in_process(tmp_path):
    config = TrainConfig(
        global_batch_size=4, micro_batch_size=2, seq_len=16, max_steps=6, warmup_steps=1, precision="fp16",
        peak_tflops=1.0, checkpoint_every=3,
    )
    straight = Trainer(build_model(tiny_config(), seed=0), config, tmp_path / "straight")
    straight.precision.scaler.growth_interval = 2  # make the scale change during the run
    straight.fit(SyntheticBatches(128, 2, 16))

    first = Trainer(build_model(tiny_config(), seed=0), config, tmp_path / "split")
    first.precision.scaler.growth_interval = 2
    batches = SyntheticBatches(128, 2, 16)
    for _ in range(3):
        first.train_step(batches)
    first.save_checkpoint(batches)

    second = Trainer(build_model(tiny_config(), seed=1), config, tmp_path / "split")
    second.precision.scaler.growth_interval = 2
    fresh_batches = SyntheticBatches(128, 2, 16)
    second.load_checkpoint(latest_checkpoint(tmp_path / "split"), fresh_batches)
    assert second.step == 3 and fresh_batches.index == 6 and second.precision.scaler.scale == first.precision.scaler.scale
    second.fit(fresh_batches)
    assert second.precision.scaler.scale == straight.precision.scaler.scale
    for (name, ours), theirs in zip(second.model.state_dict().items(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    trainer = Trainer(build_model(tiny_config(), seed=0), TrainConfig(max_steps=4, warmup_steps=1), tmp_path)
    batches = SyntheticBatches(128, 8, 16)
    trainer.step = 1
    good = trainer.save_checkpoint(batches)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(path).endswith("trainer_state.pt"):
            raise OSError("disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", failing_save)
    trainer.step = 2
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(batches)
    assert list_checkpoints(tmp_path) == [good]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]  # no partial dir
    load_pretrained(good)


def test_resume_refuses_another_model_or_world_size(tmp_path):
    trainer = Trainer(build_model(tiny_config(), seed=0), TrainConfig(max_steps=4, warmup_steps=1), tmp_path)
    batches = SyntheticBatches(128, 8, 16)
    directory = trainer.save_checkpoint(batches)
    other = Trainer(build_model(tiny_config(hidden_size=48), seed=0), TrainConfig(max_steps=4, warmup_steps=1), tmp_path)
    with pytest.raises(CheckpointError, match="hidden_size"):
        other.load_checkpoint(directory, batches)
    state = torch.load(directory / "trainer_state.pt", weights_only=True)
    state["ranks"] = state["ranks"] * 2
    torch.save(state, directory / "trainer_state.pt")
    with pytest.raises(TrainingError, match="written by 2 processes"):
        trainer.load_checkpoint(directory, batches)
    (directory / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        trainer.load_checkpoint(directory, batches)


def test_training_checkpoint_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    trainer = Trainer(build_model(tiny_config(), seed=0), TrainConfig(max_steps=4, warmup_steps=1, micro_batch_size=2, global_batch_size=2, seq_len=16), tmp_path)
    batches = SyntheticBatches(128, 2, 16)
    trainer.fit(batches)  # 4 steps: the router biases have moved away from zero
    directory = latest_checkpoint(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ours = load_pretrained(directory).eval()
    bias = ours.moe_layers()[0].gate.e_score_correction_bias
    assert bias.abs().sum() > 0
    torch.testing.assert_close(theirs.model.layers[1].mlp.gate.e_score_correction_bias, bias)
    tokens = next(SyntheticBatches(128, 2, 16, seed=5))["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, rtol=1e-4, atol=1e-4)
