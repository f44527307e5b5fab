"""FP8 blocks, tiles and the FP8 Linear, checked against naive loop references written from the spec.

Error bound used throughout: E4M3 keeps 3 mantissa bits, so round-to-nearest of a normal value v has
|err| <= 2^-4 * |v| (half an ulp, relative to the value's own binade); below the smallest normal 2^-6
the spacing is 2^-9, so |err| <= 2^-10 (in scaled units). Scaled by the block scale s this gives
|dequant(w) - w| <= 2^-4 |w| + 2^-10 s, hence <= 2^-4 * amax(block) for every element.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoseek import fp8
from nanoseek.fp8 import (
    FP8_MAX,
    Fp8Linear,
    _cublas_gemm,
    convert_to_fp8_training,
    dequantize_blocks,
    dequantize_tiles,
    fp8_disabled,
    fp8_linear,
    quantize_blocks,
    quantize_tiles,
)

U = 2.0**-4  # E4M3 relative rounding bound for normal values
SUBNORMAL_HALF_STEP = 2.0**-10  # absolute rounding bound below 2^-6, in scaled units


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.uint8)


# --- naive references: explicit loops over tiles and 128-wide K chunks ------------------------------

def naive_quantize(x: torch.Tensor, tile_rows: int, tile_cols: int, power_of_two: bool = False):
    """Quantize a 2-D tensor tile by tile with Python loops (the spec, not the implementation)."""
    rows, cols = x.shape
    x = x.float()
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scales = torch.empty(math.ceil(rows / tile_rows), math.ceil(cols / tile_cols))
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = x[i * tile_rows:(i + 1) * tile_rows, j * tile_cols:(j + 1) * tile_cols]
            amax = tile.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            if power_of_two:
                s = 2.0 ** torch.ceil(torch.log2(s))
            scales[i, j] = s
            q[i * tile_rows:(i + 1) * tile_rows, j * tile_cols:(j + 1) * tile_cols] = (
                (tile / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            )
    return q, scales


def naive_dequantize(q: torch.Tensor, scales: torch.Tensor, tile_rows: int, tile_cols: int) -> torch.Tensor:
    rows = torch.arange(q.shape[0]) // tile_rows
    cols = torch.arange(q.shape[1]) // tile_cols
    return q.float() * scales[rows[:, None], cols[None, :]]


def naive_gemm(a, a_scale, b, b_scale, b_tile_rows):
    """a @ b.T with per-128-chunk scaling: out += (a_c @ b_c.T) * a_scale[:, c] * b_scale[n, c], fp32."""
    m, k = a.shape
    n = b.shape[0]
    out = torch.zeros(m, n)
    b_rows = torch.arange(n) // b_tile_rows
    for c in range(math.ceil(k / 128)):
        chunk = slice(c * 128, (c + 1) * 128)
        partial = a[:, chunk].float() @ b[:, chunk].float().t()
        out += partial * a_scale[:, c, None] * b_scale[b_rows, c][None, :]
    return out


def naive_fp8_linear(x, w, grad_y, power_of_two=False):
    """Forward and both gradients of the V3 recipe, built from the naive pieces above."""
    qx, sx = naive_quantize(x, 1, 128, power_of_two)
    qw, sw = naive_quantize(w, 128, 128, power_of_two)
    y = naive_gemm(qx, sx, qw, sw, 128)
    qg, sg = naive_quantize(grad_y, 1, 128, power_of_two)
    grad_x = naive_gemm(qg, sg, qw.t(), sw.t(), 128)
    qg_t, sg_t = naive_quantize(grad_y.t(), 1, 128, power_of_two)  # 128x1 tiles of grad_y
    qx_t, sx_t = naive_quantize(naive_dequantize(qx, sx, 1, 128).t(), 1, 128, power_of_two)
    grad_w = naive_gemm(qg_t, sg_t, qx_t, sx_t, 1)
    return y, grad_x, grad_w


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 summation order."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _weight_with_varied_blocks(rows: int, cols: int) -> torch.Tensor:
    """Gaussian weight whose 128x128 blocks differ in magnitude by orders of ten."""
    w = torch.randn(rows, cols)
    block_gain = 10.0 ** torch.randint(-3, 3, (math.ceil(rows / 128), math.ceil(cols / 128))).float()
    return w * block_gain.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]


# --- weight blocks ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "shape, scale_shape",
    [((576, 200), (5, 2)), ((576, 7168), (5, 56)), ((256, 512), (2, 4)), ((1, 1), (1, 1))],
)
def test_scale_inv_shape_matches_deepseek_checkpoints(shape, scale_shape):
    w_fp8, scale_inv = quantize_blocks(torch.randn(shape))
    assert w_fp8.dtype == torch.float8_e4m3fn and w_fp8.shape == shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == scale_shape


@pytest.mark.parametrize("power_of_two", [False, True])
def test_block_round_trip_within_e4m3_bound(power_of_two):
    torch.manual_seed(0)
    w = _weight_with_varied_blocks(576, 200)
    w_fp8, scale_inv = quantize_blocks(w, power_of_two=power_of_two)
    restored = dequantize_blocks(w_fp8, scale_inv, dtype=torch.float32)
    s = naive_dequantize(torch.ones_like(w).to(torch.float8_e4m3fn), scale_inv, 128, 128)
    error = (restored - w).abs()
    assert torch.all(error <= U * w.abs() + SUBNORMAL_HALF_STEP * s + 1e-6 * w.abs())
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            block = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            assert error[block].max() <= U * w[block].abs().max()
    # The bound is nearly attained, so the test would notice a coarser format.
    assert (error / w.abs().clamp_min(1e-30)).max() > U / 2


def test_partial_edge_blocks_scale_by_their_own_amax():
    torch.manual_seed(0)
    w = _weight_with_varied_blocks(576, 200)
    w_fp8, scale_inv = quantize_blocks(w)
    q_ref, s_ref = naive_quantize(w, 128, 128)
    assert torch.equal(scale_inv, s_ref)
    assert torch.equal(_bits(w_fp8), _bits(q_ref))
    # Last row block holds rows 512..575 only; zero padding does not change its amax.
    assert scale_inv[4, 1] == w[512:, 128:].abs().max() / 448.0
    assert w_fp8.float().abs().max() == FP8_MAX


def test_zero_block_is_exact_and_finite():
    w = torch.randn(256, 256)
    w[:128, 128:] = 0
    w_fp8, scale_inv = quantize_blocks(w)
    assert scale_inv[0, 1] == 1.0 and torch.isfinite(scale_inv).all()
    restored = dequantize_blocks(w_fp8, scale_inv, dtype=torch.float32)
    assert torch.all(restored[:128, 128:] == 0)
    q, s = quantize_blocks(torch.zeros(3, 5))
    assert torch.all(q.float() == 0) and torch.all(s == 1.0)


def test_dequantize_matches_per_element_loop():
    torch.manual_seed(0)
    w_fp8 = (torch.randn(130, 260) * 50).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 3) + 0.5
    restored = dequantize_blocks(w_fp8, scale_inv, dtype=torch.float32)
    values, scales = w_fp8.float().tolist(), scale_inv.tolist()
    expected = [[values[i][j] * scales[i // 128][j // 128] for j in range(260)] for i in range(130)]
    assert torch.equal(restored, torch.tensor(expected))
    assert dequantize_blocks(w_fp8, scale_inv).dtype == torch.bfloat16


def test_dequantize_rejects_wrong_scale_shape():
    w_fp8 = torch.zeros(576, 200, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"expected \(5, 2\), got \(4, 2\)"):
        dequantize_blocks(w_fp8, torch.ones(4, 2))


def test_stacked_expert_weights_get_one_block_grid_per_expert():
    torch.manual_seed(0)
    experts = torch.randn(3, 200, 300) * torch.tensor([1.0, 1e-3, 1e3])[:, None, None]
    w_fp8, scale_inv = quantize_blocks(experts)
    assert w_fp8.shape == (3, 200, 300) and scale_inv.shape == (3, 2, 3)
    for e in range(3):
        q_e, s_e = quantize_blocks(experts[e])
        assert torch.equal(_bits(w_fp8[e]), _bits(q_e)) and torch.equal(scale_inv[e], s_e)
    restored = dequantize_blocks(w_fp8, scale_inv, dtype=torch.float32)
    assert torch.equal(restored[1], dequantize_blocks(w_fp8[1], scale_inv[1], dtype=torch.float32))
    with pytest.raises(ValueError, match=r"expected \(3, 2, 3\)"):
        dequantize_blocks(w_fp8, scale_inv[0])


# --- activation tiles ------------------------------------------------------------------------------

def test_tiles_follow_the_inner_dim_with_partial_last_tile():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 300) * torch.logspace(-3, 3, 300)
    x_fp8, scales = quantize_tiles(x)
    assert x_fp8.shape == (2, 3, 300) and scales.shape == (2, 3, 3)
    q_ref, s_ref = naive_quantize(x.reshape(6, 300), 1, 128)
    assert torch.equal(scales.reshape(6, 3), s_ref)
    assert torch.equal(_bits(x_fp8.reshape(6, 300)), _bits(q_ref))
    restored = dequantize_tiles(x_fp8, scales)
    s = scales.repeat_interleave(128, -1)[..., :300]
    assert torch.all((restored - x).abs() <= U * x.abs() + SUBNORMAL_HALF_STEP * s + 1e-6 * x.abs())


def test_power_of_two_scales_round_up():
    torch.manual_seed(0)
    x = torch.randn(64, 384) * 3.7
    x_fp8, scales = quantize_tiles(x, power_of_two=True)
    exponents = torch.log2(scales)
    assert torch.equal(exponents, exponents.round())
    amax = x.reshape(64, 3, 128).abs().amax(-1)
    assert torch.all(scales >= amax / 448) and torch.all(scales < 2 * amax / 448)
    assert x_fp8.float().abs().max() <= FP8_MAX


# --- FP8 Linear ------------------------------------------------------------------------------------

def _problem(m=256, k=320, n=200, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(m, k)
    w = torch.randn(n, k) * 0.05
    grad_y = torch.randn(m, n)
    return x, w, grad_y


def _run(x, w, grad_y, bias=None, **kwargs):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = fp8_linear(x, w, bias, **kwargs)
    y.backward(grad_y)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("power_of_two", [False, True])
def test_fp8_linear_equals_naive_chunked_reference(power_of_two):
    x, w, grad_y = _problem()
    y, grad_x, grad_w = _run(x, w, grad_y, power_of_two=power_of_two)
    y_ref, grad_x_ref, grad_w_ref = naive_fp8_linear(x, w, grad_y, power_of_two)
    _close(y, y_ref)
    _close(grad_x, grad_x_ref)
    _close(grad_w, grad_w_ref)


def test_fp8_linear_is_close_to_fp32():
    """Each E4M3 operand carries relative error <= u = 2^-4 per element, so every product term is off
    by at most (1+u)^2 - 1; Wgrad's input is quantized twice (cache, then re-tile): (1+u)^3 - 1."""
    x, w, grad_y = _problem()
    y, grad_x, grad_w = _run(x, w, grad_y)
    slack = 1e-3  # subnormal tails and fp32 rounding
    for actual, a, b, factors in [
        (y, x, w.t(), 2), (grad_x, grad_y, w, 2), (grad_w, grad_y.t(), x, 3),
    ]:
        bound = ((1 + U) ** factors - 1 + slack) * (a.abs() @ b.abs())
        assert torch.all((actual - a @ b).abs() <= bound)
        # Errors are independent across terms, so the typical error is far below the worst case.
        assert (actual - a @ b).norm() / (a @ b).norm() < 0.06


