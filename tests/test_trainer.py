"""The training loop: schedules, optimizer groups, MoE bias balancing, MTP weighting, the pretrain CLI,
bad input, and stopping on a non-finite loss."""

import json
import math
import shutil

import pytest
import torch
from train_fixtures import (
    FAST_TRAIN_ARGS,
    TINY_MODEL_ARGS,
    SyntheticBatches,
    single_thread,  # noqa: F401 (autouse: tiny models run single-threaded)
    tiny_config,
    token_shards,
)

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main
from nanoseek.config import parse_overrides
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.model import build_model
from nanoseek.train.checkpointing import list_checkpoints
from nanoseek.train.trainer import (
    EXPERT_LOAD,
    TrainConfig,
    Trainer,
    learning_rate,
    mtp_weight,
    parameter_groups,
    update_router_biases,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return token_shards(tmp_path_factory.getbasetemp() / "shards")


def quick_config(**overrides) -> TrainConfig:
    values = dict(global_batch_size=4, micro_batch_size=2, seq_len=16, max_steps=4, warmup_steps=1, peak_tflops=1.0,
                  device="cpu")
    return TrainConfig(**{**values, **overrides})


# ----- schedules and optimizer --------------------------------------------------------------------------
def test_learning_rate_warmup_then_cosine_wsd_constant():
    cosine = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert learning_rate(cosine, 0) == pytest.approx(0.1)
    assert learning_rate(cosine, 9) == pytest.approx(1.0)
    assert learning_rate(cosine, 10) == pytest.approx(1.0)
    assert learning_rate(cosine, 59) == pytest.approx(0.55, abs=0.01)  # half way: mid between peak and floor
    assert learning_rate(cosine, 109) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, lr_schedule="wsd", warmup_steps=10, max_steps=110, decay_fraction=0.2)
    assert [learning_rate(wsd, s) for s in (20, 80, 87)] == [1.0, 1.0, 1.0] and learning_rate(wsd, 88) < 1.0
    assert learning_rate(wsd, 99) == pytest.approx(0.5, abs=0.05)
    assert learning_rate(wsd, 109) == pytest.approx(0.0)
    constant = TrainConfig(lr=1.0, lr_schedule="constant", warmup_steps=0, max_steps=5)
    assert {learning_rate(constant, s) for s in range(5)} == {1.0}


def test_mtp_weight_follows_the_v3_schedule():
    config = TrainConfig(max_steps=100, warmup_steps=0, mtp_weight=0.3, mtp_weight_final=0.1, mtp_weight_switch=0.6)
    assert [mtp_weight(config, s) for s in (0, 59, 60, 99)] == [0.3, 0.3, 0.1, 0.1]


def test_weight_decay_only_on_matrices_and_router_bias_outside_the_optimizer():
    model = build_model(tiny_config(), seed=0)
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in not_decayed
    assert all(n.endswith("norm.weight") or n == "model.embed_tokens.weight" for n in not_decayed)
    assert {"lm_head.weight", "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.gate_up_proj"} <= decayed
    grouped = {id(p) for group in (decay, no_decay) for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters()}
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    assert id(bias) not in grouped and not bias.requires_grad and bias.dtype == torch.float32


# ----- configuration errors --------------------------------------------------------------------------------
def test_train_config_rejects_impossible_settings():
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        parse_overrides(TrainConfig, ["learning_rate=1e-3"])
    with pytest.raises(ConfigError) as error:
        TrainConfig(warmup_steps=50, max_steps=10, precision="fp4", global_batch_size=10, micro_batch_size=4)
    message = str(error.value)
    assert "warmup_steps" in message and "fp4" in message and "not a multiple" in message
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size"):
        TrainConfig(global_batch_size=8, micro_batch_size=4).grad_accum_steps(world_size=3)
    assert TrainConfig(global_batch_size=16, micro_batch_size=2).grad_accum_steps(world_size=2) == 4


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["learning_rate=0.1"], "unknown"),
        (["model.hidden_sise=64"], "unknown"),
        (["global_batch_size=6", "micro_batch_size=4"], "not a multiple"),
        (["model.vocab_size=100"], "smaller than the data's vocabulary"),
        (["seq_len=5000"], "max_position_embeddings"),
        (["precision=fp4"], "precision"),
    ],
)
def test_cli_bad_settings_fail_with_one_line(shards, tmp_path, capsys, arguments, expected):
    code = main(["pretrain", "--data", str(shards), "--runs-dir", str(tmp_path), *arguments])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "pretrain").exists()  # nothing was started


