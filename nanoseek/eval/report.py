"""The report card: `runs/<name>/report.md` plus PNG plots from a run's summary and metrics.

A run directory holds `summary.json` (written by the speedrun or any script that strings stages
together) and each stage's `metrics.jsonl`. The summary lists

    stages     [{"name", "seconds", "status", "command", "metrics"?}] in the order they ran
    evals      {stage: {"accuracy", "pass@k", "maj@k", "format_rate", "mtp_acceptance", ...}}
               every stage evaluated on the same held-out problems
    comparison optional {"seeds": [...], "<arm>": [accuracy per seed], ...}: e.g. GRPO against a
               continued-SFT control of equal cost
    goals      optional [{"goal", "target", "measured", "met"}]
    machine    platform, CPU, threads, torch / python / nanoseek versions

The report states every number as measured; nothing is filtered or rounded up.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from nanoseek.io import atomic_write_text

# (summary key, column title) of the per-stage table, in order; missing values print as "-".
EVAL_COLUMNS = [
    ("accuracy", "greedy acc"),
    ("pass@k", "pass@k"),
    ("maj@k", "maj@k"),
    ("format_rate", "format"),
    ("mtp_acceptance", "MTP accept"),
    ("spec_speedup", "spec speedup"),
    ("expert_load_max_violation", "load max-vio"),
    ("tokens_per_second", "decode tok/s"),
]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a missing file is an empty list)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(run_dir: str | Path) -> Path:
    """Render `report.md` and `plots/*.png` for the run in `run_dir`; returns the report path."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    plots = make_plots(run_dir, summary)
    report = render_markdown(summary, plots)
    path = run_dir / "report.md"
    atomic_write_text(path, report)
    return path


