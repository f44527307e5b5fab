"""Numerics of a training run: fp32, bf16 autocast, fp16 with dynamic loss scaling, fine-grained FP8.

    mode   master weights, grads, Adam state   matmuls                                      loss scaling
    fp32   fp32                                fp32                                         -
    bf16   fp32                                bf16 (autocast)                              -
    fp16   fp32                                fp16 (autocast)                              dynamic
    fp8    fp32                                E4M3 for every Linear and routed expert,     -
                                               bf16 autocast for the rest (V3 report §3.3)

In fp8 mode the embedding, the output head, the router, MTP's eh_proj, the norms and the attention
core stay in bf16/fp32, as DeepSeek-V3 does; `nanoseek.fp8` implements the 1x128 / 128x128 scaled
GEMMs. (V3 also keeps AdamW moments in bf16; we keep them fp32.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from nanoseek.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp8")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
FP8_HIGH_PRECISION_LINEARS = ("lm_head", "eh_proj")  # the router is not an nn.Linear, norms are not Linears


def resolve_precision(mode: str, device: torch.device) -> str:
    """`auto` is bf16 on a GPU that supports it and fp32 elsewhere; other modes pass through."""
    if mode not in PRECISIONS:
        raise ConfigError(f"precision {mode!r} is not one of {', '.join(PRECISIONS)}")
    if mode != "auto":
        return mode
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


class LossScaler:
    """Dynamic loss scaling for fp16 (the algorithm of `torch.amp.GradScaler`, on any device).

    The loss is multiplied by `scale` so that small gradients do not flush to zero in fp16; the
    gradients are divided back before clipping. A step whose gradients overflowed is skipped and the
    scale halved; after `growth_interval` clean steps in a row the scale doubles. Disabled, every
    method is the identity. Overflow is detected by the caller from the (global) gradient norm, which
    clipping computes anyway, so sharded gradients need no extra collective.
    """

    def __init__(
        self,
        enabled: bool,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.clean_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, parameters: Iterable[nn.Parameter]) -> None:
        if self.enabled:
            grads = [p.grad for p in parameters if p.grad is not None]
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, finite: bool) -> None:
        """Record whether this step's gradients were finite and adapt the scale."""
        if not self.enabled:
            return
        if finite:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.clean_steps = 0
        else:
            self.scale *= self.backoff_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])


class Precision:
    """One precision mode on one device: the autocast context, the loss scaler and the FP8 conversion."""

    def __init__(self, mode: str, device: torch.device):
        self.mode = resolve_precision(mode, device)
        self.device = device
        self.autocast_dtype = AUTOCAST_DTYPES.get(self.mode)
        self.scaler = LossScaler(enabled=self.mode == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager:
        """Wrap forward passes (and losses) in this; backward runs outside."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def prepare(self, model: nn.Module) -> list[str]:
        """Before wrapping for data parallelism: in fp8 mode route Linear layers and routed experts
        through the FP8 GEMMs (same Parameters, so checkpoints and optimizer state are unchanged).
        Returns the names of the modules converted."""
        if self.mode != "fp8":
            return []
        from nanoseek.fp8 import convert_to_fp8_training, fp8_linear
        from nanoseek.model.moe import RoutedExperts

        def keep_high_precision(name: str, module: nn.Module) -> bool:
            return name.split(".")[-1] in FP8_HIGH_PRECISION_LINEARS

        converted = convert_to_fp8_training(model, skip=keep_high_precision)
        for name, module in model.named_modules():
            if isinstance(module, RoutedExperts):
                module.linear = fp8_linear
                converted.append(name)
        return converted
