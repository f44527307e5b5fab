"""Loss curves of FP8 training (DeepSeek-V3 recipe) against bf16 on the nano model.

Both runs start from the same weights and read the same batches of generated task text (a BPE
tokenizer and token shards are built in a temporary directory). FP8 runs every Linear and routed
expert GEMM in E4M3 with 1x128 activation / 128x128 weight scales; embedding, head, router, eh_proj
and norms stay bf16/fp32. Prints a JSON line every `--every` steps and a final summary line
`{"bench": "fp8_vs_bf16_loss", "ours": fp8, "baseline": bf16, "ratio", "relative_difference", ...}`
comparing the mean loss of the last 20 steps (V3 reports < 0.25% relative error at scale).

    python benchmarks/train_fp8_vs_bf16.py [--steps 300] [--every 25]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.data.corpus import prepare_corpus
from nanoseek.data.loader import PretrainLoader
from nanoseek.data.tasks import task_documents
from nanoseek.model import build_model
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.trainer import TrainConfig, Trainer


def loss_curve(precision: str, data_dir: Path, vocab_size: int, steps: int, batch: int, seq_len: int) -> list[float]:
    config = TrainConfig(
        global_batch_size=batch, micro_batch_size=batch, seq_len=seq_len, max_steps=steps, lr=3e-3,
        warmup_steps=steps // 10, precision=precision, peak_tflops=1.0,
    )
    model = build_model(ModelConfig.from_preset("nano", vocab_size=vocab_size), seed=0)
    trainer = Trainer(model, config, data_dir / "unused")
    batches = PretrainLoader(data_dir, batch, seq_len, seed=0)
    return [trainer.train_step(batches)["lm_loss"] for _ in range(steps)]


def compare(steps: int = 300, batch: int = 8, seq_len: int = 128, every: int = 25) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        data_dir = Path(directory) / "shards"
        documents = task_documents(4000, seed=0)
        tokenizer = Tokenizer.train(documents[:1000], vocab_size=1024)
        prepare_corpus([], tokenizer, data_dir, from_tasks=4000, val_fraction=0.0)
        curves = {p: loss_curve(p, data_dir, tokenizer.vocab_size, steps, batch, seq_len) for p in ("bf16", "fp8")}
    for step in range(every - 1, steps, every):
        bf16, fp8 = curves["bf16"][step], curves["fp8"][step]
        print(json.dumps({"step": step + 1, "bf16": round(bf16, 4), "fp8": round(fp8, 4), "relative": round(fp8 / bf16 - 1, 5)}))
    window = min(20, steps)
    bf16, fp8 = (sum(curves[p][-window:]) / window for p in ("bf16", "fp8"))
    summary = {
        "bench": "fp8_vs_bf16_loss", "ours": round(fp8, 5), "baseline": round(bf16, 5), "ratio": round(fp8 / bf16, 5),
        "relative_difference": round(abs(fp8 / bf16 - 1), 5), "unit": f"mean lm loss of the last {window} steps",
        "config": f"nano, {steps} steps, batch {batch} x {seq_len}, lr 3e-3 cosine", "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    args = parser.parse_args()
    compare(args.steps, every=args.every)


if __name__ == "__main__":
    main()