def render_markdown(summary: dict[str, Any], plots: list[Path]) -> str:
    lines = [f"# nanoseek report card: {summary.get('name', 'run')}", ""]
    if summary.get("command"):
        lines += [f"Produced by `{summary['command']}`" + (f" on {summary['started']}" if summary.get("started") else "") + ".", ""]
    total = sum(stage.get("seconds", 0.0) for stage in summary.get("stages", []))
    wall = summary.get("wall_seconds", total)
    if abs(wall - total) > max(60.0, 0.25 * total):  # a resumed run: earlier invocations did part of the work
        lines += [f"Wall time of this invocation: **{_duration(wall)}**; the stages below took "
                  f"**{_duration(total)}** in all, over the invocations that ran them.", ""]
    else:
        lines += [f"Total wall time: **{_duration(wall)}**.", ""]

    evals = summary.get("evals", {})
    if evals:
        lines += ["## Every stage on the same held-out problems", ""]
        k = summary.get("k")
        header = [title.replace("@k", f"@{k}") if k else title for _, title in EVAL_COLUMNS]
        lines += ["| stage | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for stage, values in evals.items():
            cells = [_format_value(key, values.get(key)) for key, _ in EVAL_COLUMNS]
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        problems = summary.get("heldout_problems")
        if problems:
            lines += ["", f"{problems} held-out problems (test split, disjoint from training by content hash)."]
        lines.append("")

    comparison = summary.get("comparison")
    if comparison:
        lines += render_comparison(comparison)

    goals = summary.get("goals")
    if goals:
        lines += ["## Where we stand against the goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
        for goal in goals:
            met = {True: "yes", False: "**no**"}.get(goal.get("met"), "-")
            lines.append(f"| {goal['goal']} | {goal['target']} | {goal['measured']} | {met} |")
        lines.append("")

    stages = summary.get("stages", [])
    if stages:
        lines += ["## Stages", "", "| stage | status | wall time | command |", "|---|---|---|---|"]
        for stage in stages:
            command = f"`{stage['command']}`" if stage.get("command") else ""
            lines.append(f"| {stage['name']} | {stage.get('status', '')} | {_duration(stage.get('seconds', 0))} | {command} |")
        lines.append("")

    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{plot.stem}](plots/{plot.name})" for plot in plots]
        lines.append("")

    notes = summary.get("notes")
    if notes:
        lines += ["## Notes", "", *[f"- {note}" for note in notes], ""]

    machine = summary.get("machine")
    if machine:
        lines += ["## Machine and versions", "", *[f"- {key}: {value}" for key, value in machine.items()], ""]
    return "\n".join(lines)


def render_comparison(comparison: dict[str, Any]) -> list[str]:
    """Per-seed accuracies of each arm, their means, and a plain verdict."""
    seeds = comparison.get("seeds", [])
    arms = [key for key in comparison if key not in ("seeds", "title", "baseline", "note")]
    title = comparison.get("title", "Comparison")
    lines = [f"## {title}", "", "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
             "|---" * (len(seeds) + 2) + "|"]
    means = {}
    for arm in arms:
        values = comparison[arm]
        means[arm] = statistics.fmean(values) if values else math.nan
        lines.append(f"| {arm} | " + " | ".join(f"{v:.1%}" for v in values) + f" | {means[arm]:.1%} |")
    lines.append("")
    baseline = comparison.get("baseline")
    if baseline in means:
        for arm in arms:
            if arm != baseline:
                delta = (means[arm] - means[baseline]) * 100
                lines.append(f"- {arm} vs {baseline}: {delta:+.1f} points (mean over {len(seeds)} seed(s)).")
        best = max(means.values())
        leaders = [arm for arm in arms if means[arm] == best]
        if len(leaders) == 1:
            lines.append(f"- Best arm: **{leaders[0]}**.")
        else:
            lines.append(f"- No arm is ahead: {', '.join(leaders)} tie at {best:.1%}.")
    if comparison.get("note"):
        lines.append(f"- {comparison['note']}")
    lines.append("")
    return lines


def make_plots(run_dir: Path, summary: dict[str, Any]) -> list[Path]:
    """Loss curves, reward curves, accuracy per stage and the expert-load heat map (what exists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    made: list[Path] = []
    stage_metrics = {
        stage["name"]: read_metrics(run_dir / stage["metrics"])
        for stage in summary.get("stages", [])
        if stage.get("metrics")
    }

    loss_curves = {name: _training_loss(records) for name, records in stage_metrics.items()}
    loss_curves = {name: points for name, points in loss_curves.items() if points}
    if loss_curves:
        figure, axis = plt.subplots(figsize=(7, 4))
        for name, points in loss_curves.items():
            axis.plot(*zip(*points, strict=True), label=name)
            validation = [(r["step"], r["val_lm_loss"]) for r in stage_metrics[name] if "val_lm_loss" in r]
            if validation:
                axis.plot(*zip(*validation, strict=True), "o--", markersize=3, label=f"{name} (validation)")
        axis.set(xlabel="step", ylabel="loss", title="Training loss per stage", yscale="log")
        axis.legend(fontsize=8)
        made.append(_save(figure, plot_dir / "loss_curves.png"))

    reward_curves = {name: records for name, records in stage_metrics.items() if any("reward" in r for r in records)}
    if reward_curves:
        figure, axis = plt.subplots(figsize=(7, 4))
        for name, records in reward_curves.items():
            points = [(r["step"], r["reward"]) for r in records if "reward" in r and "step" in r]
            axis.plot(*zip(*points, strict=True), label=f"{name} total reward")
            for key in sorted({k for r in records for k in r if k.startswith("rewards/") and k.endswith("/mean")}):
                series = [(r["step"], r[key]) for r in records if key in r and "step" in r]
                axis.plot(*zip(*series, strict=True), linestyle="--", label=f"{name} {key.split('/')[1]}")
        axis.set(xlabel="step", ylabel="mean reward", title="GRPO reward")
        axis.legend(fontsize=8)
        made.append(_save(figure, plot_dir / "reward_curve.png"))

    evals = summary.get("evals", {})
    accuracy = {stage: values["accuracy"] for stage, values in evals.items() if values.get("accuracy") is not None}
    if accuracy:
        figure, axis = plt.subplots(figsize=(7, 4))
        axis.bar(list(accuracy), [100 * v for v in accuracy.values()], color="#4c72b0")
        axis.set(ylabel="held-out greedy accuracy (%)", title="Accuracy per stage", ylim=(0, 100))
        axis.tick_params(axis="x", rotation=20)
        made.append(_save(figure, plot_dir / "accuracy_per_stage.png"))

    loads = [(stage, values["expert_load"]) for stage, values in evals.items() if values.get("expert_load")]
    if loads:
        stage, load = loads[-1]
        figure, axis = plt.subplots(figsize=(7, 0.6 * len(load) + 1.5))
        image = axis.imshow(load, cmap="viridis", aspect="auto")
        axis.set(xlabel="expert", ylabel="MoE layer", title=f"Expert load on held-out tokens ({stage}; 1.0 = uniform)")
        figure.colorbar(image, ax=axis)
        made.append(_save(figure, plot_dir / "expert_load.png"))
    return made


def _training_loss(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of a stage: the next-token loss (pretrain, SFT) or the stage's own loss
    (distillation); GRPO's surrogate loss is no loss curve, its reward curve is plotted instead."""
    if any("reward" in record for record in records):
        return []
    key = "lm_loss" if any("lm_loss" in record for record in records) else "loss"
    return [(record["step"], record[key]) for record in records if key in record and "step" in record]


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def _format_value(key: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key in ("accuracy", "pass@k", "maj@k", "format_rate", "mtp_acceptance"):
        return f"{value:.1%}"
    if key == "spec_speedup":
        return f"{value:.2f}x"
    if key == "tokens_per_second":
        return f"{value:,.0f}"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    return f"{seconds:.1f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"
