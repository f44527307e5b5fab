"""`nanoseek chat`: a multi-turn conversation in the terminal with the model's chat template.

    nanoseek chat --model runs/grpo --temperature 0.6 --top-p 0.95

Reasoning (between `<think>` and `</think>`) is shown dimmed and kept apart from the answer; the
template drops it from earlier turns, as DeepSeek-R1's does. `/clear` starts a new conversation,
`/exit` (or Ctrl-D) leaves; Ctrl-C stops the reply being generated.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from nanoseek.infer.generate import add_model_arguments, add_sampling_arguments, load_engine, sampling_params

THINK_START, THINK_END = "<think>", "</think>"


class ReasoningSplitter:
    """Split streamed text into ("reasoning" | "answer", text) pieces, dropping the think tags.

    Tags may arrive split across deltas: a tail that could be the start of a tag is held back until
    the next delta decides. `thinking=True` starts inside the reasoning (the generation prompt
    already opened `<think>`).
    """

    def __init__(self, thinking: bool = False):
        self.in_reasoning = thinking
        self.pending = ""

    def feed(self, text: str) -> Iterator[tuple[str, str]]:
        self.pending += text
        while True:
            tag = THINK_END if self.in_reasoning else THINK_START
            position = self.pending.find(tag)
            if position < 0:
                break
            yield from self._emit(self.pending[:position])
            self.pending = self.pending[position + len(tag) :]
            self.in_reasoning = not self.in_reasoning
            if not self.in_reasoning:
                self.pending = self.pending.lstrip("\n")  # the answer starts after "</think>\n"
        keep = next((k for k in range(len(tag) - 1, 0, -1) if self.pending.endswith(tag[:k])), 0)
        yield from self._emit(self.pending[: len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep :]

    def flush(self) -> Iterator[tuple[str, str]]:
        yield from self._emit(self.pending)
        self.pending = ""

    def _emit(self, text: str) -> Iterator[tuple[str, str]]:
        if text:
            yield ("reasoning" if self.in_reasoning else "answer"), text


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--thinking", action="store_true", help="open the reply with <think> (R1's template option)")
    add_sampling_arguments(parser, temperature=0.6)


def cli_main(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    engine = load_engine(args)
    params = sampling_params(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    console.print("[dim]nanoseek chat: /clear starts over, /exit leaves[/dim]")
    while True:
        try:
            line = console.input("[bold green]you> [/bold green]")
        except EOFError:
            console.print()
            return 0
        command = line.strip()
        if command == "/exit":
            return 0
        if command == "/clear":
            messages = list(system)
            console.print("[dim](new conversation)[/dim]")
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      thinking=args.thinking)
        reply = THINK_START + "\n" if args.thinking else ""
        splitter = ReasoningSplitter(thinking=args.thinking)
        console.print("[bold blue]assistant>[/bold blue] ", end="")
        shown = Shown(console)
        stream = engine.stream(prompt, params)
        try:
            for event in stream:
                reply += event.text
                shown.print(splitter.feed(event.text))
        except KeyboardInterrupt:
            stream.close()  # cancels the request and frees its cache
            console.print("[dim] (stopped)[/dim]", end="")
        shown.print(splitter.flush())
        console.print()
        messages.append({"role": "assistant", "content": reply})


class Shown:
    """Prints reasoning dimmed and the answer plainly, on a new line once the reasoning ends."""

    def __init__(self, console):
        self.console = console
        self.last_kind: str | None = None

    def print(self, pieces) -> None:
        for kind, text in pieces:
            if self.last_kind == "reasoning" and kind == "answer":
                self.console.print()
            self.console.print(text, end="", style="dim" if kind == "reasoning" else None, markup=False)
            self.last_kind = kind
