"""Training checkpoints: one directory per step, written atomically, loadable as a plain model.

    runs/<name>/checkpoints/step_00000500/
        config.json, model.safetensors   Hugging Face layout (`nanoseek.checkpoint.save_pretrained`):
                                         `load_pretrained` and transformers read it as is; the MoE
                                         router biases are among the weights
        optimizer.pt                     AdamW state keyed by parameter name (full, unsharded)
        trainer_state.pt                 step, tokens, loss scale, train config, and per rank the
                                         data-loader position and RNG states
        trainer_state.json               the same summary for people and scripts
        tokenizer.json, ...              the run's tokenizer, when it has one

The directory appears complete or not at all (`nanoseek.io.atomic_directory`), so a run killed while
saving leaves the previous checkpoint intact. `.pt` files hold only tensors and plain containers and
are read with `torch.load(weights_only=True)`: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from nanoseek.checkpoint import load_pretrained, save_pretrained
from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError
from nanoseek.io import atomic_directory, atomic_write_text
from nanoseek.model import CausalLM
from nanoseek.tokenizer import Tokenizer

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories of interrupted saves excluded)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def write_checkpoint(
    directory: Path,
    model_config: ModelConfig,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer: Tokenizer | None = None,
) -> None:
    """Write one checkpoint from full (unsharded, CPU) state dicts; replaces `directory` atomically.
    A `tokenizer` is saved beside the weights, so the checkpoint is a self-contained model directory."""
    with torch.device("meta"):
        model = CausalLM(model_config)
    model.load_state_dict(model_state, strict=True, assign=True)
    with atomic_directory(directory) as staging:
        save_pretrained(model, staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(trainer_state, staging / "trainer_state.pt")
        summary = {key: trainer_state[key] for key in ("step", "tokens", "train_config")}
        atomic_write_text(staging / "trainer_state.json", json.dumps(summary, indent=2) + "\n")


def read_checkpoint(
    directory: Path, model_config: ModelConfig
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """(model state dict, optimizer state, trainer state) of a checkpoint written for `model_config`."""
    for name in ("optimizer.pt", "trainer_state.pt"):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not a training checkpoint (no {name}); it cannot be resumed")
    model = load_pretrained(directory, dtype=torch.float32)
    saved, current = model.config.to_hf(), model_config.to_hf()
    different = sorted(key for key in saved.keys() | current.keys() if key != "torch_dtype" and saved.get(key) != current.get(key))
    if different:
        raise CheckpointError(
            f"{directory} holds a different model ({', '.join(different)} differ); resume with the same model settings"
        )
    try:
        optimizer_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        trainer_state = torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: say which one
        raise CheckpointError(f"{directory}: cannot read the optimizer / trainer state ({error})") from None
    return model.state_dict(), optimizer_state, trainer_state


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and temporaries left by interrupted saves."""
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(run_dir) / CHECKPOINTS).glob(".*"):
        shutil.rmtree(stale, ignore_errors=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (by a run killed after its last checkpoint) before resuming."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True) if _line_step(line) <= step]
    atomic_write_text(path, "".join(kept))


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0
