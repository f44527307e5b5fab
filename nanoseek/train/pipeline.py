"""`nanoseek pipeline`: the multi-stage DeepSeek-R1 recipe declared in one file, run stage by stage.

    nanoseek pipeline --config configs/r1-micro.toml
    nanoseek pipeline --config configs/r1-micro.toml --dry-run          # check it, print the commands
    nanoseek pipeline --config configs/r1-micro.toml --force rejection  # run it and later stages again
    nanoseek pipeline --config configs/r1-micro.toml cold_start.max_steps=50 name=try2

R1 (R1 paper §2.3): cold-start SFT -> reasoning GRPO -> rejection sampling + SFT (from the base model,
not the RL checkpoint) -> all-scenario GRPO; then distillation into small dense students (§2.4).
A stage is one of the commands a user runs by hand (`sft`, `grpo`, `rejection-sample`, `distill`,
`pretrain`) and runs through the same `cli_main`, so a pipeline is exactly that list of commands:

    name = "r1-micro"                  # outputs: RUNS_DIR/NAME/<stage>/ (default: the file's stem)
    runs_dir = "runs"
    model = "runs/pretrain/checkpoints/step_00002000"   # the base model, referred to as "base"

    [[stages]]
    name = "cold_start"
    command = "sft"
    from_tasks = 2000                  # a flag of the command: --from-tasks 2000
    max_steps = 300                    # anything else is a key=value setting: max_steps=300
    target_accuracy = [0.2, 0.4]

    [[stages]]
    name = "rejection_sft"
    command = "sft"
    model = "base"                     # a stage name (or "base") stands for that stage's output
    data = "rejection"

Each stage reads the model of the nearest earlier stage that made one (or `base`) unless it names
another (`model`, or `teacher` for distill); a table value sets prefixed settings (`sample = {...}`:
`sample.key=value`). The pipeline sets `--name`, `--runs-dir`, `--out` and `--resume` itself. Every
stage is checked (flags, settings, references, paths) before the first one starts.

Per stage it writes RUNS_DIR/NAME/<stage>/ (the command's run: metrics.jsonl, checkpoints/; for
rejection sampling samples.jsonl and its stats, also logged as one metrics.jsonl line) and
stage.json (status, the command line, output, seconds, a fingerprint of its settings and inputs).
A finished stage is skipped; one interrupted after a checkpoint resumes from it (without one it
starts again); a finished stage whose settings or inputs changed is an error until `--force STAGE`
runs it and every later stage again. RUNS_DIR/NAME/pipeline.json summarizes the run for the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import Any

from nanoseek.config import PRESETS, ModelConfig, parse_overrides
from nanoseek.errors import ConfigError
from nanoseek.io import atomic_write_text
from nanoseek.train import checkpointing, distill, grpo, pretrain, rejection, sft
from nanoseek.train.trainer import TrainConfig

BASE = "base"
MARKER, SAMPLES, SUMMARY = "stage.json", "samples.jsonl", "pipeline.json"
RESERVED = ("name", "runs_dir", "out", "resume")  # flags the pipeline sets
PATH_FLAGS = ("model", "teacher", "student", "tokenizer", "data")
MODEL_FLAGS = ("model", "teacher", "student", "tokenizer")


# ----- what a stage can be ------------------------------------------------------------------------------
def _check_pretrain(items: list[str]) -> None:
    prefix = pretrain.MODEL_PREFIX
    parse_overrides(ModelConfig, [item[len(prefix):] for item in items if item.startswith(prefix)])
    TrainConfig(**parse_overrides(TrainConfig, [item for item in items if not item.startswith(prefix)]))


@dataclass(frozen=True)
class Command:
    """A command a stage runs: its module (`add_cli_arguments` / `cli_main`), the flag that takes the
    stage's input model (None: it starts from nothing), what it makes, and a check of its `key=value`
    settings that raises ConfigError without running anything."""

    module: ModuleType
    input_flag: str | None
    makes: str  # "model" (checkpoints/) or "dataset" (samples.jsonl)
    check_settings: Callable[[list[str]], Any]


COMMANDS: dict[str, Command] = {
    "pretrain": Command(pretrain, None, "model", _check_pretrain),
    "sft": Command(sft, "model", "model", lambda items: sft.split_overrides(items, sft.SFTConfig, sft.SFT_TRAIN_DEFAULTS)),
    "grpo": Command(grpo, "model", "model", lambda items: sft.split_overrides(items, grpo.GRPOConfig, grpo.GRPO_TRAIN_DEFAULTS)),
    "rejection-sample": Command(rejection, "model", "dataset", lambda items: rejection.RejectionConfig(**parse_overrides(rejection.RejectionConfig, items))),
    "distill": Command(distill, "teacher", "model", lambda items: COMMANDS["sft"].check_settings(distill.parse_settings(items)[3])),
}


# ----- the config ----------------------------------------------------------------------------------------
@dataclass
class StageConfig:
    """One stage: its name (its output directory), the command, and that command's flags and settings."""

    name: str
    command: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineConfig:
    """A pipeline: stages run in order; `model` is the base model the stages may start from."""

    name: str
    stages: list[StageConfig]
    runs_dir: str = "runs"
    model: str | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name


