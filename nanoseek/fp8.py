"""Fine-grained FP8 (E4M3) quantization and the DeepSeek-V3 FP8 Linear.

One scheme serves three users: loading DeepSeek's FP8 checkpoints (`dequantize_blocks`), quantizing
weights (`quantize_blocks`) and FP8 mixed-precision training (`fp8_linear`, `Fp8Linear`).

* Weights: one scale per 128x128 block, `s = amax(|block|) / 448`, stored as `scale_inv = s` of shape
  [ceil(out/128), ceil(in/128)]; edge blocks behave as if zero-padded (`W[i, j] = q[i, j] *
  scale_inv[i // 128, j // 128]`).
* Activations and gradients: one scale per 1x128 tile along the GEMM's inner dimension K, computed
  online (no history). A GEMM then applies one `a_scale * b_scale` product per 128-wide K chunk and
  accumulates in fp32, which is DeepSeek's fix for Hopper's ~14-bit FP8 accumulator.
* Training (V3 report section 3.3): all three GEMMs of a Linear (Fprop, Dgrad, Wgrad) run in E4M3;
  the input is cached for backward in FP8; Wgrad's inner dimension is the token dimension, so the
  gradient and the cached input are re-tiled to 128x1 tiles (dequantize, transpose, requantize).

The reference GEMM dequantizes both operands to fp32 and multiplies in fp32, which equals the
chunk-scaled fp32-accumulating GEMM up to fp32 summation order. On Hopper (SM90) CUDA devices the
GEMMs go to cuBLAS's blockwise-scaled FP8 kernels through `torch.nn.functional.scaled_mm`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from nanoseek.model.layers import is_plain_linear

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
BLOCK = 128


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _tiles(x: Tensor, tile_rows: int, tile_cols: int) -> Tensor:
    """View the last two dims of `x` (zero-padded up to whole tiles) as [..., R, tile_rows, C, tile_cols]."""
    rows, cols = x.shape[-2:]
    row_tiles, col_tiles = _ceil_div(rows, tile_rows), _ceil_div(cols, tile_cols)
    col_pad, row_pad = col_tiles * tile_cols - cols, row_tiles * tile_rows - rows
    if col_pad or row_pad:
        x = F.pad(x, (0, col_pad, 0, row_pad))
    return x.reshape(*x.shape[:-2], row_tiles, tile_rows, col_tiles, tile_cols)


def _untile(tiles: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of `_tiles`: merge [..., R, tr, C, tc] back to [..., rows, cols], dropping the padding."""
    merged = tiles.reshape(*tiles.shape[:-4], tiles.shape[-4] * tiles.shape[-3], -1)
    return merged[..., :rows, :cols].contiguous()


