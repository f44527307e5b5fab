"""Building blocks shared by every model family: linear layers, RMSNorm, SwiGLU, rotary embeddings (with YaRN)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig, yarn_mscale
from nanoseek.model import cpu_ops
from nanoseek.model.kernels import onednn_fits, onednn_linear, onednn_product, repeated_shape

FEW_ROWS = 4  # up to this many rows `linear` multiplies weight @ x^T on CPU...
# ...and from this many (`few_row_products`): for a model whose weights stay in cache, F.linear's single
# call wins at every row count, for one a little larger at one row (nanoseek.infer.packing.few_row_start).
_few_row_start = contextvars.ContextVar("few_row_start", default=1)
FEW_ROWS_NEVER = 1 << 62
# fp32 weights packed in panels (`nanoseek.infer.packing.pack_panels`) serve steps of up to this many rows;
# more rows (prefill) take oneDNN's GEMM on the plain weight. Measured with 2 threads, weights cold,
# panels against oneDNN on the plain weight: 2816 x 512 at 128 / 256 rows 0.80 / 1.50 ms against 1.01 /
# 1.70; at 1,024 rows 5.99 against 6.30 (the panels still even with oneDNN's own packed layout there).
# Past 256 rows the panels are not relied on: a panel of a wide matrix (8,960 inputs: 1.1 MB) no longer
# stays in L2 while every 8-row block passes over it.
PANEL_MAX_ROWS = 256


@contextlib.contextmanager
def few_row_products(start: int) -> Iterator[None]:
    """Let `linear` use its transposed product from `start` rows on (1: the default; FEW_ROWS_NEVER:
    never) in this block."""
    token = _few_row_start.set(start)
    try:
        yield
    finally:
        _few_row_start.reset(token)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), faster on CPU in fp32: oneDNN's GEMM for products large enough
    (forward and backward, `nanoseek.model.kernels.onednn_linear`), and for the 1 to FEW_ROWS rows of a
    decode step at inference `cpu_ops.rows_linear`, which streams the [out, in] weight once in register
    blocks (2 threads, weights read from memory: the 32000 x 512 head at 1 / 2 rows 1.01 / 1.38 ms,
    against 1.46 / 1.54 for the transposed product below and 4.2 / 8.5 for F.linear; 2-5x F.linear on
    matrices that stay in cache).

    Without the fused kernels the few rows take a transposed product: x @ weight^T with one row sends
    the CPU BLAS down its matrix-vector path, which runs on one thread and reads the weight with per-row
    dot products; with a few rows, MKL's GEMM parallelizes poorly over them. The same product computed
    as (weight @ x^T)^T splits the weight's rows across threads and streams it (one row is doubled to
    two to get that kernel): with 2 threads 1.7-4.6x faster than F.linear for 1 to 4 rows, with one
    1.1-3x. From 5 rows oneDNN's GEMM on the plain weight is faster still (stop 22): unpacked
    `qwen2-small` decoding, 8 / 16 / 64 requests, 1.15x / 1.46x / 1.62x; `small` 0.96x / 1.18x / 1.22x.
    The engine packs fp32 weights in panels (`nanoseek.infer.packing`), so this serves engines that
    share a trainer's model, training, and models the engine does not pack.
    """
    if x.device.type != "cpu" or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    macs = rows * weight.shape[0] * weight.shape[1]
    if torch.is_grad_enabled():
        if onednn_fits(macs, x, weight, bias) and repeated_shape((rows, *weight.shape)):
            return onednn_linear(x, weight, bias)
        return F.linear(x, weight, bias)
    start, end = few_row_range()
    if 1 <= rows <= end and weight.is_contiguous() and (kernels := cpu_ops.for_inference(x)) is not None:
        return kernels.rows_linear(x, weight, bias)
    if start <= rows <= end and weight.is_contiguous():
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:
            flat = torch.cat([flat, flat])
        columns = torch.mm(weight, flat.t()) if bias is None else torch.addmm(bias.unsqueeze(1), weight, flat.t())
        out = columns[:, :1] if rows == 1 else columns
        return out.t().contiguous().view(*x.shape[:-1], weight.shape[0])
    if onednn_fits(macs, x, weight, bias):
        return onednn_product(x.reshape(rows, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def few_row_range() -> tuple[int, int]:
    """(fewest, most) rows for which `linear` takes its transposed product here and now."""
    return _few_row_start.get(), FEW_ROWS


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, init and state-dict keys) computed by `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def is_plain_linear(module: nn.Module) -> bool:
    """An unquantized, unpacked linear layer (ours or torch's), the kind fusion, packing and FP8 replace."""
    return type(module) in (nn.Linear, Linear)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as DeepSeek and HF do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # few ops: decode runs 30+ norms a token
        if x.dtype == self.weight.dtype and (kernels := cpu_ops.for_inference(x)) is not None:
            return kernels.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if (torch.is_grad_enabled() and x.is_contiguous() and type(x) is torch.Tensor
                    and type(self.weight) is nn.Parameter and not torch.compiler.is_compiling()
                    and (kernels := cpu_ops.for_cpu(x)) is not None):
                # the backward in one C++ pass per row (`cpu_ops.rms_norm_backward`): `qwen2-nano` at GRPO's
                # 64 x 74 tokens, forward + backward 1.21 -> 0.53 ms a norm, one thread
                return _RMSNormFunction.apply(x, self.weight, self.eps, kernels)
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, kernels):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.kernels = eps, kernels
        return kernels.rms_norm(x, weight, eps)  # the inference kernel: one pass, 9x F.rms_norm's decomposed ops

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight = ctx.kernels.rms_norm_backward(x, weight, grad, ctx.eps)
        return grad_x, grad_weight, None, None


class FusedProjection:
    """Linear layers that read the same input, run as one matmul when no gradient is needed.

    `FusedProjection.fuse(linears)` moves their weights (and biases) into one buffer and makes each
    parameter a view of its rows, so the parameters keep their names, shapes and values, in-place
    updates (optimizer steps, `load_state_dict`) reach the buffer, and autograd still sees separate
    parameters. Decoding a few rows is dominated by per-call overhead: q/k/v as one call instead of
    three. If a parameter is replaced (`.data = ...`, `.to(...)`), `usable` turns False and the
    layers run one by one again.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int], linears: list[nn.Module],
                 names: tuple[str, ...] = ("weight", "bias")):
        self.weight, self.bias, self.sizes = weight, bias, sizes
        # (parameter or buffer dict, name) of every tensor named in `names` (quantized layers add their
        # scales): `usable` runs on every call and a dict lookup costs a fifth of nn.Module's attribute
        # lookup; it still sees tensors replaced wholesale (`load_state_dict(assign=True)`).
        self.parameter_slots = [
            (layer._parameters if name in layer._parameters else layer._buffers, name)
            for layer in linears for name in names if getattr(layer, name) is not None
        ]
        self.pointers = self._pointers()
        self.linear = linear  # called as linear(x, weight, bias); packing and int8 fusion swap in their kernels
        # ...and say which, for the fused decode layer (`nanoseek.model.decode_layer.product_of`): "linear",
        # "packed" or "int8" (with its row scales; "int8-unpacked" where the packed int8 kernel cannot run)
        self.kind, self.scale = "linear", None
        self.plain = None  # the plain buffer of one packed in panels (`nanoseek.infer.packing.panel_product`)

    @classmethod
    @torch.no_grad()
    def fuse(cls, linears: list[nn.Linear]) -> FusedProjection:
        sizes = [linear.out_features for linear in linears]
        weight, bias = (concatenate_rows(linears, name, sizes) for name in ("weight", "bias"))
        return cls(weight, bias, sizes, linears)

    def _pointers(self) -> list[int]:
        return [parameters[name].data_ptr() for parameters, name in self.parameter_slots]

    @property
    def usable(self) -> bool:
        """No gradient wanted and every parameter still a view of the buffer."""
        return not torch.is_grad_enabled() and self._pointers() == self.pointers

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layers' outputs side by side [..., sum(sizes)] (split by the caller)."""
        if self.plain is not None:
            return self.linear(x, self.weight, self.bias, self.plain)
        return self.linear(x, self.weight, self.bias)


@torch.no_grad()
def concatenate_rows(layers: list[nn.Module], name: str, sizes: list[int]) -> torch.Tensor | None:
    """Move tensor `name` of every layer (`sizes` rows each) into one buffer, row-wise, and make each
    layer's tensor a view of its rows (same object, new storage); None if the layers have none."""
    if getattr(layers[0], name) is None:
        return None
    buffer = torch.cat([getattr(layer, name) for layer in layers])
    for layer, rows in zip(layers, buffer.split(sizes), strict=True):
        getattr(layer, name).data = rows
    return buffer


def fusable(linears: list[nn.Linear]) -> bool:
    """Plain float linears of one input size on one device and dtype, all with or all without bias."""
    first = linears[0]
    return all(
        is_plain_linear(linear) and linear.in_features == first.in_features
        and linear.weight.dtype == first.weight.dtype and linear.weight.dtype.is_floating_point
        and linear.weight.device == first.weight.device and (linear.bias is None) == (first.bias is None)
        for linear in linears
    )


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] on the last dimension: one fused kernel at CPU inference."""
    if (kernels := cpu_ops.for_inference(gate_up)) is not None:
        return kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up; for contiguous fp32 CPU tensors recording a gradient, one C++ pass each way
    (`cpu_ops.silu_mul`; the MLP of `qwen2-nano` at GRPO's 64 x 74 tokens, forward + backward of this
    product 1.42 -> 0.79 ms a layer, one thread)."""
    if (torch.is_grad_enabled() and gate.dtype == up.dtype == torch.float32 and gate.shape == up.shape
            and gate.is_contiguous() and up.is_contiguous() and type(gate) is torch.Tensor and type(up) is torch.Tensor
            and (gate.requires_grad or up.requires_grad) and not torch.compiler.is_compiling()
            and (kernels := cpu_ops.for_cpu(gate)) is not None):
        return _SiluMul.apply(gate, up, kernels)
    return F.silu(gate) * up


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, kernels):
        ctx.save_for_backward(gate, up)
        ctx.kernels = kernels
        return kernels.silu_mul(gate, up)[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = ctx.kernels.silu_mul(gate, up, grad)
        return grad_gate, grad_up, None


class SwiGLU(nn.Module):
    """The feed-forward block of every model here: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=bias)
        self.up_proj = Linear(dim, hidden_dim, bias=bias)
        self.down_proj = Linear(hidden_dim, dim, bias=bias)
        self.fused: FusedProjection | None = None  # gate + up, set by the inference engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and self.fused.usable:
            return self.down_proj(silu_and_mul(self.fused(x)))
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_mul(gate, up))

    def fusable_projections(self) -> list[nn.Linear]:
        return [self.gate_proj, self.up_proj]


@dataclass
class RotaryAngles:
    """cos/sin of the rotation angles for a batch of positions, shared by every layer of one forward.

    `cos` and `sin` are [batch, seq, rope_dim / 2] (one angle per rotated pair of channels).
    """

    cos: torch.Tensor
    sin: torch.Tensor

    def narrow(self, length: int) -> RotaryAngles:
        """The angles of the first `length` positions (MTP depths run on shortened sequences)."""
        return RotaryAngles(self.cos[:, :length], self.sin[:, :length])

    @functools.cached_property
    def complex_rotation(self) -> torch.Tensor:
        """cos + i sin [batch, seq, rope_dim / 2] for `apply_rope_interleaved`, built once per forward."""
        return torch.complex(self.cos, self.sin)

    @functools.cached_property
    def half_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([cos | cos], [-sin | sin]) as [batch, seq, 1, rope_dim] for `apply_rope_half`, built once
        per forward and shared by every layer."""
        cos, sin = self.cos[:, :, None], self.sin[:, :, None]
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE frequencies for a config: plain, YaRN (DeepSeek, Qwen), linear or Llama-3 scaling.

    Also owns the attention-temperature corrections that come with YaRN:
    `attention_factor` multiplies cos/sin (HF semantics: mscale / mscale_all_dim, exactly 1.0 for
    every DeepSeek config) and `softmax_scale_multiplier` multiplies the softmax scale by
    mscale(factor, mscale_all_dim)^2 for MLA models (the factor of 1.874 for V3 that
    re-implementations most often forget).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", torch.empty(config.rope_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the fp32 frequencies: after materializing from the meta device or a dtype cast."""
        config = self.config
        dim = config.rope_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        scaling = config.rope_scaling or {"rope_type": "default"}
        rope_type = scaling["rope_type"]
        self.attention_factor = 1.0
        self.softmax_scale_multiplier = 1.0
        if rope_type == "yarn":
            inv_freq, self.attention_factor = _yarn_frequencies(inv_freq, dim, config.rope_theta, scaling)
            mscale_all_dim = scaling.get("mscale_all_dim") or 0.0
            if config.is_mla and mscale_all_dim:
                self.softmax_scale_multiplier = yarn_mscale(scaling["factor"], mscale_all_dim) ** 2
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type == "llama3":
            inv_freq = _llama3_frequencies(inv_freq, scaling)
        self.inv_freq = inv_freq.to(device=self.inv_freq.device, dtype=torch.float32)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> RotaryAngles:
        """Angles for integer `positions` of shape [batch, seq]."""
        angles = positions.float()[..., None] * self.inv_freq.to(positions.device)
        if self.attention_factor == 1.0:
            return RotaryAngles(angles.cos(), angles.sin())
        return RotaryAngles(angles.cos() * self.attention_factor, angles.sin() * self.attention_factor)


def _yarn_frequencies(
    inv_freq: torch.Tensor, dim: int, base: float, scaling: dict
) -> tuple[torch.Tensor, float]:
    """YaRN: keep high frequencies, divide low ones by `factor`, linear ramp in between."""
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's band-wise frequency scaling (R1-Distill-Llama checkpoints use it)."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    original = scaling["original_max_position_embeddings"]
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _rotate_in_kernel(x: torch.Tensor, angles: RotaryAngles, interleaved: bool) -> torch.Tensor | None:
    """`cpu_ops.rope` where it applies (else None): on CPU without a gradient, any dtype; or fp32 recording
    one, whose backward is the inverse rotation (the same kernel with -sin). Training `qwen2-nano` at
    GRPO's 64 x 74 tokens, the queries' rotation forward + backward took ~1 ms a layer in PyTorch ops."""
    if (kernels := cpu_ops.for_inference(x)) is not None:
        return kernels.rope(x, angles.cos, angles.sin, interleaved)
    if (x.dtype == angles.cos.dtype == torch.float32 and type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and (kernels := cpu_ops.for_cpu(x)) is not None):
        return _Rotate.apply(x, angles.cos, angles.sin, interleaved, kernels)
    return None


class _Rotate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved, kernels):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved, ctx.kernels = interleaved, kernels
        return kernels.rope(x, cos, sin, interleaved)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors  # a rotation's transpose is the rotation by -angle
        return ctx.kernels.rope(grad, cos, sin.neg(), ctx.interleaved), None, None, None, None


def apply_rope_interleaved(x: torch.Tensor, angles: RotaryAngles) -> torch.Tensor:
    """Rotate adjacent channel pairs (x0, x1), (x2, x3), ...: DeepSeek's layout for MLA.

    `x` is [batch, seq, heads, dim] or [batch, seq, dim] (the shared k_pe).
    """
    if (rotated := _rotate_in_kernel(x, angles, interleaved=True)) is not None:
        return rotated
    rotation = angles.complex_rotation
    if x.dim() == 4:
        rotation = rotation[:, :, None]
    # (x0 + i x1) * (cos + i sin) rotates the pair (x0, x1): one complex multiply instead of six real ops.
    pairs = x.float().unflatten(-1, (-1, 2))
    if pairs.storage_offset() % 2 or any(stride % 2 for stride in pairs.stride()[:-1]):
        pairs = pairs.contiguous()  # view_as_complex needs every complex number 8-byte aligned
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * rotation)
    return rotated.flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, angles: RotaryAngles) -> torch.Tensor:
    """Rotate channel i with channel i + dim/2 (the "NeoX" layout of Qwen2 and Llama checkpoints).

    `x` is [batch, seq, heads, dim]: (first, second) -> (first cos - second sin, second cos + first sin),
    computed as x [cos | cos] + [second | first] [-sin | sin] in three ops.
    """
    if (rotated := _rotate_in_kernel(x, angles, interleaved=False)) is not None:
        return rotated
    cos, signed_sin = angles.half_layout
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return torch.addcmul(x32 * cos, torch.cat((second, first), dim=-1), signed_sin).to(x.dtype)