def load_pipeline_config(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a TOML or JSON pipeline file; `overrides` are `key=value` (top level) or `stage.key=value`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline config {path} does not exist")
    raw = _read_toml(path) if path.suffix == ".toml" else _read_json(path)
    raw.setdefault("name", path.stem)
    for item in overrides:
        _apply_override(raw, item)
    known = {f.name for f in fields(PipelineConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (a pipeline has {', '.join(sorted(known))})")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(f"{path}: give at least one [[stages]] entry")
    stages = []
    for index, entry in enumerate(raw["stages"], start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("command"), str):
            raise ConfigError(f"{path}: stage {index} needs a name and a command")
        settings = {key: value for key, value in entry.items() if key not in ("name", "command")}
        stages.append(StageConfig(entry["name"], entry["command"], settings))
    return PipelineConfig(str(raw["name"]), stages, str(raw.get("runs_dir", "runs")), raw.get("model"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:
        raise ConfigError(f"{path}: reading TOML needs Python 3.11 or later (tomllib); write the pipeline as JSON") from None
    try:
        return tomllib.loads(path.read_text("utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text("utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a pipeline is a JSON object")
    return raw


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} must look like key=value or stage.key=value")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    stage_name, dot, stage_key = key.partition(".")
    if not dot:
        raw[key] = value
        return
    for entry in raw.get("stages", []):
        if entry.get("name") == stage_name:
            entry[stage_key] = value
            return
    raise ConfigError(f"override {item!r}: no stage is named {stage_name!r}")


# ----- from a stage to a command line ----------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An argument parser that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def command_parser(command: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"nanoseek {command}", add_help=False)
    COMMANDS[command].module.add_cli_arguments(parser)
    return parser


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    """The command's `--flag` names as stage keys (argparse lists them only in a private table)."""
    return {option[2:].replace("-", "_") for option in parser._option_string_actions if option.startswith("--")}


def inputs_of(config: PipelineConfig, index: int) -> dict[str, str]:
    """The path flags of stage `index` that name an earlier stage or the base model, with defaults:
    the command's input flag reads the nearest earlier stage that made a model (else `base`)."""
    stage = config.stages[index]
    references = {key: value for key, value in stage.settings.items() if key in PATH_FLAGS and isinstance(value, str)}
    input_flag = COMMANDS[stage.command].input_flag
    if input_flag is not None and input_flag not in stage.settings:
        earlier = [s.name for s in config.stages[:index] if COMMANDS[s.command].makes == "model"]
        references[input_flag] = earlier[-1] if earlier else BASE
    return references


def stage_argv(config: PipelineConfig, index: int, outputs: dict[str, str], resume: bool = False) -> list[str]:
    """The command line of stage `index` (after the command name), stage references replaced by
    `outputs` (stage name or "base" -> path). Settings come first: flags may take several values."""
    stage = config.stages[index]
    flags = _flags(command_parser(stage.command))
    values = {**stage.settings, **inputs_of(config, index)}
    settings, options = [], []
    for key, value in values.items():
        if key in flags:
            if isinstance(value, dict):
                raise ConfigError(f"stage {stage.name!r}: {key} is a flag of {stage.command}; it takes a value, not a table")
            value = outputs.get(value, value) if key in PATH_FLAGS and isinstance(value, str) else value
            items = value if isinstance(value, list) else [value]
            options += [f"--{key.replace('_', '-')}", *(_text(item) for item in items)]
        elif isinstance(value, dict):
            settings += [f"{key}.{sub}={_text(item)}" for sub, item in value.items()]
        else:
            settings.append(f"{key}={_text(value)}")
    stage_dir = config.run_dir / stage.name
    if COMMANDS[stage.command].makes == "dataset":
        options += ["--out", str(stage_dir / SAMPLES)]
    else:
        options += ["--name", stage.name, "--runs-dir", str(config.run_dir)]
    return settings + options + (["--resume"] if resume else [])


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def check_pipeline(config: PipelineConfig) -> None:
    """Raise one ConfigError for the first problem in any stage, before anything runs: unknown
    commands, duplicate or reserved names, reserved keys, references to later or missing stages or
    to paths that do not exist, and flags or settings the command itself rejects."""
    if config.model is not None and not Path(config.model).is_dir():
        raise ConfigError(f"the base model {config.model} does not exist")
    made: dict[str, str] = {}  # earlier stage -> what it makes
    for index, stage in enumerate(config.stages):
        where = f"stage {stage.name!r}"
        if stage.command not in COMMANDS:
            raise ConfigError(f"{where}: unknown command {stage.command!r}; stages run one of {', '.join(COMMANDS)}")
        if stage.name in made or stage.name == BASE or not stage.name or "/" in stage.name:
            raise ConfigError(f"{where}: stage names must be unique, not {BASE!r}, and contain no '/'")
        reserved = sorted(set(stage.settings) & set(RESERVED))
        if reserved:
            raise ConfigError(f"{where}: {reserved[0]!r} is set by the pipeline, not by a stage")
        for key, value in inputs_of(config, index).items():
            _check_reference(config, stage, key, value, made)
        argv = stage_argv(config, index, {name: f"<{name}>" for name in [*made, BASE]})
        args = command_parser(stage.command).parse_args(argv)
        try:
            COMMANDS[stage.command].check_settings(args.overrides)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        made[stage.name] = COMMANDS[stage.command].makes


def _check_reference(config: PipelineConfig, stage: StageConfig, key: str, value: str, made: dict[str, str]) -> None:
    where, wanted = f"stage {stage.name!r}", "model" if key in MODEL_FLAGS else "dataset"
    preset_allowed = key == "student" or (key == "model" and stage.command == "pretrain")
    stage_names = [stage.name for stage in config.stages]
    if value == BASE:
        if config.model is None:
            raise ConfigError(f"{where}: {key} = {BASE!r} needs a top-level model = \"DIR\" (or name an earlier stage)")
    elif value in made:
        if made[value] != wanted:
            raise ConfigError(f"{where}: {key} = {value!r} names a stage that makes a {made[value]}, not a {wanted}")
    elif value in stage_names:
        raise ConfigError(f"{where}: {key} = {value!r} names a stage that runs later (stages run in order)")
    elif not Path(value).exists() and not (preset_allowed and value in PRESETS):
        raise ConfigError(f"{where}: {key} = {value!r} is neither an earlier stage, {BASE!r}, nor an existing path")


# ----- running -----------------------------------------------------------------------------------------------
def run_pipeline(config: PipelineConfig, force: str | bool | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Run the stages in order (skipping finished ones, resuming interrupted ones); returns the summary
    also written to RUNS_DIR/NAME/pipeline.json. `force`: True re-runs every stage, a stage name that
    stage and all after it. `dry_run` prints each stage's command line and runs nothing."""
    check_pipeline(config)
    names = [stage.name for stage in config.stages]
    if isinstance(force, str) and force not in names:
        raise ConfigError(f"--force {force!r}: no such stage (stages: {', '.join(names)})")
    first_forced = 0 if force is True else names.index(force) if force else len(names)
    outputs: dict[str, str] = {BASE: config.model} if config.model else {}
    fingerprints: dict[str, str] = {}
    summary: dict[str, Any] = {"name": config.name, "run_dir": str(config.run_dir), "stages": []}
    for index, stage in enumerate(config.stages):
        stage_dir = config.run_dir / stage.name
        argv = stage_argv(config, index, outputs)
        upstream = sorted(fingerprints[name] for name in inputs_of(config, index).values() if name in fingerprints)
        fingerprint = hashlib.sha256(json.dumps([stage.command, argv, upstream]).encode()).hexdigest()[:16]
        fingerprints[stage.name] = fingerprint
        if dry_run:
            print(shlex.join(["nanoseek", stage.command, *argv]))
            outputs[stage.name] = f"<output of {stage.name}>"
            continue
        record = _finished_record(stage.name, stage_dir, fingerprint, forced=index >= first_forced)
        if record is not None:
            _log(f"stage {stage.name}: done, skipped ({record['output']})")
        else:
            record = _run_stage(config, index, outputs, fingerprint, stage_dir)
        outputs[stage.name] = record["output"]
        summary["stages"].append({"name": stage.name, "command": stage.command, **record})
        atomic_write_text(config.run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary


def _finished_record(name: str, stage_dir: Path, fingerprint: str, forced: bool) -> dict[str, Any] | None:
    """The marker of a finished stage that can be skipped, else None with `stage_dir` ready to run in:
    forced stages and interrupted attempts without a checkpoint are cleared, an interrupted attempt
    with one is kept (to resume). A finished or resumable stage whose fingerprint changed is an error."""
    marker = _read_marker(stage_dir)
    if marker is None and stage_dir.exists() and any(stage_dir.iterdir()) and not forced:
        raise ConfigError(f"{stage_dir} holds files this pipeline did not write: remove them or rename the pipeline")
    resumable = marker is not None and marker["status"] != "done" and checkpointing.latest_checkpoint(stage_dir) is not None
    if marker is not None and not forced and marker["fingerprint"] != fingerprint and (marker["status"] == "done" or resumable):
        raise ConfigError(
            f"stage {name!r} {'finished' if marker['status'] == 'done' else 'was interrupted'} with other settings "
            f"or inputs than the config now gives; pass --force {name} to run it (and the stages after it) again"
        )
    if marker is not None and marker["status"] == "done" and not forced and Path(marker["output"]).exists():
        return marker
    if stage_dir.exists() and (forced or not resumable):
        shutil.rmtree(stage_dir)
    return None


def _run_stage(config: PipelineConfig, index: int, outputs: dict[str, str], fingerprint: str, stage_dir: Path) -> dict[str, Any]:
    """Run one stage through its command's `cli_main`, resuming from its latest checkpoint if an
    earlier attempt left one; returns its finished marker."""
    stage = config.stages[index]
    command = COMMANDS[stage.command]
    resume = checkpointing.latest_checkpoint(stage_dir) is not None
    argv = stage_argv(config, index, outputs, resume)
    _log(f"stage {stage.name}: {'resuming' if resume else 'running'}: {shlex.join(['nanoseek', stage.command, *argv])}")
    record: dict[str, Any] = {"status": "running", "argv": argv, "fingerprint": fingerprint}
    _write_marker(stage_dir, record)
    start = time.perf_counter()
    args = command_parser(stage.command).parse_args(argv)
    command.module.cli_main(args)
    if command.makes == "dataset":
        output = stage_dir / SAMPLES
        stats = json.loads(output.with_name(output.stem + ".stats.json").read_text("utf-8"))
        atomic_write_text(stage_dir / "metrics.jsonl", json.dumps({"step": 0, **stats}) + "\n")
        result = stats
    else:
        output = checkpointing.latest_checkpoint(stage_dir)
        result = _last_metrics(stage_dir / "metrics.jsonl")
    record.update(status="done", output=str(output), seconds=round(time.perf_counter() - start, 2), result=result)
    _write_marker(stage_dir, record)
    return record


def _last_metrics(path: Path) -> dict[str, Any]:
    lines = path.read_text("utf-8").splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def _read_marker(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / MARKER
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def _write_marker(stage_dir: Path, record: dict[str, Any]) -> None:
    atomic_write_text(stage_dir / MARKER, json.dumps(record, indent=2) + "\n")


def _log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


# ----- command line -------------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        f"A stage runs one of: {', '.join(COMMANDS)}, with that command's flags and key=value settings as "
        "its keys; an example: configs/r1-micro.toml."
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="pipeline file (.toml or .json)")
    parser.add_argument("--force", nargs="?", const=True, default=None, metavar="STAGE",
                        help="run STAGE and every later stage again (no STAGE: all of them)")
    parser.add_argument("--dry-run", action="store_true", help="check the config and print each stage's command line")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="top-level key=value or stage.key=value")


def cli_main(args: argparse.Namespace) -> int:
    config = load_pipeline_config(args.config, args.overrides)
    summary = run_pipeline(config, args.force, args.dry_run)
    if not args.dry_run:
        print(json.dumps({"pipeline": summary["run_dir"], "stages": {s["name"]: s["output"] for s in summary["stages"]}}))
    return 0