def _quantize(
    x: Tensor, tile_rows: int, tile_cols: int, power_of_two: bool
) -> tuple[Tensor, Tensor]:
    """Quantize the last two dims of `x` to E4M3 with one fp32 scale per tile_rows x tile_cols tile.

    Returns (fp8 tensor shaped like `x`, scales [..., ceil(rows/tile_rows), ceil(cols/tile_cols)]),
    with `x ~= fp8 * scale`. An all-zero tile gets scale 1 (any positive scale encodes zeros exactly).
    """
    rows, cols = x.shape[-2:]
    tiles = _tiles(x.float(), tile_rows, tile_cols)
    amax = tiles.abs().amax(dim=(-3, -1))
    scale = torch.where(amax > 0, amax, FP8_MAX) / FP8_MAX
    if power_of_two:
        # UE8M0 scales (DeepSeek-V3.1): round up, so |x / scale| stays <= 448.
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    # The clamp only absorbs fp32 rounding of amax / (amax / 448); the cast itself rounds to nearest.
    quantized = (tiles / scale[..., :, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return _untile(quantized, rows, cols), scale


def _dequantize(
    x_fp8: Tensor, scale: Tensor, tile_rows: int, tile_cols: int, dtype: torch.dtype
) -> Tensor:
    """`x[i, j] = float(x_fp8[i, j]) * scale[i // tile_rows, j // tile_cols]` over the last two dims."""
    rows, cols = x_fp8.shape[-2:]
    tiles = _tiles(x_fp8.float(), tile_rows, tile_cols) * scale[..., :, None, :, None].float()
    return _untile(tiles, rows, cols).to(dtype)


@torch.no_grad()
def quantize_blocks(
    weight: Tensor, block: int = BLOCK, *, power_of_two: bool = False
) -> tuple[Tensor, Tensor]:
    """Quantize a weight [..., out, in] to E4M3 with one scale per block x block tile of its last two dims.

    Returns (w_fp8 [..., out, in] float8_e4m3fn, scale_inv [..., ceil(out/block), ceil(in/block)]
    float32), the layout of DeepSeek's checkpoints (`<name>.weight_scale_inv`). Leading dims are
    independent matrices, e.g. stacked MoE experts [E, out, in] get one block grid per expert.
    """
    if weight.dim() < 2:
        raise ValueError(f"quantize_blocks expects a [..., out, in] weight, got shape {tuple(weight.shape)}")
    return _quantize(weight, block, block, power_of_two)


def dequantize_blocks(
    w_fp8: Tensor, scale_inv: Tensor, block: int = BLOCK, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """Dequantize a block-quantized weight: `W[..., i, j] = float(w_fp8[..., i, j]) * scale_inv[..., i // block, j // block]`.

    `scale_inv` multiplies (DeepSeek's name means the inverse of the quantization scale). Raises
    ValueError when its shape is not [..., ceil(out/block), ceil(in/block)] for `w_fp8`.
    """
    if w_fp8.dim() < 2:
        raise ValueError(f"dequantize_blocks expects a [..., out, in] weight, got shape {tuple(w_fp8.shape)}")
    rows, cols = w_fp8.shape[-2:]
    expected = (*w_fp8.shape[:-2], _ceil_div(rows, block), _ceil_div(cols, block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv shape {tuple(scale_inv.shape)} does not match weight shape {tuple(w_fp8.shape)} "
            f"with {block}x{block} blocks: expected {expected}, got {tuple(scale_inv.shape)}"
        )
    return _dequantize(w_fp8, scale_inv, block, block, dtype)


@torch.no_grad()
def quantize_tiles(x: Tensor, tile: int = BLOCK, *, power_of_two: bool = False) -> tuple[Tensor, Tensor]:
    """Quantize activations [..., K] to E4M3 per 1 x tile tile along the last (inner) dim.

    Returns (x_fp8 [..., K], scales [..., ceil(K/tile)] float32) with `x ~= x_fp8 * scales` per tile;
    the last tile may be partial. Scales are online max-abs; `power_of_two=True` rounds them up to
    powers of two (DeepSeek-V3.1's `ue8m0` scale format). Unlike DeepSeek's inference kernel, amax is
    not floored at 1e-4: these tiles also carry gradients, which are routinely smaller than that.
    """
    x_fp8, scales = _quantize(x.unsqueeze(-2), 1, tile, power_of_two)
    return x_fp8.squeeze(-2), scales.squeeze(-2)


def dequantize_tiles(
    x_fp8: Tensor, scales: Tensor, tile: int = BLOCK, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Inverse of `quantize_tiles`: `x[..., k] = float(x_fp8[..., k]) * scales[..., k // tile]`."""
    return _dequantize(x_fp8.unsqueeze(-2), scales.unsqueeze(-2), 1, tile, dtype).squeeze(-2)


# --- GEMM ------------------------------------------------------------------------------------------

_scaled_mm_failed = False  # set when cuBLAS rejects the blockwise call; later GEMMs use the reference


def has_blockwise_scaled_mm(device: torch.device) -> bool:
    """Whether GEMMs on `device` can use cuBLAS blockwise-scaled FP8 (Hopper SM90, CUDA >= 12.9).

    cuBLAS implements DeepSeek-style 1x128 / 128x128 scaling only on SM90; other GPUs (Ada SM89,
    Blackwell SM100) and CPUs use the reference GEMM.
    """
    if _scaled_mm_failed or device.type != "cuda" or not hasattr(F, "scaled_mm") or not torch.version.cuda:
        return False
    cuda_version = tuple(int(part) for part in torch.version.cuda.split(".")[:2])
    return torch.cuda.get_device_capability(device) == (9, 0) and cuda_version >= (12, 9)


def _reference_gemm(
    a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, b_tile_rows: int, out_dtype: torch.dtype
) -> Tensor:
    """Exact emulation: dequantize both operands to fp32, multiply in fp32."""
    a_fp32 = _dequantize(a, a_scale, 1, BLOCK, torch.float32)
    b_fp32 = _dequantize(b, b_scale, b_tile_rows, BLOCK, torch.float32)
    return (a_fp32 @ b_fp32.t()).to(out_dtype)


def _cublas_gemm(
    a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, b_tile_rows: int, out_dtype: torch.dtype
) -> Tensor:
    """cuBLAS blockwise-scaled FP8 GEMM in the scale layouts `torch.nn.functional.scaled_mm` requires.

    1x128 scales [rows, L] must be outer-dim-major (stride (1, rows)); 128x128 scales of B go in as
    [round_up(L, 4), ceil(N/128)] with stride (1, round_up(L, 4)), L = ceil(K/128).
    """
    from torch.nn.functional import ScalingType  # torch >= 2.9; callers check has_blockwise_scaled_mm

    a_scale = a_scale.t().contiguous().t()
    if b_tile_rows == 1:
        b_recipe, b_scale = ScalingType.BlockWise1x128, b_scale.t().contiguous().t()
    else:
        k_blocks = b_scale.shape[1]
        b_recipe = ScalingType.BlockWise128x128
        b_scale = F.pad(b_scale, (0, _ceil_div(k_blocks, 4) * 4 - k_blocks)).contiguous().t()
    mm_dtype = out_dtype if out_dtype in (torch.bfloat16, torch.float32) else torch.float32
    out = F.scaled_mm(
        a.contiguous(), b.contiguous().t(), a_scale, ScalingType.BlockWise1x128, b_scale, b_recipe,
        output_dtype=mm_dtype,
    )
    return out.to(out_dtype)


def _scaled_gemm(
    a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, b_tile_rows: int, out_dtype: torch.dtype
) -> Tensor:
    """`a @ b.T` for a [M, K] fp8 with 1x128 scales [M, ceil(K/128)] and b [N, K] fp8 with scales per
    `b_tile_rows` x 128 tile (128: weight blocks [ceil(N/128), ceil(K/128)]; 1: tiles [N, ceil(K/128)]).
    Accumulates in fp32 and returns `out_dtype`.
    """
    global _scaled_mm_failed
    (m, k), n = a.shape, b.shape[0]
    if has_blockwise_scaled_mm(a.device) and m % BLOCK == 0 and n % BLOCK == 0 and k % BLOCK == 0:
        try:
            return _cublas_gemm(a, a_scale, b, b_scale, b_tile_rows, out_dtype)
        except (RuntimeError, NotImplementedError, ValueError) as error:  # what TORCH_CHECK* raise
            _scaled_mm_failed = True
            warnings.warn(f"blockwise scaled_mm failed ({error}); using the fp32 reference GEMM", stacklevel=2)
    return _reference_gemm(a, a_scale, b, b_scale, b_tile_rows, out_dtype)


# --- FP8 Linear ------------------------------------------------------------------------------------

class Fp8LinearFunction(torch.autograd.Function):
    """`y = x @ W.T + b` with all three GEMMs in E4M3 (DeepSeek-V3 recipe); the input is cached in FP8.

    Fprop: x in 1x128 tiles, W in 128x128 blocks. Dgrad: dy in 1x128 tiles along N, W's blocks
    transposed (a square block needs no requantization). Wgrad: dy and the cached x re-tiled to 128x1
    (along tokens, the inner dim of dW = dy.T @ x). Outputs: y and dx in x's dtype (or the autocast
    dtype for y), dW and db in the parameters' dtypes.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype, power_of_two: bool
    ) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x_2d = x.reshape(-1, x.shape[-1])
            x_fp8, x_scale = quantize_tiles(x_2d, power_of_two=power_of_two)
            w_fp8, w_scale = quantize_blocks(weight, power_of_two=power_of_two)
            y = _scaled_gemm(x_fp8, x_scale, w_fp8, w_scale, BLOCK, out_dtype)
            if bias is not None:
                y = y + bias.to(out_dtype)
        ctx.save_for_backward(x_fp8, x_scale, w_fp8, w_scale)
        ctx.x_shape, ctx.x_dtype, ctx.power_of_two = x.shape, x.dtype, power_of_two
        ctx.has_bias = bias is not None
        ctx.weight_dtype, ctx.bias_dtype = weight.dtype, None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x_fp8, x_scale, w_fp8, w_scale = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        with torch.autocast(grad_y.device.type, enabled=False):
            grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
            if ctx.needs_input_grad[0]:
                g_fp8, g_scale = quantize_tiles(grad_2d, power_of_two=ctx.power_of_two)
                grad_x = _scaled_gemm(g_fp8, g_scale, w_fp8.t(), w_scale.t(), BLOCK, ctx.x_dtype)
                grad_x = grad_x.reshape(ctx.x_shape)
            if ctx.needs_input_grad[1]:
                g_t_fp8, g_t_scale = quantize_tiles(grad_2d.t(), power_of_two=ctx.power_of_two)
                x_t = dequantize_tiles(x_fp8, x_scale).t()
                x_t_fp8, x_t_scale = quantize_tiles(x_t, power_of_two=ctx.power_of_two)
                grad_weight = _scaled_gemm(g_t_fp8, g_t_scale, x_t_fp8, x_t_scale, 1, ctx.weight_dtype)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_bias = grad_2d.float().sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


_fp8_enabled = True


@contextlib.contextmanager
def fp8_disabled() -> Iterator[None]:
    """Within this context `fp8_linear` (and so every `Fp8Linear`) is a plain `F.linear` on the master
    weights, e.g. for evaluation in full precision. Not thread-local."""
    global _fp8_enabled
    previous, _fp8_enabled = _fp8_enabled, False
    try:
        yield
    finally:
        _fp8_enabled = previous


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, power_of_two: bool = False) -> Tensor:
    """Drop-in for `F.linear(x, weight, bias)` computed with the FP8 training recipe.

    x [..., in], weight [out, in] (master weights, any float dtype; e.g. one expert `w[e]` of a stacked
    [E, out, in] parameter), bias [out] or None. Output [..., out] in x's dtype, or in the autocast
    dtype when autocast is on for x's device. Inside `fp8_disabled()` this is exactly `F.linear`.
    """
    if not _fp8_enabled:
        return F.linear(x, weight, bias)
    device_type = x.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    out_dtype = torch.get_autocast_dtype(device_type) if autocast_on else x.dtype
    return Fp8LinearFunction.apply(x, weight, bias, out_dtype, power_of_two)


class Fp8Linear(nn.Linear):
    """`nn.Linear` whose forward runs `fp8_linear`; parameters, state-dict keys and init are nn.Linear's."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        power_of_two: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.power_of_two = power_of_two

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, power_of_two: bool = False) -> Fp8Linear:
        """Wrap the same Parameter objects (optimizer state and checkpoints stay valid)."""
        with torch.device("meta"):
            fp8 = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      power_of_two=power_of_two)
        fp8.weight = linear.weight
        fp8.bias = linear.bias
        return fp8.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.bias, power_of_two=self.power_of_two)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, power_of_two={self.power_of_two}"


def convert_to_fp8_training(
    model: nn.Module,
    skip: Callable[[str, nn.Module], bool] | None = None,
    *,
    power_of_two: bool = False,
) -> list[str]:
    """Swap every plain `nn.Linear` inside `model` for an `Fp8Linear` sharing its Parameters, in place.

    `skip(name, module)` returning True keeps a Linear in high precision (DeepSeek keeps the output
    head, the MoE router and MTP's eh_proj in BF16/FP32). Subclasses of nn.Linear are left alone, and
    so is `model` itself. Returns the qualified names converted. Use `fp8_disabled()` to evaluate.
    """
    converted: list[str] = []
    replacements: dict[int, Fp8Linear] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not is_plain_linear(child) or (skip is not None and skip(name, child)):
                continue
            if id(child) not in replacements:
                replacements[id(child)] = Fp8Linear.from_linear(child, power_of_two=power_of_two)
            setattr(parent, child_name, replacements[id(child)])
            converted.append(name)
    return converted
