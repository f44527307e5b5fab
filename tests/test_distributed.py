"""torchrun with 2 CPU processes (gloo) trains like 1 process on the same global batch, for FSDP2 and DDP:
same losses, same router biases (expert counts reduced over ranks), same weights."""

import json
import sys

import pytest
import torch
from train_fixtures import (
    FAST_TRAIN_ARGS,
    TINY_MODEL_ARGS,
    run_nanoseek,
    single_thread,  # noqa: F401 (autouse: tiny models run single-threaded)
    token_shards,
)

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main
from nanoseek.errors import ConfigError
from nanoseek.train import parallel
from nanoseek.train.checkpointing import latest_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 2 processes: FSDP with one micro-batch per rank, DDP with two (exercising no_sync accumulation).
SETTINGS = {"fsdp": ["global_batch_size=4"], "ddp": ["global_batch_size=8", "data_parallel=ddp"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return token_shards(tmp_path_factory.getbasetemp() / "shards")


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(record["loss"], record.get("val_lm_loss")) for record in map(json.loads, lines)]


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_match_one_process(shards, tmp_path, mode):
    arguments = [
        "pretrain", "--data", str(shards), "--runs-dir", str(tmp_path), "--sample-tokens", "2", *TINY_MODEL_ARGS,
        *FAST_TRAIN_ARGS, "max_steps=5", "eval_every=5", "eval_batches=4", "checkpoint_every=0",
        "bias_update_speed=0.01", "device=cpu", *SETTINGS[mode],  # gloo on CPU processes, GPU or not
    ]
    two = run_nanoseek([*arguments, "--name", "two"], cwd=tmp_path, launcher=TORCHRUN)
    assert main([*arguments, "--name", "one"]) == 0  # runs while the two ranks train
    out, err = two.communicate(timeout=300)
    assert two.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["step"] == 5  # one summary line, from rank 0

    one_losses, two_losses = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one_losses) == len(two_losses) == 5
    for (loss_1, val_1), (loss_2, val_2) in zip(one_losses, two_losses, strict=True):
        assert abs(loss_1 - loss_2) < 1e-5
        assert (val_1 is None and val_2 is None) or abs(val_1 - val_2) < 1e-5
    config = json.loads((tmp_path / "two" / "run_config.json").read_text())
    assert config["world_size"] == 2

    one = load_pretrained(latest_checkpoint(tmp_path / "one"))
    two_model = load_pretrained(latest_checkpoint(tmp_path / "two"))
    for moe_1, moe_2 in zip(one.moe_layers(), two_model.moe_layers(), strict=True):
        bias = moe_1.gate.e_score_correction_bias
        assert bias.abs().sum() > 0  # moved by 5 updates of +-0.01 from the global counts
        torch.testing.assert_close(moe_2.gate.e_score_correction_bias, bias, rtol=0, atol=1e-7)
    for (name, weight_1), weight_2 in zip(one.state_dict().items(), two_model.state_dict().values(), strict=True):
        torch.testing.assert_close(weight_2, weight_1, rtol=1e-4, atol=1e-5, msg=name)


def test_more_local_processes_than_gpus_is_a_config_error(monkeypatch):
    """torchrun with 2 processes on a host with 1 GPU: one readable error, not CUDA's 'invalid device ordinal'."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(parallel, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="process 1 on this node but only 1 GPU"):
        parallel.init_distributed()
