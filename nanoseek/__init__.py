"""nanoseek: the DeepSeek LLM stack (V3 model, R1 post-training, inference, serving) in PyTorch."""

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError

__version__ = "0.1.0"

__all__ = ["ModelConfig", "NanoseekError", "__version__"]