def test_wgrad_quantizes_grad_output_along_tokens():
    """A grad_output outlier at (token 0, channel 0): 1x128 tiles along channels would flush token 0's
    other channels to zero and lose a token's worth of dW; 128x1 tiles along tokens keep them."""
    torch.manual_seed(0)
    x, w, grad_y = torch.randn(8, 128), torch.randn(256, 128) * 0.05, torch.randn(8, 256)
    grad_y[0, 0] = 1e6
    _, _, grad_w = _run(x, w, grad_y)
    exact = grad_y.t() @ x
    qx, sx = naive_quantize(x, 1, 128)
    x_hat = naive_dequantize(*naive_quantize(naive_dequantize(qx, sx, 1, 128), 128, 1), 128, 1)
    along_channels = naive_dequantize(*naive_quantize(grad_y, 1, 128), 1, 128).t() @ x_hat

    def rel(a):
        return ((a - exact)[1:].norm() / exact[1:].norm()).item()

    assert rel(grad_w) < 0.06
    assert rel(along_channels) > 0.2


def test_input_is_saved_for_backward_in_fp8():
    x, w, _ = _problem()
    x.requires_grad_()
    w.requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fp8_linear(x, w)
    assert (torch.float8_e4m3fn, tuple(x.shape)) in saved
    assert (torch.float32, (256, 3)) in saved
    assert all(dtype == torch.float8_e4m3fn for dtype, shape in saved if shape in (x.shape, w.shape))


