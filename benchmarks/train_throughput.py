"""Training throughput of a full optimizer step: forward, backward, gradient clipping, AdamW step.

Rows (one JSON line each, medians over `--steps` steps after 2 warmup steps):
  train_nano_<precision>   our `Trainer.train_step` on the nano preset as pretraining runs it (MTP and
                           the balance loss on, router-bias update, metrics reduction): tokens/s and
                           MFU (on CPU relative to a measured fp32 matmul peak, see trainer.peak_flops).
  train_small_<precision>  ours vs transformers `DeepseekV3ForCausalLM` on preset `small`
                           (../shared/bench/small.json), batch 4 x 256, the same weights. Both sides:
                           next-token loss, backward, clip 1.0, AdamW (0.9, 0.95, wd 0.1). MTP off for
                           ours, since transformers' model has none. Steps alternate between the two
                           models, so load changes on a shared machine hit both alike.
precision: fp32 and bf16 (autocast, fp32 master weights) on both sides.

    python benchmarks/train_throughput.py [--precision fp32|bf16|all] [--steps 5] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch
import transformers

from nanoseek.config import ModelConfig
from nanoseek.model import build_model
from nanoseek.train.trainer import TrainConfig, Trainer, training_flops_per_token


class RepeatBatch:
    """The same batch forever (data loading is not what is measured)."""

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def random_batch(vocab_size: int, batch: int, seq_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}


def our_trainer(config: ModelConfig, precision: str, batch: int, seq_len: int, device: torch.device) -> Trainer:
    train_config = TrainConfig(
        global_batch_size=batch, micro_batch_size=batch, seq_len=seq_len, max_steps=1000, warmup_steps=0,
        lr_schedule="constant", lr=1e-4, precision=precision, device=str(device),
    )
    return Trainer(build_model(config, device=device, seed=0), train_config, "unused")


def median_seconds(steps: dict[str, callable], count: int, warmup: int = 2) -> dict[str, float]:
    """Run the step functions in turn `warmup + count` times; the median duration of each."""
    durations: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + count):
        for name, step in steps.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if index >= warmup:
                durations[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in durations.items()}


def row(bench: str, ours: float, baseline: float | None, config: str, **extra) -> None:
    print(json.dumps({
        "bench": bench, "ours": round(ours, 1), "baseline": None if baseline is None else round(baseline, 1),
        "ratio": None if baseline is None else round(ours / baseline, 3), "unit": "tokens/s (full training step)",
        "config": config, "threads": torch.get_num_threads(), **extra,
    }), flush=True)


def bench_nano(precision: str, steps: int, batch: int, seq_len: int, device: torch.device) -> None:
    config = ModelConfig.from_preset("nano")
    trainer = our_trainer(config, precision, batch, seq_len, device)
    batches = RepeatBatch(random_batch(config.vocab_size, batch, seq_len, device))
    seconds = median_seconds({"ours": lambda: trainer.train_step(batches)}, steps)["ours"]
    tokens_per_second = batch * seq_len / seconds
    mfu = tokens_per_second * trainer.flops_per_token / trainer.peak_flops
    row(f"train_nano_{precision}", tokens_per_second, None, f"nano (MTP + balance loss), batch {batch}x{seq_len}, {precision}",
        mfu=round(mfu, 4), peak_tflops=round(trainer.peak_flops / 1e12, 3), device=device.type)


def bench_small(precision: str, steps: int, batch: int, seq_len: int, device: torch.device, profile: bool) -> None:
    config = ModelConfig.from_preset("small", num_nextn_predict_layers=0)
    trainer = our_trainer(config, precision, batch, seq_len, device)
    with tempfile.TemporaryDirectory() as directory:
        trainer.model.save_pretrained(directory)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(device).train()
    optimizer = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    data = random_batch(config.vocab_size, batch, seq_len, device)
    batches = RepeatBatch(data)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def their_step() -> None:
        with autocast:
            logits = theirs(data["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), data["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    seconds = median_seconds({"ours": lambda: trainer.train_step(batches), "theirs": their_step}, steps)
    tokens = batch * seq_len
    flops = training_flops_per_token(config, seq_len)
    row(f"train_small_{precision}", tokens / seconds["ours"], tokens / seconds["theirs"],
        f"small (no MTP), batch {batch}x{seq_len}, {precision}, AdamW",
        mfu=round(tokens / seconds["ours"] * flops / trainer.peak_flops, 4), device=device.type,
        transformers=transformers.__version__)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for name, step in (("ours", lambda: trainer.train_step(batches)), ("transformers", their_step)):
            with torch_profile(activities=activities) as prof:
                step()
            print(f"--- {name} {precision}", flush=True)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["fp32", "bf16", "all"], default="all")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--only", choices=["nano", "small", "all"], default="all")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table per small row")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = ["fp32", "bf16"] if args.precision == "all" else [args.precision]
    for precision in precisions:
        if args.only in ("nano", "all"):
            bench_nano(precision, args.steps, args.batch, args.seq, device)
        if args.only in ("small", "all"):
            bench_small(precision, args.steps, args.batch, args.seq, device, args.profile)


if __name__ == "__main__":
    main()
