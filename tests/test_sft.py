"""SFT: cold start from generated tasks with held-out accuracy and an accuracy-band stop, JSONL chats,
the trainer's step hook, and bad input."""

import json

import pytest
from post_training_fixtures import random_model
from train_fixtures import SyntheticBatches, single_thread, tiny_config  # noqa: F401 (single_thread: autouse)

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main
from nanoseek.errors import ConfigError, DataError, TrainingError
from nanoseek.model import build_model
from nanoseek.train.sft import SFTConfig, read_chats, resolve_sft_run, sft
from nanoseek.train.trainer import TrainConfig, Trainer

FAST = ["peak_tflops=1", "global_batch_size=8", "micro_batch_size=8", "seq_len=96", "warmup_steps=1", "eval_batches=2",
        "checkpoint_every=0", "eval_problems=8", "eval_max_tokens=24"]


def test_fit_on_step_adds_metrics_and_can_stop_the_run(tmp_path):
    config = TrainConfig(global_batch_size=2, micro_batch_size=2, seq_len=8, max_steps=10, warmup_steps=1, peak_tflops=1.0,
                         checkpoint_every=0)
    trainer = Trainer(build_model(tiny_config(), seed=0), config, tmp_path)
    seen = []

    def on_step(metrics):
        seen.append(metrics["step"])
        metrics["val_custom"] = 1.0
        return metrics["step"] == 3

    trainer.fit(SyntheticBatches(128, 2, 8), on_step=on_step)
    assert seen == [1, 2, 3] and trainer.step == 3
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["val_custom"] for line in lines] == [1.0, 1.0, 1.0]
    assert trainer.last_checkpoint.name == "step_00000003"


def test_cold_start_from_tasks_logs_heldout_accuracy_and_stops_in_the_band(tmp_path, capsys):
    run = resolve_sft_run(random_model(), from_tasks=64, tasks=["arithmetic"], difficulty=[1], runs_dir=tmp_path,
                          overrides=[*FAST, "max_steps=12", "lr=1e-2", "eval_every=4", "target_accuracy=[0.0,1.0]"])
    assert all(chat[-1]["content"].startswith("<think>\n") for chat in run.conversations)
    metrics = sft(run)
    assert metrics["step"] == 4  # accuracy >= 0 at the first evaluation
    assert {"val_lm_loss", "val_accuracy", "val_format_rate", "val_accuracy/arithmetic"} <= set(metrics)
    assert "is in the band [0.0, 1.0] at step 4" in capsys.readouterr().err
    lines = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["loss"] < lines[0]["loss"]  # it learns the solutions
    checkpoint = tmp_path / "sft" / "checkpoints" / "step_00000004"
    assert load_pretrained(checkpoint) is not None and (checkpoint / "tokenizer.json").is_file()


def test_sft_on_jsonl_chats_with_padding(tmp_path, capsys):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}."},
        {"role": "assistant", "content": f"<think>\nsay it\n</think>\n<answer>{i}</answer>"}]}) for i in range(40)) + "\n")
    code = main(["sft", "--model", str(random_model()), "--data", str(chats), "--runs-dir", str(tmp_path), "--name", "chat",
                 *FAST, "max_steps=3", "packing=false", "eval_problems=0", "val_fraction=0.2"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and "val_lm_loss" in summary and "val_accuracy" not in summary
    assert json.loads((tmp_path / "chat" / "run_config.json").read_text())["chats"] == 32
    # too few held-out chats for one validation batch: trained anyway, said once
    assert main(["sft", "--model", str(random_model()), "--data", str(chats), "--runs-dir", str(tmp_path), "--name", "few",
                 *FAST, "max_steps=1", "warmup_steps=0", "eval_problems=0", "val_fraction=0.1"]) == 0
    assert "no validation loss" in capsys.readouterr().err


def test_bad_chat_files_name_the_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    for line, message in [
        ("not json", ":2: expected a JSON object"),
        (json.dumps({"messages": [{"role": "user", "content": "a"}]}), ":2: the chat has no assistant message"),
        (json.dumps({"messages": [{"role": "user"}]}), ":2: every message needs a string"),
    ]:
        path.write_text(good + "\n" + line + "\n")
        with pytest.raises(DataError, match=message):
            read_chats(path)
    assert len(read_chats(_write(tmp_path / "ok.jsonl", good))) == 1


def _write(path, text):
    path.write_text(text + "\n")
    return path


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--from-tasks", "8", "--data", "x.jsonl"], "give exactly one source of chats"),
        ([], "give exactly one source of chats"),
        (["--from-tasks", "8", "target_accuracy=[0.5,0.2]"], "target_accuracy must be [low, high]"),
        (["--from-tasks", "8", "seq_len=5000"], "exceed the model's context of 1024"),
        (["--from-tasks", "8", "max_step=3"], "unknown config key 'max_step'; did you mean 'max_steps'?"),
    ],
)
def test_cli_bad_input_fails_with_one_line(tmp_path, capsys, arguments, message):
    code = main(["sft", "--model", str(random_model()), "--runs-dir", str(tmp_path), *arguments, "peak_tflops=1", "max_steps=1",
                 "eval_problems=0"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("nanoseek sft: error:") and message in error


def test_model_directory_and_existing_run_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="is not a model directory"):
        resolve_sft_run(tmp_path, from_tasks=8)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(TrainingError, match="already holds a run"):
        resolve_sft_run(random_model(), from_tasks=8, runs_dir=tmp_path)
    with pytest.raises(ConfigError, match="target_accuracy needs eval_problems > 0"):
        SFTConfig(target_accuracy=[0.1, 0.2], eval_problems=0)
