"""`nanoseek speedrun`: the whole R1 pipeline at micro scale on built-in tasks, ending in a report card.

    tokenizer train  ->  data prepare  ->  pretrain a nano DeepSeek-V3 (MLA, MoE + aux-loss-free
    balancing, MTP)  ->  cold-start SFT (stopped in an accuracy band)  ->  GRPO (accuracy + format)
    ->  rejection sampling  ->  SFT on it (from the base model, as R1)  ->  distillation into a dense
    Qwen2-shaped student (pretrained on the same corpus first)  ->  every stage evaluated on the same
    held-out problems  ->  report.md

plus, per seed, a control: continued SFT from the cold start for as long as GRPO's steps took, so the
report can say what GRPO bought (or did not). Each step is a command a user can run by hand: the tokenizer
and data commands, then `nanoseek pipeline` over a config this module writes (RUN/pipeline-config.json),
then `nanoseek eval` per stage. Finished steps are skipped, so an interrupted speedrun resumes;
`--force` starts over.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek import __version__
from nanoseek.config import parse_overrides
from nanoseek.errors import TrainingError
from nanoseek.io import atomic_write_text


@dataclass
class SpeedrunConfig:
    """Sizes of every step. The defaults fit 15 minutes on 2 CPU cores; `--quick` is a smoke run."""

    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "word_problem"])
    difficulty: list[int] = field(default_factory=lambda: [1, 2])
    vocab_size: int = 1024
    tokenizer_documents: int = 5000
    corpus_documents: int = 20000
    # pretraining the nano model on generated task text
    pretrain_steps: int = 250
    pretrain_batch: int = 16
    pretrain_seq_len: int = 256
    pretrain_lr: float = 3e-3
    # cold-start SFT, stopped once held-out accuracy enters the band
    cold_start_problems: int = 4000
    cold_start_max_steps: int = 300
    cold_start_band: list[float] = field(default_factory=lambda: [0.2, 0.45])
    sft_batch: int = 16
    sft_seq_len: int = 128
    eval_every: int = 50
    # GRPO with the accuracy + format rewards
    grpo_steps: int = 50
    grpo_prompts_per_step: int = 32
    grpo_group_size: int = 8
    grpo_completion_tokens: int = 64
    grpo_lr: float = 2e-5  # at 5e-5 held-out greedy accuracy fell from 22% to 12% in 20 steps
    # rejection sampling + SFT from the base model, then distillation into a dense student
    rejection_prompts: int = 1024
    rejection_samples: int = 8
    rejection_sft_steps: int = 300
    student: str = "qwen2-nano"
    # a quarter of nano's 0.95M activated parameters (vocab 1024): 0.23M, and 0.17M vs 0.69M without embeddings
    student_overrides: list[str] = field(default_factory=lambda: ["hidden_size=64", "intermediate_size=224"])
    student_pretrain_steps: int = 250  # R1 distils into pretrained models; 0: a random-init student
    distill_steps: int = 300
    # evaluation of every stage
    eval_problems: int = 200
    eval_samples: int = 8  # k of pass@k and maj@k
    eval_max_tokens: int = 96
    speculative_problems: int = 32
    # rejection sampling needs a model that answers some problems right: the quick run has none
    rejection: bool = True

    @classmethod
    def quick(cls) -> SpeedrunConfig:
        """About a minute on 2 cores: every step runs, nothing has time to learn."""
        return cls(
            tokenizer_documents=500, corpus_documents=1000, pretrain_steps=6, pretrain_batch=4, pretrain_seq_len=128,
            cold_start_problems=200, cold_start_max_steps=4, sft_batch=4, eval_every=4, grpo_steps=2,
            grpo_prompts_per_step=2, grpo_group_size=2, grpo_completion_tokens=16, rejection_prompts=8,
            rejection_samples=2, rejection_sft_steps=2, student_pretrain_steps=2, distill_steps=2, eval_problems=8,
            eval_samples=2, eval_max_tokens=24, speculative_problems=4, rejection=False,
        )


# ----- the pipeline this run declares ------------------------------------------------------------------
def pipeline_config(run_dir: Path, config: SpeedrunConfig, seeds: list[int], controls: dict[int, int]) -> dict:
    """The `nanoseek pipeline` config of the run. `controls` maps a seed to its control's step count
    (known once that seed's GRPO has run); seeds beyond the first repeat only cold start, GRPO and control."""
    tasks = {"tasks": config.tasks, "difficulty": config.difficulty}
    sft_batch = [f"global_batch_size={config.sft_batch}", f"micro_batch_size={config.sft_batch}"]

    def cold_start(seed: int) -> dict:
        return {
            "name": _stage("cold_start", seed, seeds), "command": "sft", "model": "pretrain",
            "from_tasks": config.cold_start_problems, **tasks, "max_steps": config.cold_start_max_steps,
            "eval_every": config.eval_every, "target_accuracy": config.cold_start_band, "seed": seed,
            "seq_len": config.sft_seq_len, **_settings(sft_batch), "eval_problems": min(100, config.eval_problems),
        }

    def grpo(seed: int) -> dict:
        return {
            "name": _stage("grpo", seed, seeds), "command": "grpo", "model": _stage("cold_start", seed, seeds),
            "from_tasks": config.cold_start_problems, **tasks, "max_steps": config.grpo_steps,
            "rewards": "accuracy,format", "num_generations": config.grpo_group_size,
            "global_batch_size": config.grpo_prompts_per_step * config.grpo_group_size,  # completions per step
            "micro_batch_size": config.grpo_prompts_per_step * config.grpo_group_size,
            "max_completion_length": config.grpo_completion_tokens,
            "lr": config.grpo_lr, "seed": seed, "eval_problems": min(64, config.eval_problems),
            "eval_samples": min(config.eval_samples, config.grpo_prompts_per_step * config.grpo_group_size),
        }

    def control(seed: int, steps: int) -> dict:
        return {**cold_start(seed), "name": _stage("control", seed, seeds), "model": _stage("cold_start", seed, seeds),
                "max_steps": max(steps, 1), "target_accuracy": None}

    student_model = _settings([f"model.{item}" for item in config.student_overrides])

    def pretrain(name: str, preset: str, steps: int, **model: Any) -> dict:
        return {
            "name": name, "command": "pretrain", "model": preset, "data": str(run_dir / "data"),
            "max_steps": steps, "global_batch_size": config.pretrain_batch,
            "micro_batch_size": config.pretrain_batch, "seq_len": config.pretrain_seq_len, "lr": config.pretrain_lr,
            "warmup_steps": max(1, steps // 10), "eval_every": 0, "checkpoint_every": 0,
            "model.vocab_size": config.vocab_size, **model,
        }

    stages: list[dict] = [pretrain("pretrain", "nano", config.pretrain_steps)]
    first = seeds[0]
    stages += [cold_start(first), grpo(first)]
    if config.rejection:
        stages += [
            {"name": "rejection", "command": "rejection-sample", "model": _stage("grpo", first, seeds),
             "from_tasks": config.rejection_prompts, **tasks, "samples_per_prompt": config.rejection_samples,
             "max_tokens": config.grpo_completion_tokens},
            {"name": "rejection_sft", "command": "sft", "model": "pretrain", "data": "rejection",
             "max_steps": config.rejection_sft_steps, "eval_every": config.eval_every, **tasks,
             "seq_len": config.sft_seq_len, **_settings(sft_batch), "eval_problems": min(100, config.eval_problems)},
        ]
    if config.student_pretrain_steps:
        stages.append(pretrain("student_pretrain", config.student, config.student_pretrain_steps, **student_model))
    stages += [
        {"name": "distill", "command": "distill", "teacher": "rejection_sft" if config.rejection else "grpo",
         "student": "student_pretrain" if config.student_pretrain_steps else config.student,
         **({} if config.student_pretrain_steps else student_model),
         "from_tasks": config.cold_start_problems, **tasks, "max_steps": config.distill_steps,
         "divergence": "jsd", "beta": 0.5, "eval_every": config.eval_every, "seq_len": config.sft_seq_len,
         **_settings(sft_batch)},
    ]
    for seed in seeds[1:]:
        stages += [cold_start(seed), grpo(seed)]
    stages += [control(seed, steps) for seed, steps in controls.items()]
    # Stages keep their settings flat: `seq_len=...` etc. are the commands' key=value settings.
    stages = [{key: value for key, value in stage.items() if value is not None} for stage in stages]
    return {"name": run_dir.name, "runs_dir": str(run_dir.parent), "stages": stages}


def _stage(kind: str, seed: int, seeds: list[int]) -> str:
    return kind if seed == seeds[0] else f"{kind}_seed{seed}"


def _settings(items: list[str]) -> dict[str, Any]:
    return {key: json.loads(value) for key, value in (item.split("=", 1) for item in items)}


# ----- running it ---------------------------------------------------------------------------------------
class Speedrun:
    def __init__(self, run_dir: Path, config: SpeedrunConfig, seeds: list[int], force: bool, command: str):
        self.run_dir, self.config, self.seeds, self.force = run_dir, config, seeds, force
        self.command = command
        self.stages: list[dict[str, Any]] = []

    def run(self) -> Path:
        if self.force and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        self.step("tokenizer", self.run_dir / "tokenizer" / "tokenizer.json", [
            "tokenizer", "train", "--from-tasks", str(self.config.tokenizer_documents),
            "--vocab-size", str(self.config.vocab_size), "--out", str(self.run_dir / "tokenizer"),
        ])
        self.step("data", self.run_dir / "data" / "manifest.json", [
            "data", "prepare", "--tokenizer", str(self.run_dir / "tokenizer"),
            "--from-tasks", str(self.config.corpus_documents), "--out", str(self.run_dir / "data"),
        ])
        self.run_pipeline(controls={})
        controls = {seed: self.control_steps(seed) for seed in self.seeds}
        self.run_pipeline(controls)
        evals = self.evaluate_all()
        summary = self.summary(evals, time.perf_counter() - started)
        atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        from nanoseek.eval.report import write_report

        return write_report(self.run_dir)

    def step(self, name: str, done_marker: Path, argv: list[str]) -> None:
        """Run one command unless its output exists; record its wall time."""
        if done_marker.exists():
            self.stages.append({"name": name, "status": "skipped (output exists)", "seconds": 0.0,
                                "command": shlex.join(["nanoseek", *argv])})
            return
        self.call(name, argv)

    def call(self, name: str, argv: list[str], metrics: str | None = None) -> None:
        from nanoseek.cli import main

        print(f"[speedrun] {name}: nanoseek {shlex.join(argv)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        if main(argv) != 0:
            raise TrainingError(f"speedrun step {name!r} failed: nanoseek {shlex.join(argv)}")
        self.stages.append({"name": name, "status": "ran", "seconds": round(time.perf_counter() - start, 1),
                            "command": shlex.join(["nanoseek", *argv]), **({"metrics": metrics} if metrics else {})})

    def run_pipeline(self, controls: dict[int, int]) -> None:
        config_path = self.run_dir / "pipeline-config.json"
        config = pipeline_config(self.run_dir, self.config, self.seeds, controls)
        atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
        from nanoseek.cli import main

        argv = ["pipeline", "--config", str(config_path)]
        print(f"[speedrun] pipeline: nanoseek {shlex.join(argv)}", file=sys.stderr, flush=True)
        if main(argv) != 0:
            raise TrainingError(f"the pipeline failed: nanoseek {shlex.join(argv)}")

    def pipeline_stages(self) -> list[dict[str, Any]]:
        summary = self.run_dir / "pipeline.json"
        return json.loads(summary.read_text())["stages"] if summary.is_file() else []

    def control_steps(self, seed: int) -> int:
        """Steps of continued SFT that take as long as this seed's GRPO steps took (rollouts and updates;
        loading and held-out evaluations excluded). Medians of the logged step times, so a burst of
        load on a shared machine during one stage does not hand the control extra steps."""

        def step_seconds(stage: str) -> list[float]:
            records = map(json.loads, (self.run_dir / stage / "metrics.jsonl").read_text().splitlines())
            return [record["step_seconds"] for record in records if "step_seconds" in record]

        grpo = step_seconds(_stage("grpo", seed, self.seeds))
        sft = step_seconds(_stage("cold_start", seed, self.seeds))
        if not grpo or not sft:
            return 1
        return max(1, round(len(grpo) * statistics.median(grpo) / statistics.median(sft)))

    def evaluate_all(self) -> dict[str, dict[str, Any]]:
        """`nanoseek eval` on every model stage, the same held-out problems for all (cached per stage)."""
        evals = {}
        for stage in self.pipeline_stages():
            if stage["command"] == "rejection-sample":
                continue
            out = self.run_dir / "eval" / f"{stage['name']}.json"
            argv = [
                "eval", "--model", stage["output"], "--count", str(self.config.eval_problems),
                "--samples", str(self.config.eval_samples), "--max-tokens", str(self.config.eval_max_tokens),
                "--tasks", *self.config.tasks, "--difficulty", *map(str, self.config.difficulty),
                "--speculative", str(self.config.speculative_problems), "--expert-load", "--out", str(out),
            ]
            if not out.exists():
                self.call(f"eval {stage['name']}", argv)
            evals[stage["name"]] = json.loads(out.read_text())
        return evals

    def summary(self, evals: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
        k = self.config.eval_samples
        table = {}
        for stage, values in evals.items():
            table[stage] = {**values, "pass@k": values.get(f"pass@{k}"), "maj@k": values.get(f"maj@{k}")}
        setup = [stage for stage in self.stages if not stage["name"].startswith("eval ")]
        evaluations = [stage for stage in self.stages if stage["name"].startswith("eval ")]
        stages = list(setup)
        for record in self.pipeline_stages():
            stages.append({
                "name": record["name"], "status": record.get("status", ""), "seconds": record.get("seconds", 0.0),
                "command": shlex.join(["nanoseek", record["command"], *record.get("argv", [])]),
                "metrics": f"{record['name']}/metrics.jsonl",
            })
        stages += evaluations
        comparison = self.comparison(evals)
        return {
            "name": self.run_dir.name, "command": self.command, "k": k,
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "wall_seconds": round(seconds, 1),
            "heldout_problems": self.config.eval_problems, "stages": stages, "evals": table,
            "comparison": comparison, "goals": self.goals(evals, comparison),
            "machine": machine_info(), "config": dataclasses.asdict(self.config), "seeds": self.seeds,
        }

    def comparison(self, evals: dict[str, dict[str, Any]]) -> dict[str, Any]:
        def accuracies(kind: str) -> list[float]:
            return [evals[_stage(kind, seed, self.seeds)]["accuracy"] for seed in self.seeds
                    if _stage(kind, seed, self.seeds) in evals]

        return {
            "title": "GRPO against a continued-SFT control of equal training time (held-out greedy accuracy)",
            "seeds": self.seeds, "baseline": "cold start", "cold start": accuracies("cold_start"),
            "GRPO": accuracies("grpo"), "continued SFT (control)": accuracies("control"),
        }

    def goals(self, evals: dict[str, dict[str, Any]], comparison: dict[str, Any]) -> list[dict[str, Any]]:
        goals = []
        cold, grpo = comparison["cold start"], comparison["GRPO"]
        if cold and grpo:
            gain = (statistics.fmean(grpo) - statistics.fmean(cold)) * 100
            goals.append({"goal": "GRPO raises held-out accuracy over the cold start", "target": ">= +15 points",
                          "measured": f"{gain:+.1f} points", "met": gain >= 15})
        if "grpo" in evals:
            rate = evals["grpo"].get("format_rate", 0.0)
            goals.append({"goal": "format compliance after GRPO", "target": ">= 95%", "measured": f"{rate:.1%}",
                          "met": rate >= 0.95})
        teacher = "rejection_sft" if self.config.rejection else "grpo"
        outputs = {stage["name"]: stage.get("output") for stage in self.pipeline_stages()}
        if outputs.get("distill") and outputs.get(teacher):
            share = activated_parameters(outputs["distill"]) / activated_parameters(outputs[teacher])
            goals.append({"goal": "the student's activated parameters, as a share of the teacher's", "target": "<= 25%",
                          "measured": f"{share:.1%}", "met": share <= 0.25})
        if "distill" in evals and teacher in evals and evals[teacher]["accuracy"] > 0:
            kept = evals["distill"]["accuracy"] / evals[teacher]["accuracy"]
            goals.append({"goal": "the student keeps the teacher's accuracy", "target": ">= 85%",
                          "measured": f"{kept:.0%} ({evals['distill']['accuracy']:.1%} vs {evals[teacher]['accuracy']:.1%})",
                          "met": kept >= 0.85})
        return goals


def activated_parameters(model_dir: str | Path) -> int:
    """Parameters a token runs through (embedding and head included) in a checkpoint's model."""
    from nanoseek.config import ModelConfig
    from nanoseek.model.accounting import account

    return account(ModelConfig.from_hf(model_dir)).activated_parameters


def machine_info() -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "torch": torch.__version__, "nanoseek": __version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    return info


# ----- command line -------------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=None, help="run name (default: speedrun, or speedrun-quick with --quick)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--quick", action="store_true", help="a smoke run of every step (about a minute)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds of cold start, GRPO and control")
    parser.add_argument("--force", action="store_true", help="start over instead of skipping finished steps")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="SpeedrunConfig settings")


def cli_main(args: argparse.Namespace) -> int:
    base = SpeedrunConfig.quick() if args.quick else SpeedrunConfig()
    config = dataclasses.replace(base, **parse_overrides(SpeedrunConfig, args.overrides))
    name = args.name or ("speedrun-quick" if args.quick else "speedrun")
    run_dir = Path(args.runs_dir) / name
    command = shlex.join(["nanoseek", "speedrun", *sys.argv[2:]]) if sys.argv[1:2] == ["speedrun"] else "nanoseek speedrun"
    report = Speedrun(run_dir, config, list(dict.fromkeys(args.seeds)), args.force, command).run()
    outputs = {stage["name"]: stage["output"] for stage in json.loads((run_dir / "pipeline.json").read_text())["stages"]}
    teacher = outputs["rejection_sft" if config.rejection else "grpo"]
    student = outputs["distill"]
    print(f"\nreport card: {report}\n")
    print("chat with the reasoning model and the distilled student:")
    print(f"  nanoseek chat --model {teacher}")
    print(f"  nanoseek chat --model {student}")
    print("serve both behind an OpenAI-compatible API:")
    print(f"  nanoseek serve --model r1-nano={teacher} --model student={student}")
    return 0
