"""Seconds per GRPO rollout: our `Engine.generate` against transformers' `generate` on the same batch.

The generation half of `benchmarks/grpo_step.py`, measured alone: the same random-weight `qwen2-nano`
model and tokenizer, the same arithmetic chat prompts, G completions of each of `--prompts` prompts,
at most `--completion-length` new tokens at temperature 1 (no top-k/top-p), in one process with the
same thread count. Ours decodes as GRPO's rollouts do: inside `packed_while(model)` (the policy's
weights packed for the rollout, the packing timed with it, and put back after) with the sampled
tokens' log-probabilities; transformers gets
the G copies of each prompt left-padded in one batch, as TRL hands them to `generate`. The sides
alternate for `--rounds` runs each; each figure is the median. Prints one JSON line.

    python benchmarks/rollout.py [--prompts 8] [--generations 8] [--completion-length 64] [--rounds 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from grpo_step import benchmark_rows, make_model_directory

from nanoseek.infer.engine import Engine
from nanoseek.infer.packing import packed_while
from nanoseek.infer.sampling import SamplingParams
from nanoseek.train.grpo import encode_prompts
from nanoseek.train.sft import load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where both sides run")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary) / "model"
        make_model_directory(directory)
        model, tokenizer = load_policy(directory, directory, device)
        model.eval()
        engine = Engine(model, tokenizer, max_model_len=256 + args.completion_length,
                        max_num_seqs=args.prompts * args.generations, pack_weights=False)
        theirs = AutoModelForCausalLM.from_pretrained(directory).eval().to(device)
        hf_tokenizer = AutoTokenizer.from_pretrained(directory)
        hf_tokenizer.padding_side = "left"

    rows = benchmark_rows(args.prompts * (args.rounds + 1))
    prompt_ids = encode_prompts(tokenizer, rows, 256)
    counts = {"ours": [], "baseline": []}

    def batch(round_: int) -> range:
        return range(round_ * args.prompts, (round_ + 1) * args.prompts)

    def run_ours(round_: int) -> int:
        params = [SamplingParams(temperature=1.0, max_tokens=args.completion_length, logprobs=0,
                                 logprobs_mode="processed", seed=i) for i in batch(round_)]
        with torch.no_grad(), packed_while(engine.model):
            outputs = engine.generate([prompt_ids[i] for i in batch(round_)], params, n=args.generations)
        return sum(len(c.token_ids) for output in outputs for c in output.outputs)

    def run_theirs(round_: int) -> int:
        texts = [hf_tokenizer.apply_chat_template(rows[i]["prompt"], add_generation_prompt=True, tokenize=False)
                 for i in batch(round_) for _ in range(args.generations)]
        encoded = hf_tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = theirs.generate(**encoded, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=args.completion_length, pad_token_id=hf_tokenizer.pad_token_id)
        new = out[:, encoded["input_ids"].shape[1]:]
        finished = (new == hf_tokenizer.eos_token_id).cumsum(dim=1) > 0
        return int((~finished).sum() + finished.any(dim=1).sum())  # tokens up to and including EOS

    run_ours(0), run_theirs(0)  # warm-up
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for round_ in range(1, args.rounds + 1):  # alternate: the load of a shared machine drifts
        for side, run in (("ours", run_ours), ("baseline", run_theirs)):
            start = time.perf_counter()
            counts[side].append(run(round_))  # both sides: the same prompts (each ends on the host: synchronized)
            times[side].append(time.perf_counter() - start)
    ours, baseline = statistics.median(times["ours"]), statistics.median(times["baseline"])
    print(json.dumps({
        "bench": "grpo_rollout", "ours": round(ours, 4), "baseline": round(baseline, 4), "ratio": round(baseline / ours, 2),
        "unit": "s/rollout (median)", "baseline_name": f"transformers {transformers.__version__} generate",
        "mean_tokens": {"ours": statistics.mean(counts["ours"]), "baseline": statistics.mean(counts["baseline"])},
        "config": {"model": "qwen2-nano", "prompts": args.prompts, "num_generations": args.generations,
                   "max_completion_length": args.completion_length, "rounds": args.rounds},
        "threads": args.threads, "torch": torch.__version__, "device": args.device,
    }))


if __name__ == "__main__":
    main()
