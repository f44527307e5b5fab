"""`nanoseek generate`: stream a completion of one prompt to the terminal.

    nanoseek generate --model runs/sft --prompt "12 + 30 =" --max-tokens 64
    nanoseek generate --model runs/sft --chat --prompt "What is 12 + 30?" --temperature 0.6 --top-p 0.95
    nanoseek generate --model runs/base --prompt "" --speculative --stats     # empty prompt: start from BOS

The generated text goes to stdout as it is produced; the statistics line (tokens, tokens/s, MTP
acceptance) goes to stderr. The model and engine options are shared with `nanoseek chat`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nanoseek.errors import GenerationError
from nanoseek.infer.beam import BeamSearchParams
from nanoseek.infer.engine import Engine
from nanoseek.infer.quant import SCHEMES, load_model, quantize_model
from nanoseek.infer.sampling import SamplingParams


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options that load a model into an engine (shared by `generate` and `chat`)."""
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (float, FP8 or int8)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="weights and activations (default: the checkpoint's)")
    parser.add_argument("--quantize", choices=SCHEMES, help="quantize the weights in memory after loading")
    parser.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding (if the model has MTP)")
    parser.add_argument("--num-speculative-tokens", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float) -> None:
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens at most (default: up to the context)")
    parser.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--presence-penalty", type=float, default=0.0)
    parser.add_argument("--frequency-penalty", type=float, default=0.0)
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=args.stop, seed=args.seed,
    )


def load_engine(args: argparse.Namespace) -> Engine:
    """The model and tokenizer of `--model` in an engine configured by the command line."""
    from nanoseek.tokenizer import Tokenizer

    if not (Path(args.model) / "tokenizer.json").is_file():
        raise GenerationError(f"{args.model} has no tokenizer.json; save the tokenizer next to the weights")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, dtype=args.dtype, device=device)
    if args.quantize:
        quantize_model(model, args.quantize)
    return Engine(model, Tokenizer.from_pretrained(args.model), max_model_len=args.max_model_len,
                  speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text ('' starts from BOS)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    add_sampling_arguments(parser, temperature=0.0)
    parser.add_argument("--beams", type=int, default=0, help="beam search with this many beams (prints the best)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam search length normalization exponent")
    parser.add_argument("--stats", action="store_true", help="print a JSON statistics line to stderr")


def cli_main(args: argparse.Namespace) -> int:
    engine = load_engine(args)
    prompt: str | list[int] = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    started = time.perf_counter()
    if args.beams:
        params = BeamSearchParams(num_beams=args.beams, max_tokens=args.max_tokens, length_penalty=args.length_penalty)
        best = engine.beam_search(prompt, params).outputs[0]
        sys.stdout.write(best.text + "\n")
        tokens, finish = len(best.token_ids), best.finish_reason
    else:
        tokens, finish = 0, None
        for event in engine.stream(prompt, sampling_params(args)):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            tokens += len(event.token_ids)
            finish = event.finish_reason or finish
        sys.stdout.write("\n")
    seconds = time.perf_counter() - started
    if args.stats:
        stats = engine.stats
        report = {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 2),
                  "finish_reason": finish}
        if engine.speculative:
            report.update(acceptance_rate=round(stats.acceptance_rate, 4),
                          mean_accepted_length=round(stats.mean_accepted_length, 3))
        print(json.dumps(report), file=sys.stderr)
    return 0