def test_fp8_linear_bias_batch_dims_and_dtypes():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 96, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 96, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    y = fp8_linear(x, w, b)
    assert y.shape == (2, 5, 64) and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    torch.testing.assert_close(b.grad, torch.full((64,), 10.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8_linear(x.detach().float(), w, b).dtype == torch.bfloat16


def test_fp8_disabled_is_plain_linear():
    x, w, _ = _problem()
    with fp8_disabled():
        assert torch.equal(fp8_linear(x, w), F.linear(x, w))
    assert not torch.equal(fp8_linear(x, w), F.linear(x, w))


def test_fp8_linear_on_one_expert_of_a_stacked_parameter():
    torch.manual_seed(0)
    experts = nn.Parameter(torch.randn(3, 160, 96) * 0.05)
    x = torch.randn(4, 5, 96)
    grad_y = torch.randn(4, 5, 160)
    fp8_linear(x, experts[1]).backward(grad_y)
    assert torch.all(experts.grad[0] == 0) and torch.all(experts.grad[2] == 0)
    _, _, grad_w = _run(x, experts[1].detach(), grad_y)
    assert torch.equal(experts.grad[1], grad_w)


@pytest.mark.parametrize("m, k, n", [(256, 512, 1408), (128, 640, 128), (256, 512, 512)])
def test_cublas_call_passes_torch_scaled_mm_layout_checks(m, k, n):
    """Meta tensors run torch's shape/stride checks for the CUDA blockwise kernels (not the numerics)."""
    def fp8_tensor(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.float8_e4m3fn)

    def scales(*shape):
        return torch.empty(*shape, device="meta")

    w, w_scale = fp8_tensor(n, k), scales(n // 128, k // 128)
    assert _cublas_gemm(fp8_tensor(m, k), scales(m, k // 128), w, w_scale, 128, torch.bfloat16).shape == (m, n)
    grad_x = _cublas_gemm(fp8_tensor(m, n), scales(m, n // 128), w.t(), w_scale.t(), 128, torch.float32)
    assert grad_x.shape == (m, k)
    grad_w = _cublas_gemm(fp8_tensor(n, m), scales(n, m // 128), fp8_tensor(k, m), scales(k, m // 128), 1, torch.float32)
    assert grad_w.shape == (n, k)


def test_rejected_cublas_call_falls_back_to_reference(monkeypatch):
    """If cuBLAS refuses the blockwise call (here: CPU tensors), warn once and use the reference GEMM."""
    x, w, grad_y = _problem(m=128, k=256, n=128)
    expected = _run(x, w, grad_y)
    monkeypatch.setattr(fp8, "_scaled_mm_failed", False)
    monkeypatch.setattr(fp8, "has_blockwise_scaled_mm", lambda device: not fp8._scaled_mm_failed)
    with pytest.warns(UserWarning, match="blockwise scaled_mm failed") as warnings_seen:
        actual = _run(x, w, grad_y)
    assert len(warnings_seen) == 1 and fp8._scaled_mm_failed
    for a, b in zip(actual, expected, strict=True):
        assert torch.equal(a, b)


# --- module conversion -----------------------------------------------------------------------------

class _TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 32)
        self.norm = nn.LayerNorm(32)
        self.q_proj = nn.Linear(32, 48)
        self.gate = nn.Linear(32, 4, bias=False)
        self.experts = nn.ModuleList([nn.Linear(32, 32) for _ in range(2)])
        self.lm_head = nn.Linear(32, 10, bias=False)


def test_convert_keeps_parameters_and_skips():
    model = _TinyBlock()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters())
    converted = convert_to_fp8_training(model, skip=lambda name, _: name in ("gate", "lm_head"))
    assert converted == ["q_proj", "experts.0", "experts.1"]
    assert isinstance(model.q_proj, Fp8Linear) and type(model.gate) is nn.Linear
    assert type(model.lm_head) is nn.Linear and isinstance(model.embed, nn.Embedding)
    assert all(p is params[name] for name, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert convert_to_fp8_training(model) == ["gate", "lm_head"]
    optimizer.step()


def test_tiny_mlp_trains_under_fp8():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))
    assert convert_to_fp8_training(model) == ["0", "2"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    inputs = torch.randn(512, 64)
    with torch.no_grad():
        targets = teacher(inputs)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad(), fp8_disabled():
        assert F.mse_loss(model(inputs), targets).item() < 0.2 * losses[0]