def test_cli_missing_data_or_shard_fails_before_training(shards, tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path)]) == 2
    assert "manifest.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / "train_00000.npy").unlink()
    assert main(["pretrain", "--data", str(broken), "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing shard train_00000.npy" in err and len(err.splitlines()) == 1
    assert main(["pretrain", "--data", str(shards), "--runs-dir", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint to continue from" in capsys.readouterr().err


# ----- the pretrain command end to end ------------------------------------------------------------------------
def test_pretrain_cli_logs_metrics_evaluates_checkpoints_and_samples(shards, tmp_path, capsys):
    arguments = [
        "pretrain", "--data", str(shards), "--runs-dir", str(tmp_path), "--name", "run", "--sample-tokens", "4",
        *TINY_MODEL_ARGS, *FAST_TRAIN_ARGS, "max_steps=4", "eval_every=2", "checkpoint_every=1",
        "keep_checkpoints=2", "mtp_weight_switch=0.5",
    ]
    assert main(arguments) == 0
    out, err = capsys.readouterr()
    assert "sample: " in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["step"] == 4 and math.isfinite(summary["val_lm_loss"])

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["mtp_weight"] for r in records] == [0.3, 0.3, 0.1, 0.1]
    for record in records:
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_second", "mfu"):
            assert math.isfinite(record[key]), key
        # one MoE layer in the main model + the MTP block's MoE: max and min load per layer
        assert len(record["expert_load_max"]) == len(record["expert_load_min"]) == 2
        assert record["tokens"] == record["step"] * 4 * 32
    assert "val_lm_loss" in records[1] and "val_lm_loss" in records[3] and "val_lm_loss" not in records[2]
    first = records[0]
    assert first["loss"] == pytest.approx(first["lm_loss"] + 0.3 * first["mtp_loss"] + 1e-4 * first["balance_loss"], rel=1e-5)

    checkpoints = list_checkpoints(run)
    assert [c.name for c in checkpoints] == ["step_00000003", "step_00000004"]  # keep_checkpoints=2
    model = load_pretrained(checkpoints[-1])
    assert (checkpoints[-1] / "tokenizer.json").is_file()
    assert model.config.hidden_size == 32 and model.moe_layers()[0].gate.e_score_correction_bias.abs().sum() > 0
    config = json.loads((run / "run_config.json").read_text())
    auto_precision = "bf16" if torch.cuda.is_available() else "fp32"  # the CLI runs where it finds a GPU
    assert config["grad_accum_steps"] == 2 and config["precision"] == auto_precision

    assert main(arguments) == 2  # the run exists: continuing it needs --resume
    assert "--resume" in capsys.readouterr().err


# ----- MoE balancing -----------------------------------------------------------------------------------------
def skewed_run(bias_update_speed: float, steps: int = 60) -> list[float]:
    """Max/mean expert load of the main MoE layer per step, on inputs that all share one direction
    of hidden space which the router prefers for experts 0 and 1 (a collapsed router)."""
    model = build_model(tiny_config(num_nextn_predict_layers=0), seed=0)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
    direction /= direction.norm()
    with torch.no_grad():
        model.model.embed_tokens.weight += 0.05 * direction
        model.moe_layers()[0].gate.weight[:2] += 0.5 * direction
    config = quick_config(
        global_batch_size=8, micro_batch_size=4, seq_len=32, max_steps=steps, lr=1e-6, warmup_steps=0,
        lr_schedule="constant", bias_update_speed=bias_update_speed, balance_alpha=0.0,
    )
    trainer = Trainer(model, config, "unused")
    batches = SyntheticBatches(128, 4, 32)
    return [trainer.train_step(batches)["expert_load_max"][0] for _ in range(steps)]


def test_bias_update_evens_out_a_skewed_expert_load():
    without, with_update = skewed_run(0.0), skewed_run(5e-3)
    assert without[0] == with_update[0] > 3.5  # 2 of 8 experts take almost every token (max/mean = 4)
    assert sum(without[-10:]) / 10 > 3.5
    assert sum(with_update[-10:]) / 10 < 1.6


def test_bias_update_uses_the_counts_of_the_whole_step():
    """gamma * sign(mean - load) from the counts summed over all micro-batches of the step."""
    model = build_model(tiny_config(), seed=0)
    seen = []

    def loss_fn(wrapped, batch):
        loss, metrics = trainer.language_model_loss(wrapped, batch)
        seen.append(metrics[EXPERT_LOAD].clone())
        return loss, metrics

    trainer = Trainer(model, quick_config(bias_update_speed=0.01), "unused", loss_fn=loss_fn)
    trainer.train_step(SyntheticBatches(128, 2, 16))
    assert len(seen) == 2  # two micro-batches
    load = seen[0] + seen[1]
    for layer, moe in enumerate(model.moe_layers()):
        expected = 0.01 * torch.sign(load[layer].mean() - load[layer])
        torch.testing.assert_close(moe.gate.e_score_correction_bias, expected)


def test_update_router_biases_leaves_softmax_routers_alone():
    model = build_model(tiny_config(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1), seed=0)
    routers = [moe.gate for moe in model.moe_layers()]
    update_router_biases(routers, torch.arange(16.0).view(2, 8), 0.1)
    assert all(r.e_score_correction_bias.abs().sum() == 0 for r in routers)


# ----- non-finite losses -------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = build_model(tiny_config(), seed=0)

    def loss_fn(wrapped, batch):
        loss, metrics = trainer.language_model_loss(wrapped, batch)
        return (loss * float("nan") if trainer.step == 2 else loss), metrics

    trainer = Trainer(model, quick_config(max_steps=6, checkpoint_every=1), tmp_path, loss_fn=loss_fn)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(TrainingError, match=r"step 3: loss nan.*step_00000002"):
        trainer.fit(SyntheticBatches(128, 2, 16))
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]
    saved = load_pretrained(tmp_path / "checkpoints" / "step_00000002")
    for name, parameter in saved.named_parameters():  # the failed step did not touch the weights
        torch.testing.assert_close(parameter, dict(model.named_parameters())[name], rtol=0, atol=0)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_activation_checkpointing_changes_neither_losses_nor_expert_counts():
    """Recomputation in backward must not double count router statistics (they come back in the output)."""

    def run(gradient_checkpointing: bool):
        model = build_model(tiny_config(), seed=0)
        trainer = Trainer(model, quick_config(gradient_checkpointing=gradient_checkpointing), "unused")
        batches = SyntheticBatches(128, 2, 16)
        records = [trainer.train_step(batches) for _ in range(3)]
        return records, [moe.gate.e_score_correction_bias for moe in model.moe_layers()]

    (plain, plain_biases), (recomputed, recomputed_biases) = run(False), run(True)
    for a, b in zip(plain, recomputed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["expert_load_max"] == b["expert_load_max"]
    assert all(torch.equal(a, b) for a, b in zip(plain_biases, recomputed_biases, strict=True))
