"""Live servers for the serving tests: tiny checkpoints on disk, uvicorn in a thread on a free loopback port.

Two models share the test tokenizer (`data_fixtures.small_tokenizer`):
* `tiny`: a random DeepSeek-V3-shaped model (MLA, MoE, MTP) for sampling, batching and load;
* `script`: a dense model whose weights make it a bigram table: after the generation prompt it
  always writes SCRIPT (`<think>` reasoning `</think>` answer) and then EOS, so tests know the exact
  output, its split into reasoning and content, and its token count.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import uvicorn
from data_fixtures import small_tokenizer
from model_configs import tiny_config

from nanoseek.model import build_model
from nanoseek.serve.app import ServerConfig, create_app
from nanoseek.serve.registry import EngineSettings

REASONING, ANSWER = "First, count the numbers", "The total is 9."
SCRIPT = f"<think>{REASONING}</think>{ANSWER}"
CONTEXT = 4096


def save_tiny(directory: Path, seed: int = 0) -> Path:
    tokenizer = small_tokenizer()
    model = build_model(tiny_config("v3", vocab_size=tokenizer.vocab_size, max_position_embeddings=CONTEXT), seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def script_ids() -> list[int]:
    ids = small_tokenizer().encode(SCRIPT)
    assert len(set(ids)) == len(ids), "every script token must be distinct for a bigram model"
    return ids


def save_script(directory: Path) -> Path:
    """The bigram model: from `<｜Assistant｜>` (or the `\\n` of a prefilled `<think>\\n`) it writes SCRIPT, then EOS."""
    tokenizer = small_tokenizer()
    ids = script_ids()
    config = tiny_config("qwen2", vocab_size=tokenizer.vocab_size, num_hidden_layers=1,
                         max_position_embeddings=CONTEXT, tie_word_embeddings=False)
    model = build_model(config, seed=0)
    hidden = config.hidden_size
    newline = tokenizer.encode("\n")[0]
    chain = [tokenizer.token_to_id("<｜Assistant｜>"), *ids, tokenizer.eos_id]
    transitions = list(zip(chain, chain[1:], strict=False)) + [(newline, ids[1])]  # prefilled "<think>\n"
    with torch.no_grad():
        for layer in model.model.layers:  # no residual updates: the last hidden state is the token's embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.mul_(0.01)
        model.lm_head.weight.zero_()
        for slot, (token, following) in enumerate(transitions):
            assert slot < hidden
            model.model.embed_tokens.weight[token] = 0
            model.model.embed_tokens.weight[token, slot] = 10.0
            model.lm_head.weight[following, slot] = 5.0
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@functools.cache
def model_root() -> Path:
    """One directory of test checkpoints per session: tiny, tiny-b (another seed), script."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="nanoseek-serve-"))
    save_tiny(root / "tiny")
    save_tiny(root / "tiny-b", seed=1)
    save_script(root / "script")
    return root


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """A running server: `url` (http://127.0.0.1:PORT), `app`, `state`."""

    def __init__(self, config: ServerConfig):
        self.app = create_app(config)
        self.state = self.app.state.server
        self.socket = free_socket()
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        uvicorn_config = uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(uvicorn_config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self, timeout: float = 60) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()


def server_config(**changes) -> ServerConfig:
    root = model_root()
    config = ServerConfig(
        models=[("tiny", str(root / "tiny")), ("script", str(root / "script"))],
        model_roots=[str(root)],
        thinking=[],
        engine=EngineSettings(max_model_len=CONTEXT, max_num_seqs=8, max_queued_requests=32),
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@contextlib.contextmanager
def live_server(**changes) -> Iterator[LiveServer]:
    server = LiveServer(server_config(**changes)).start()
    try:
        yield server
    finally:
        server.stop()
