"""nanoseek: the DeepSeek LLM stack (V3 model, R1 post-training, inference, serving) in PyTorch.

The public API is importable from here; heavy pieces (torch models, the engine) load on first use,
so `nanoseek --help` and config handling stay fast.
"""

from importlib import import_module
from typing import Any

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError

__version__ = "0.1.0"

_LAZY = {
    "build_model": "nanoseek.model.transformer",
    "CausalLM": "nanoseek.model.transformer",
    "load_pretrained": "nanoseek.checkpoint",
    "save_pretrained": "nanoseek.checkpoint",
    "Tokenizer": "nanoseek.tokenizer",
    "Engine": "nanoseek.infer.engine",
    "SamplingParams": "nanoseek.infer.sampling",
}

__all__ = ["ModelConfig", "NanoseekError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
