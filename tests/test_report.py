"""The report card renders every stage's numbers as given, plots what exists, and says who won."""

from __future__ import annotations

import json

from nanoseek.eval.report import write_report


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_report_renders_tables_plots_and_honest_comparison(tmp_path):
    write_jsonl(tmp_path / "pretrain/metrics.jsonl",
                [{"step": s, "lm_loss": 5.0 / s, "loss": 5.5 / s} for s in range(1, 11)] + [{"step": 10, "val_lm_loss": 0.6}])
    write_jsonl(tmp_path / "grpo/metrics.jsonl",
                [{"step": s, "loss": 0.01, "reward": 0.1 * s, "rewards/accuracy/mean": 0.05 * s} for s in range(1, 6)])
    summary = {
        "name": "test", "command": "nanoseek speedrun", "k": 4, "heldout_problems": 50,
        "stages": [
            {"name": "pretrain", "seconds": 120.0, "status": "ran", "command": "nanoseek pretrain", "metrics": "pretrain/metrics.jsonl"},
            {"name": "grpo", "seconds": 30.5, "status": "skipped (output exists)", "metrics": "grpo/metrics.jsonl"},
        ],
        "evals": {
            "pretrain": {"accuracy": 0.02, "pass@k": 0.1, "maj@k": 0.04, "format_rate": 0.5,
                         "expert_load": [[1.2, 0.8], [0.5, 1.5]], "expert_load_max_violation": 0.5},
            "grpo": {"accuracy": 0.31, "format_rate": 0.99, "mtp_acceptance": 0.82, "spec_speedup": 1.6,
                     "tokens_per_second": 1234.5},
        },
        "comparison": {"title": "GRPO vs continued SFT", "seeds": [0, 1], "baseline": "cold start",
                       "cold start": [0.2, 0.22], "GRPO": [0.3, 0.32], "continued SFT": [0.35, 0.36]},
        "goals": [{"goal": "format compliance", "target": ">= 95%", "measured": "99.0%", "met": True}],
        "machine": {"cpu": "test", "torch": "2.x"},
    }
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = write_report(tmp_path).read_text()
    assert "| pretrain | 2.0% | 10.0% | 4.0% | 50.0% | - | - | 0.50 | - |" in report
    assert "| grpo | 31.0% | - | - | 99.0% | 82.0% | 1.60x | - | 1,234 |" in report
    assert "pass@4" in report and "50 held-out problems" in report
    assert "GRPO vs cold start: +10.0 points" in report
    assert "Best arm: **continued SFT**" in report  # the control winning is reported as such
    assert "| grpo | skipped (output exists) | 30.5 s |" in report and "| pretrain | ran | 2 min 0 s |" in report
    for plot in ("loss_curves", "reward_curve", "accuracy_per_stage", "expert_load"):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 1000
        assert f"plots/{plot}.png" in report


def test_a_tie_names_no_winner(tmp_path):
    summary = {"comparison": {"seeds": [0], "baseline": "a", "a": [0.0], "b": [0.0], "c": [0.0]}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    report = write_report(tmp_path).read_text()
    assert "No arm is ahead: a, b, c tie at 0.0%" in report and "Best arm" not in report
