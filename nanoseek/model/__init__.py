"""Model code: single-device modules that read like the DeepSeek-V3 report."""

from nanoseek.model.transformer import IGNORE_INDEX, CausalLM, ModelOutput, build_model

__all__ = ["IGNORE_INDEX", "CausalLM", "ModelOutput", "build_model"]
