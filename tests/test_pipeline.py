"""The R1 pipeline: a micro config of every stage kind runs end to end through the commands, skips
finished stages, refuses changed ones until forced, resumes an interrupted stage from its checkpoint,
stops on an empty rejection-sampled dataset, rejects bad configs before running anything, and the
shipped example config stays valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from post_training_fixtures import memorizing_model, random_model
from train_fixtures import single_thread  # noqa: F401 (autouse)

from nanoseek.cli import main as nanoseek_main
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.train.pipeline import load_pipeline_config, run_pipeline
from nanoseek.train.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
TASKS = {"from_tasks": 8, "tasks": ["arithmetic"], "difficulty": [1]}
FAST = {"global_batch_size": 4, "micro_batch_size": 4, "seq_len": 64, "warmup_steps": 1, "eval_problems": 0, "eval_batches": 1}


def _stages() -> list[dict]:
    """GRPO from the base -> rejection sampling -> SFT of the base on the samples -> distillation."""
    return [
        {"name": "rl", "command": "grpo", **TASKS, "max_steps": 2, "num_generations": 4, "global_batch_size": 16,
         "micro_batch_size": 16, "max_completion_length": 24, "eval_problems": 0, "lr": 1e-4},
        {"name": "rejection", "command": "rejection-sample", **TASKS, "samples_per_prompt": 4, "max_tokens": 32},
        {"name": "rs_sft", "command": "sft", "model": "base", "data": "rejection", **FAST, "max_steps": 3, "packing": False},
        {"name": "distill", "command": "distill", "student": "qwen2-nano", **TASKS, **FAST, "max_steps": 2,
         "model": {"num_hidden_layers": 2}, "divergence": "jsd"},
    ]


def _write(tmp_path: Path, stages: list[dict], base: Path | None = None, **top) -> Path:
    config = {"name": "micro", "runs_dir": str(tmp_path / "runs"), "stages": stages, **top}
    if base is not None:
        config["model"] = str(base)
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps(config))
    return path


def _steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_micro_pipeline_runs_skips_and_reruns_from_a_forced_stage(tmp_path, capsys):
    path = _write(tmp_path, _stages(), memorizing_model())
    summary = run_pipeline(load_pipeline_config(path))
    run = tmp_path / "runs" / "micro"
    outputs = {stage["name"]: stage["output"] for stage in summary["stages"]}
    assert outputs == {
        "rl": str(run / "rl/checkpoints/step_00000002"), "rejection": str(run / "rejection/samples.jsonl"),
        "rs_sft": str(run / "rs_sft/checkpoints/step_00000003"), "distill": str(run / "distill/checkpoints/step_00000002"),
    }
    assert json.loads((run / "pipeline.json").read_text()) == json.loads(json.dumps(summary))
    for name in outputs:
        assert json.loads((run / name / "stage.json").read_text())["status"] == "done"
        assert (run / name / "metrics.jsonl").read_text()  # the report's input, for every stage
    assert json.loads((run / "rejection" / "metrics.jsonl").read_text())["kept"] > 0
    # each stage read what the config says: rejection sampling the RL model, SFT the base (as R1),
    # distillation the SFT model as its teacher
    markers = {name: json.loads((run / name / "stage.json").read_text()) for name in outputs}
    assert outputs["rl"] in markers["rejection"]["argv"]
    assert json.loads((run / "rs_sft" / "run_config.json").read_text())["model"] == str(memorizing_model())
    assert outputs["rejection"] in markers["rs_sft"]["argv"]
    assert outputs["rs_sft"] in markers["distill"]["argv"]

    metrics_before = {name: (run / name / "metrics.jsonl").read_bytes() for name in outputs}
    capsys.readouterr()
    again = run_pipeline(load_pipeline_config(path))  # everything is finished: nothing runs
    assert [stage["output"] for stage in again["stages"]] == list(outputs.values())
    assert capsys.readouterr().err.count("done, skipped") == 4
    assert {name: (run / name / "metrics.jsonl").read_bytes() for name in outputs} == metrics_before

    changed = load_pipeline_config(path, ["rs_sft.max_steps=4"])
    with pytest.raises(ConfigError, match="stage 'rs_sft' finished with other settings.*--force rs_sft"):
        run_pipeline(changed)
    run_pipeline(changed, force="rs_sft")  # rs_sft and what follows run again, earlier stages do not
    assert _steps(run / "rs_sft" / "metrics.jsonl") == [1, 2, 3, 4]
    assert (run / "distill" / "metrics.jsonl").read_bytes() != metrics_before["distill"]
    assert all((run / name / "metrics.jsonl").read_bytes() == metrics_before[name] for name in ("rl", "rejection"))


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    stages = [
        {"name": "cold_start", "command": "sft", **TASKS, **FAST, "max_steps": 2},
        {"name": "more_sft", "command": "sft", **TASKS, **FAST, "max_steps": 4, "checkpoint_every": 2},
    ]
    path = _write(tmp_path, stages, memorizing_model())
    train_step = Trainer.train_step

    def interrupted(self, batches):
        if self.run_dir.name == "more_sft" and self.step == 2:
            raise KeyboardInterrupt
        return train_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(load_pipeline_config(path))
    monkeypatch.setattr(Trainer, "train_step", train_step)
    stage = tmp_path / "runs" / "micro" / "more_sft"
    assert json.loads((stage / "stage.json").read_text())["status"] == "running"
    assert _steps(stage / "metrics.jsonl") == [1, 2]
    first_steps = (stage / "metrics.jsonl").read_text()

    capsys.readouterr()
    summary = run_pipeline(load_pipeline_config(path))
    err = capsys.readouterr().err
    assert "stage cold_start: done, skipped" in err and "stage more_sft: resuming" in err and "--resume" in err
    assert summary["stages"][1]["output"] == str(stage / "checkpoints" / "step_00000004")
    assert _steps(stage / "metrics.jsonl") == [1, 2, 3, 4]
    assert (stage / "metrics.jsonl").read_text().startswith(first_steps)  # continued, not restarted


def test_an_empty_rejection_sampled_dataset_stops_the_pipeline(tmp_path):
    stages = [
        {"name": "rejection", "command": "rejection-sample", **TASKS, "samples_per_prompt": 2, "max_tokens": 8},
        {"name": "rs_sft", "command": "sft", "model": "base", "data": "rejection", **FAST, "max_steps": 2},
    ]
    path = _write(tmp_path, stages, random_model())
    with pytest.raises(TrainingError, match="kept nothing.*nothing to train on"):
        run_pipeline(load_pipeline_config(path))
    run = tmp_path / "runs" / "micro"
    assert json.loads((run / "rejection" / "samples.stats.json").read_text())["kept"] == 0
    assert not (run / "rejection" / "samples.jsonl").exists() and not (run / "rs_sft").exists()
    # sampling from a model that can answer starts the failed stage again (nothing to resume there)
    run_pipeline(load_pipeline_config(path, [f"model={memorizing_model()}", "rejection.max_tokens=32"]))
    assert (run / "rs_sft" / "checkpoints" / "step_00000002").is_dir()


def _change(stages: list[dict], index: int, **settings) -> list[dict]:
    stages = [dict(stage) for stage in stages]
    stages[index].update(settings)
    return stages


BAD_CONFIGS = [
    (lambda s: _change(s, 0, command="rl"), "unknown command 'rl'; stages run one of"),
    (lambda s: _change(s, 2, max_step=3), r"stage 'rs_sft'.*did you mean 'max_steps'"),
    (lambda s: _change(s, 1, samples_per_prompt=0), "stage 'rejection'.*samples_per_prompt must be >= 1"),
    (lambda s: _change(s, 0, tasks=["algebra"]), "invalid choice: 'algebra'"),
    (lambda s: _change(s, 1, model="rs_sft"), "names a stage that runs later"),
    (lambda s: _change(s, 2, data="rl"), "names a stage that makes a model, not a dataset"),
    (lambda s: _change(s, 2, model="runs/nowhere/checkpoints/step_00000001"), "is neither an earlier stage, 'base', nor an existing path"),
    (lambda s: _change(s, 1, name="rl"), "stage names must be unique"),
    (lambda s: _change(s, 2, runs_dir="elsewhere"), "'runs_dir' is set by the pipeline"),
    (lambda s: [{k: v for k, v in stage.items() if k != "student"} for stage in s], "required: --student"),
    (lambda s: _change(s, 2, model={"hidden_size": 8}), "model is a flag of sft; it takes a value, not a table"),
]


@pytest.mark.parametrize(("edit", "message"), BAD_CONFIGS)
def test_bad_configs_fail_before_anything_runs(tmp_path, edit, message):
    path = _write(tmp_path, edit(_stages()), memorizing_model())
    with pytest.raises(ConfigError, match=message):
        run_pipeline(load_pipeline_config(path))
    assert not (tmp_path / "runs").exists()


def test_bad_pipeline_files_and_options(tmp_path):
    with pytest.raises(ConfigError, match="the base model .*missing does not exist"):
        run_pipeline(load_pipeline_config(_write(tmp_path, _stages(), tmp_path / "missing")))
    with pytest.raises(ConfigError, match="model = 'base' needs a top-level model"):
        run_pipeline(load_pipeline_config(_write(tmp_path, _stages())))
    with pytest.raises(ConfigError, match="unknown key 'stage'"):
        load_pipeline_config(_write(tmp_path, _stages(), stage=[]))
    with pytest.raises(ConfigError, match="no stage is named 'cold'"):
        load_pipeline_config(_write(tmp_path, _stages(), memorizing_model()), ["cold.max_steps=3"])
    with pytest.raises(ConfigError, match="--force 'cold': no such stage"):
        run_pipeline(load_pipeline_config(_write(tmp_path, _stages(), memorizing_model())), force="cold")
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("name = \n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_pipeline_config(broken)
    assert not (tmp_path / "runs").exists()


def test_the_example_config_is_valid_and_prints_its_commands(capsys):
    example = REPO / "configs" / "r1-micro.toml"
    assert nanoseek_main(["pipeline", "--config", str(example), "--dry-run", f"model={memorizing_model()}"]) == 0
    commands = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in commands] == ["sft", "grpo", "rejection-sample", "sft", "grpo", "distill"]
    assert f"--model {memorizing_model()} --data '<output of rejection>'" in commands[3]  # stage 3 SFT starts from the base
    assert "--teacher '<output of all_scenario_rl>'" in commands[5]
    assert nanoseek_main(["pipeline", "--config", str(example), "--dry-run"]) == 2  # its base model is not there
    assert "the base model runs/speedrun/pretrain" in capsys.readouterr().err
