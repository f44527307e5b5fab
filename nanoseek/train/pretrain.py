"""`nanoseek pretrain`: next-token pretraining of a DeepSeek-V3-style model on token shards.

    nanoseek pretrain --data data/shards --model nano --name speedrun max_steps=2000 lr=3e-3 \\
        model.num_hidden_layers=6 precision=bf16
    torchrun --nproc_per_node=8 -m nanoseek pretrain --data data/shards --model small ...
    nanoseek pretrain --data data/shards --model nano --name speedrun --resume

`key=value` arguments set `TrainConfig` fields; `model.key=value` set `ModelConfig` fields of the
preset (or of a config.json / checkpoint directory given to --model). The vocabulary size follows
the shards' tokenizer unless set. Everything is checked before the first step; a bad setting, a
missing shard or an indivisible batch is one error line. The run writes `runs/<name>/metrics.jsonl`,
`run_config.json` and `checkpoints/step_*` (Hugging Face model directories with the tokenizer), and
ends with a validation loss and a greedy sample from the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nanoseek.config import ModelConfig, load_model_config, parse_overrides
from nanoseek.data.corpus import load_manifest
from nanoseek.data.loader import PretrainLoader
from nanoseek.errors import ConfigError, DataError, TrainingError
from nanoseek.io import atomic_write_text
from nanoseek.model import build_model
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import checkpointing, parallel
from nanoseek.train.trainer import TrainConfig, Trainer

MODEL_PREFIX = "model."


@dataclasses.dataclass
class PretrainRun:
    """Everything a pretraining run is made of, resolved and checked."""

    train: TrainConfig
    model: ModelConfig
    data_dir: Path
    run_dir: Path
    manifest: dict[str, Any]
    resume_from: Path | None


def resolve_run(
    data: str | Path,
    model: str = "nano",
    overrides: list[str] | None = None,
    name: str = "pretrain",
    runs_dir: str | Path = "runs",
    resume: str | bool | None = None,
) -> PretrainRun:
    """Parse and check every setting (no model is built, no data read beyond the manifest).

    resume: None/False starts a new run (error if `runs_dir/name` already holds one), True continues
    from its latest checkpoint, a path continues from that checkpoint.
    """
    overrides = overrides or []
    model_overrides = [item[len(MODEL_PREFIX):] for item in overrides if item.startswith(MODEL_PREFIX)]
    train_overrides = [item for item in overrides if not item.startswith(MODEL_PREFIX)]
    train = TrainConfig(**parse_overrides(TrainConfig, train_overrides))
    data_dir = Path(data)
    manifest = load_manifest(data_dir)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            if not (data_dir / shard["file"]).is_file():
                raise DataError(f"{data_dir} is missing shard {shard['file']} listed in its manifest; prepare it again")
    model_config = load_model_config(model, model_overrides)
    explicit_vocab = any(item.split("=")[0].strip() == "vocab_size" for item in model_overrides)
    if not explicit_vocab:
        model_config = model_config.replace(vocab_size=manifest["vocab_size"])
    elif model_config.vocab_size < manifest["vocab_size"]:
        raise ConfigError(
            f"model.vocab_size={model_config.vocab_size} is smaller than the data's vocabulary ({manifest['vocab_size']})"
        )
    if train.seq_len + model_config.num_mtp_layers > model_config.max_position_embeddings:
        raise ConfigError(
            f"seq_len {train.seq_len} exceeds the model's max_position_embeddings {model_config.max_position_embeddings}"
        )
    run_dir = Path(runs_dir) / name
    resume_from = None
    if resume is True:
        resume_from = checkpointing.latest_checkpoint(run_dir)
        if resume_from is None:
            raise TrainingError(f"--resume: {run_dir} has no checkpoint to continue from")
    elif resume:
        resume_from = Path(resume)
        if not resume_from.is_dir():
            raise TrainingError(f"--resume-from: checkpoint {resume_from} does not exist")
    elif checkpointing.list_checkpoints(run_dir) or (run_dir / "metrics.jsonl").exists():
        raise TrainingError(f"{run_dir} already holds a run: pass --resume to continue it or choose another --name")
    return PretrainRun(train, model_config, data_dir, run_dir, manifest, resume_from)


def pretrain(run: PretrainRun, sample_prompt: str | None = None, sample_tokens: int = 32) -> dict[str, Any]:
    """Train `run` to its `max_steps` (under torchrun on every rank); returns the final metrics."""
    topology = parallel.init_distributed(run.train.device)
    parallel.barrier()  # every rank has checked the run directory (resolve_run) before rank 0 writes to it
    try:
        config = run.train
        config.grad_accum_steps(topology.world_size)  # indivisible batch: fail before reading data
        tokenizer = Tokenizer.from_pretrained(run.data_dir / run.manifest["tokenizer"])

        def loader(split: str, shuffle: bool) -> PretrainLoader:
            return PretrainLoader(
                run.data_dir, config.micro_batch_size, config.seq_len, split=split, seed=config.seed,
                rank=topology.rank, world_size=topology.world_size, shuffle=shuffle,
            )

        train_batches = loader("train", shuffle=True)
        val_batches = None
        try:
            loader("val", shuffle=False)
            val_batches = functools.partial(loader, "val", shuffle=False)
        except DataError as error:
            if topology.is_main:
                print(f"no validation loss: {error}", file=sys.stderr)

        torch.manual_seed(config.seed)
        model = build_model(run.model, device=topology.device, seed=config.seed)
        trainer = Trainer(model, config, run.run_dir, topology=topology, tokenizer=tokenizer)
        if run.resume_from is not None:
            trainer.load_checkpoint(run.resume_from, train_batches)
        if topology.is_main:
            _write_run_config(run, topology, trainer)
        metrics = trainer.fit(train_batches, val_batches)

        prompt = sample_prompt if sample_prompt is not None else _default_prompt(run, tokenizer)
        eos_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
        with trainer.precision.autocast():
            generated = greedy_generate(trainer.wrapped, tokenizer.encode(prompt), sample_tokens, eos_ids)
        if topology.is_main:
            print(f"sample: {prompt!r} -> {tokenizer.decode(generated)!r}", file=sys.stderr)
            summary = {k: metrics[k] for k in ("step", "tokens", "loss", "val_lm_loss") if k in metrics}
            print(json.dumps({"run": str(run.run_dir), **summary, "checkpoint": str(trainer.last_checkpoint)}))
        return metrics
    finally:
        parallel.shutdown()


@torch.no_grad()
def greedy_generate(model: nn.Module, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> list[int]:
    """Greedy continuation without a KV cache (a smoke test of the trained model, not the engine).

    Under FSDP every rank must call it: each forward all-gathers the parameters.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids or [0]], device=device)
    generated: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids, logits_to_keep=1, use_mtp=False).logits[0, -1]
        token = int(logits.argmax())
        generated.append(token)
        if token in eos_ids:
            break
        ids = torch.cat((ids, ids.new_tensor([[token]])), dim=1)
    model.train(was_training)
    return generated


