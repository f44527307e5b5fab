"""`nanoseek <command>`: one subcommand per pipeline stage.

Each command lives in the module of its stage, which defines `add_cli_arguments(parser)` and
`cli_main(args) -> int`. Only the chosen command's module is imported, so `nanoseek --help` is fast.
User errors (`NanoseekError`) print one line and exit with status 2; nothing prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nanoseek.allocator import keep_freed_memory
from nanoseek.errors import NanoseekError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("nanoseek.model.accounting", "parameters (total / activated), KV-cache bytes and layer layout"),
    "tokenizer": ("nanoseek.tokenizer", "train a byte-level BPE tokenizer with the DeepSeek-R1 chat template"),
    "data": ("nanoseek.data.corpus", "clean, deduplicate and tokenize text (or generated tasks) into token shards"),
    "pretrain": ("nanoseek.train.pretrain", "pretrain a model on token shards (bf16/fp16/FP8, MoE balancing, MTP, torchrun)"),
    "serve": ("nanoseek.serve.app", "OpenAI-compatible HTTP (and gRPC) server with a model manager and a chat page"),
    "sft": ("nanoseek.train.sft", "supervised fine-tuning on chats or worked task solutions (loss on assistant tokens)"),
    "grpo": ("nanoseek.train.grpo", "GRPO with rule-based rewards, rollouts through the inference engine"),
    "eval": ("nanoseek.eval.evaluate", "held-out task accuracy, pass@k, maj@k, format rate; perplexity on shards"),
    "rejection-sample": ("nanoseek.train.rejection", "sample k answers per prompt, keep the verified ones as an SFT dataset"),
    "distill": ("nanoseek.train.distill", "distill a teacher into a student: token-level KL/JSD (GKD) or SFT on verified teacher samples"),
    "generate": ("nanoseek.infer.generate", "generate text from a prompt, streamed to the terminal"),
    "chat": ("nanoseek.infer.chat", "multi-turn chat in the terminal (reasoning shown dimmed), /clear and /exit"),
    "quantize": ("nanoseek.infer.quant", "weight-only int8 (per channel) or FP8 (DeepSeek blocks) checkpoint + perplexity check"),
    "pipeline": ("nanoseek.train.pipeline", "run the multi-stage R1 recipe from one config file: resumable, stage by stage"),
    "speedrun": ("nanoseek.speedrun", "the whole R1 pipeline at micro scale on built-in tasks, ending in a report card"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanoseek", description="The DeepSeek LLM stack in one codebase.")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_cli_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    keep_freed_memory()
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.cli_main(args) or 0)
    except NanoseekError as error:
        print(f"nanoseek {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nanoseek {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
