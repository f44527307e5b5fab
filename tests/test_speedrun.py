"""`nanoseek speedrun --quick`: every step runs (the same commands a user runs), resumes, reports."""

from __future__ import annotations

import json

from nanoseek.cli import main
from nanoseek.speedrun import SpeedrunConfig, pipeline_config


def test_quick_speedrun_runs_every_stage_then_resumes_without_work(tmp_path, capsys):
    assert main(["speedrun", "--quick", "--runs-dir", str(tmp_path), "--name", "smoke"]) == 0
    run = tmp_path / "smoke"
    summary = json.loads((run / "summary.json").read_text())
    ran = [stage["name"] for stage in summary["stages"]]
    for name in ("tokenizer", "data", "pretrain", "cold_start", "grpo", "student_pretrain", "distill", "control",
                 "eval pretrain", "eval grpo", "eval distill"):
        assert name in ran
    assert set(summary["evals"]) == {"pretrain", "cold_start", "grpo", "student_pretrain", "distill", "control"}
    for values in summary["evals"].values():
        assert 0.0 <= values["accuracy"] <= 1.0 and values["tokens_per_second"] > 0
    assert 0.0 <= summary["evals"]["grpo"]["mtp_acceptance"] <= 1.0  # the MTP model is probed
    assert "mtp_acceptance" not in summary["evals"]["distill"]  # the dense student has no MTP layer
    assert len(summary["evals"]["pretrain"]["expert_load"]) == 3  # nano: 3 MoE layers
    share = next(goal for goal in summary["goals"] if goal["goal"].startswith("the student's activated parameters"))
    assert share["met"], share  # at most a quarter of the teacher's, measured on the checkpoints
    report = (run / "report.md").read_text()
    assert "GRPO against a continued-SFT control" in report and "| pretrain |" in report
    assert all((run / "plots" / f"{name}.png").exists() for name in ("loss_curves", "accuracy_per_stage", "expert_load"))
    printed = capsys.readouterr().out
    assert f"nanoseek chat --model {run}/grpo/checkpoints" in printed and "nanoseek serve --model" in printed

    # Everything exists: a second run skips every step and recomputes nothing.
    assert main(["speedrun", "--quick", "--runs-dir", str(tmp_path), "--name", "smoke"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert [s["status"] for s in again["stages"] if s["name"] in ("tokenizer", "data")] == ["skipped (output exists)"] * 2
    assert again["evals"] == summary["evals"]


def test_pipeline_config_declares_r1_stages_and_per_seed_controls(tmp_path):
    config = pipeline_config(tmp_path / "run", SpeedrunConfig(), seeds=[0, 1], controls={0: 12, 1: 15})
    names = [stage["name"] for stage in config["stages"]]
    assert names == ["pretrain", "cold_start", "grpo", "rejection", "rejection_sft", "student_pretrain", "distill",
                     "cold_start_seed1", "grpo_seed1", "control", "control_seed1"]
    stages = {stage["name"]: stage for stage in config["stages"]}
    assert stages["rejection_sft"]["model"] == "pretrain"  # R1: stage-3 SFT starts from the base model
    assert stages["control_seed1"]["model"] == "cold_start_seed1" and stages["control_seed1"]["max_steps"] == 15
    assert stages["grpo"]["rewards"] == "accuracy,format"
    assert stages["distill"]["teacher"] == "rejection_sft" and stages["distill"]["student"] == "student_pretrain"
    assert stages["student_pretrain"]["command"] == "pretrain" and stages["student_pretrain"]["model"] == "qwen2-nano"
    assert stages["student_pretrain"]["data"] == stages["pretrain"]["data"]  # the same corpus as the teacher's base
    assert stages["student_pretrain"]["model.hidden_size"] == 64
    random_student = pipeline_config(tmp_path / "run", SpeedrunConfig(student_pretrain_steps=0), seeds=[0], controls={})
    assert [s["student"] for s in random_student["stages"] if s["name"] == "distill"] == ["qwen2-nano"]