def _default_prompt(run: PretrainRun, tokenizer: Tokenizer) -> str:
    """The first 16 tokens of the validation split (or of training data): a prompt in-distribution."""
    split = "val" if run.manifest["splits"].get("val", {}).get("shards") else "train"
    first = np.load(run.data_dir / run.manifest["splits"][split]["shards"][0]["file"], mmap_mode="r")
    return tokenizer.decode([int(token) for token in first[:16]])


def _write_run_config(run: PretrainRun, topology: parallel.Topology, trainer: Trainer) -> None:
    record = {
        "train": dataclasses.asdict(run.train),
        "model": run.model.to_hf(),
        "data": str(run.data_dir),
        "world_size": topology.world_size,
        "grad_accum_steps": trainer.grad_accum_steps,
        "precision": trainer.precision.mode,
        "device": str(topology.device),
        "flops_per_token": trainer.flops_per_token,
        "resumed_from": str(run.resume_from) if run.resume_from else None,
    }
    atomic_write_text(run.run_dir / "run_config.json", json.dumps(record, indent=2) + "\n")


# ----- command line -------------------------------------------------------------------------------------
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="token shards from `nanoseek data prepare`")
    parser.add_argument("--model", default="nano", metavar="PRESET|DIR", help="model preset or config.json / checkpoint directory")
    parser.add_argument("--name", default="pretrain", help="run name: outputs go to RUNS_DIR/NAME")
    parser.add_argument("--runs-dir", default="runs", metavar="DIR")
    parser.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    parser.add_argument("--resume-from", metavar="CHECKPOINT", help="continue the run from this checkpoint directory")
    parser.add_argument("--sample-prompt", default=None, help="prompt of the greedy sample printed at the end")
    parser.add_argument("--sample-tokens", type=int, default=32)
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="training settings (e.g. max_steps=500 precision=bf16) and model settings (model.num_hidden_layers=2)",
    )


def cli_main(args: argparse.Namespace) -> int:
    run = resolve_run(args.data, args.model, args.overrides, args.name, args.runs_dir, args.resume_from or args.resume)
    pretrain(run, args.sample_prompt, args.sample_tokens)
    return 0
