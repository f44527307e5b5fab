"""Training kernels in plain PyTorch: custom autograd Functions for the places where autograd's
generic graph costs more than the math (measured on the `small` preset, see benchmarks/train_step.py),
and fp32 GEMMs on oneDNN where the CPU BLAS is slower (`mm`, `onednn_linear`).

* `linear_token_logprobs` (and `linear_cross_entropy` on top of it): output head + per-token
  log-probs. The plain graph materializes fp32 [tokens, vocab] logits, their log-softmax, a
  zero-filled fp32 gradient of the same size and casts between them; here the logits are computed
  once in the matmul dtype and turned, a few rows at a time while they are still in cache, into the
  log-probs and dlogp/dlogits. Backward is the two matmuls.
* `grouped_swiglu`: the routed experts' SwiGLU over tokens already grouped by expert. Autograd over
  per-expert weight slices stacks the expert gradients into a fresh [E, ...] tensor and casts every
  slice under autocast; here each expert's gradient is written straight into one buffer and the
  elementwise SwiGLU runs once over all experts' tokens.
* `dispatch_slots` / `combine_slots`: tokens to their experts' slots and back. Autograd cannot know
  that sorting slots by expert is a permutation, so it differentiates the gathers with serial
  scatter-adds into zero-filled tensors; here both directions are gathers.

Both compute in the dtype they are given (callers cast once, so autocast's per-use weight casts and
their gradients happen once per stack) with autocast switched off inside, and both are checked
against the plain autograd graph in tests/test_model.py.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nanoseek.model import cpu_ops

# ----- fp32 GEMMs on oneDNN --------------------------------------------------------------------
# fp32 CPU products from this many multiply-adds take oneDNN's GEMM instead of the BLAS's (torch.mm,
# F.linear: MKL). On the 2-core Zen 5 EPYC, MKL's sgemm runs at ~110 GFLOP/s a core and oneDNN's at
# ~260: F.linear / oneDNN on a plain [out, in] weight, 1 thread, 512 -> 2816: 0.98x at 1 row, 1.63x
# at 8, 2.25x from 128; 96 -> 256 (short calls, where oneDNN's fixed cost shows): 0.45x at 8 rows,
# 0.89x at 32, 1.62x at 128, 2.2x from 512; the backward's two products gain the same (4,480 x 96 x
# 256: 2.5 -> 0.84 ms and 2.1 -> 1.25 ms).
ONEDNN_MIN_MACS = 1 << 21
ONEDNN_NEVER = (1 << 63) - 1
# The grouped experts' per-expert products stay on torch.mm: their row counts change every step, and
# each new shape costs oneDNN a new primitive (~0.2-0.4 ms here). On oneDNN a `nano` pretraining step
# took 308 ms against MKL's 255, a `small` one 1,428 against 1,294.


@functools.cache
def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available()


def onednn_from() -> int:
    """From how many multiply-adds an fp32 CPU product takes oneDNN here and now: ONEDNN_MIN_MACS, or
    never where oneDNN is absent or disabled, under autocast (it would run the product in bf16) or
    while compiling. `nanoseek.model.decode_layer` hands it to its C++ products."""
    if (not _onednn_available() or not torch.backends.mkldnn.enabled or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()):
        return ONEDNN_NEVER
    return ONEDNN_MIN_MACS


def onednn_fits(macs: int, *tensors: torch.Tensor | None) -> bool:
    """Whether a product of `macs` multiply-adds over these fp32 CPU tensors takes oneDNN (`onednn_from`),
    the tensors being plain (no DTensor, FakeTensor or other subclass: the op is called directly)."""
    return macs >= onednn_from() and all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


_SHAPES_SEEN: dict[tuple, None] = {}
SHAPES_REMEMBERED = 4096


def repeated_shape(shape: tuple) -> bool:
    """Whether a product of this shape was asked for before (the last SHAPES_REMEMBERED shapes).
    Training products whose row count changes from step to step (GRPO's and SFT's batch lengths) take
    oneDNN only from a shape's second use on: each new shape costs oneDNN a new primitive, which a
    shape used once never pays back."""
    if shape in _SHAPES_SEEN:
        return True
    if len(_SHAPES_SEEN) >= SHAPES_REMEMBERED:
        _SHAPES_SEEN.pop(next(iter(_SHAPES_SEEN)))
    _SHAPES_SEEN[shape] = None
    return False


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] @ weight [out, in]^T (+ bias) by oneDNN's GEMM; either may be a transposed view."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] @ b [k, n]: oneDNN's GEMM for fp32 CPU products that `onednn_fits`, from a shape's
    second use on (`repeated_shape`), else torch.mm."""
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    if (a.dtype == b.dtype == torch.float32 and a.device.type == "cpu" and onednn_fits(m * k * n, a, b)
            and repeated_shape((m, k, n))):
        return onednn_mm(a, b)
    return torch.mm(a, b)


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] @ b [k, n] by oneDNN's GEMM, which copies a transposed `a` whole: when `a` is one (a
    weight gradient, grad^T x) and b and the result are smaller, (b^T a^T)^T copies those instead (the
    fused head's weight gradient, `small`: 135 -> 99 ms, MKL 161; `qwen2-nano`'s gate and up projections
    at GRPO's 4,736 tokens, 1.61 -> 1.17 ms each)."""
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    if not a.is_contiguous() and a.t().is_contiguous() and m * n + k * n < m * k:
        return onednn_product(b.t().contiguous(), a).t().contiguous()
    return onednn_product(a, b.t())


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with oneDNN's GEMM in the forward and in both backward products."""
    return _OneDNNLinear.apply(x, weight, bias)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(flat, weight)
        ctx.has_bias = bias is not None
        return onednn_product(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        flat, weight = ctx.saved_tensors
        grad_flat = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_product(grad_flat, weight.t()).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_weight = onednn_mm(grad_flat.t(), flat)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_flat.sum(0)
        return grad_x, grad_weight, grad_bias


def cross_entropy_chunk_elements(device: torch.device) -> int:
    """Logits turned into loss and gradient at a time. On CPU a chunk stays in a core's cache (1 MB of
    fp32: 8 rows of a 32k vocabulary); on a GPU each chunk costs a few kernel launches, so chunks are big."""
    return 1 << 18 if device.type == "cpu" else 1 << 26


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `tensor` runs in here: autocast's when autocast is on, else its own."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


# ----- output head + cross-entropy ------------------------------------------------------------------------
def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `labels` over positions whose label is not
    `ignore_index`, equal to F.cross_entropy(F.linear(hidden, weight).float(), labels).

    hidden [..., dim], weight [vocab, dim], labels [...] (same leading shape): minus the mean of
    `linear_token_logprobs` over the counted positions, so the [tokens, vocab] logits exist once and
    the backward pass is only the two matmuls.
    """
    valid = (labels != ignore_index).flatten()
    logprobs, _ = linear_token_logprobs(hidden.flatten(0, -2), weight, labels.flatten().masked_fill(~valid, 0))
    return -(logprobs * valid).sum() / valid.sum()


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs [tokens] (fp32) of `targets` under softmax(hidden @ weight.T / temperature), and the
    entropy [tokens] (fp32, detached) of those distributions if asked: the values of
    log_softmax(F.linear(hidden, weight).float() / temperature).gather(...), without the [tokens, vocab]
    log-softmax, its exponentials and their gradients as separate tensors (GRPO's policy update).

    hidden [tokens, dim], weight [vocab, dim], targets [tokens]. Rows are taken in cache-sized chunks;
    when a gradient is needed, d logp / d logits = (onehot(target) - softmax) / temperature is computed
    during the forward in place of the logits, and the backward pass is two matmuls with the upstream
    per-token gradient applied to the [tokens, dim] operands. Matmul in the autocast dtype, softmax fp32.
    """
    dtype = compute_dtype(hidden)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    with torch.autocast(hidden.device.type, enabled=False):
        logprobs, token_entropy = _LinearTokenLogprobs.apply(hidden, weight, targets, temperature, entropy, dtype, needs_grad)
    return logprobs, token_entropy if entropy else None


def _token_logprobs_in_chunks(logits, gradient, targets, temperature, with_entropy, needs_grad):
    """`_LinearTokenLogprobs.forward`'s statistics in PyTorch ops, a few rows at a time while they are in
    cache: (log-probs, entropy) fp32, and with `needs_grad` d logp / d logits written into `gradient`."""
    tokens = logits.shape[0]
    logprobs = torch.empty(tokens, dtype=torch.float32, device=logits.device)
    token_entropy = torch.empty(tokens if with_entropy else 0, dtype=torch.float32, device=logits.device)
    rows_per_chunk = max(1, cross_entropy_chunk_elements(logits.device) // logits.shape[1])
    for start in range(0, tokens, rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        chunk = logits[rows].float()  # a copy, or a view of fp32 logits
        if temperature != 1.0:
            chunk.div_(temperature)
        chunk.sub_(chunk.amax(dim=-1, keepdim=True))  # shifted logits z
        target_index = targets[rows, None]
        target_logits = chunk.gather(1, target_index)
        exponentials = chunk.exp() if with_entropy else chunk.exp_()
        normalizer = exponentials.sum(dim=-1, keepdim=True)
        log_normalizer = normalizer.log()
        logprobs[rows] = (target_logits - log_normalizer).squeeze(1)
        if with_entropy:  # H = log Z - sum(e^z z) / Z
            weighted = torch.bmm(exponentials.unsqueeze(1), chunk.unsqueeze(2)).view(-1, 1)
            token_entropy[rows] = (log_normalizer - weighted / normalizer).squeeze(1)
        if needs_grad:
            chunk_gradient = exponentials.mul_(-1 / temperature / normalizer)
            chunk_gradient.scatter_add_(1, target_index, chunk_gradient.new_full(target_index.shape, 1 / temperature))
            if chunk_gradient.data_ptr() != gradient[rows].data_ptr():
                gradient[rows] = chunk_gradient
    return logprobs, token_entropy


class _LinearTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, dtype, needs_grad):
        weight_in_dtype = weight.to(dtype)
        logits = mm(hidden.to(dtype), weight_in_dtype.t())
        gradient = logits if dtype != torch.float16 or not needs_grad else torch.empty_like(logits, dtype=torch.float32)
        if logits.dtype == torch.float32 and (kernels := cpu_ops.for_cpu(logits)) is not None:
            # each row's softmax statistics and gradient in one pass over it (`cpu_ops.token_logprobs`;
            # GRPO's update of `qwen2-nano`, 4,096 tokens x 1,024: head forward 11.9 -> 4.8 ms, one thread)
            logprobs, token_entropy = kernels.token_logprobs(logits, targets, temperature, with_entropy, needs_grad)
        else:
            logprobs, token_entropy = _token_logprobs_in_chunks(logits, gradient, targets, temperature, with_entropy,
                                                                needs_grad)
        ctx.mark_non_differentiable(token_entropy)
        if needs_grad:
            ctx.save_for_backward(hidden, weight_in_dtype, gradient)
            ctx.weight_dtype = weight.dtype
        return logprobs, token_entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, gradient = ctx.saved_tensors
        row_scale = grad_logprobs.float()[:, None]
        with torch.autocast(hidden.device.type, enabled=False):
            if gradient.dtype == weight.dtype:  # scale the small operands, not [tokens, vocab]
                hidden_scaled = (hidden.float() * row_scale).to(weight.dtype)
                grad_hidden = (mm(gradient, weight).float() * row_scale).to(hidden.dtype)
            else:  # fp16: the fp32 gradient scaled (the loss scale), then cast, as autograd would
                gradient, hidden_scaled = (gradient * row_scale).to(weight.dtype), hidden.to(weight.dtype)
                grad_hidden = mm(gradient, weight).to(hidden.dtype)
            grad_weight = mm(gradient.t(), hidden_scaled).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


# ----- token <-> expert-slot permutation ----------------------------------------------------------
def dispatch_slots(x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """x [tokens, dim] -> [tokens * top_k, dim]: slot s holds token order[s] // top_k, where `order`
    sorts the flattened [tokens, top_k] expert choices by expert."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # inference: skip autograd.Function's overhead
        return x.index_select(0, order // top_k)
    return _DispatchSlots.apply(x, order, top_k)


def combine_slots(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of `dispatch_slots`, weighted: out[t] = sum_j weights[t, j] * y[slot of choice (t, j)].

    y [tokens * top_k, dim] in expert order, weights [tokens, top_k] (gate weights, any float dtype,
    applied in y's dtype with the k-term sum accumulated in fp32 by the matmul). Returns [tokens, dim]
    in y's dtype.
    """
    if not (torch.is_grad_enabled() and (y.requires_grad or weights.requires_grad)):
        return _combine(y, weights, order)[0]  # inference: skip autograd.Function's overhead
    return _CombineSlots.apply(y, weights, order)


def _combine(y: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(combined [tokens, dim], y by choice [tokens, top_k, dim], gate weights in y's dtype)."""
    tokens, top_k = weights.shape
    by_choice = y.index_select(0, _inverse_permutation(order)).view(tokens, top_k, -1)
    gate = weights.to(y.dtype)
    return torch.bmm(gate.view(tokens, 1, top_k), by_choice).view(tokens, -1), by_choice, gate


def _inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class _DispatchSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, top_k):
        ctx.save_for_backward(order)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad_slots):
        (order,) = ctx.saved_tensors
        by_choice = grad_slots.index_select(0, _inverse_permutation(order))  # [tokens * k, dim], token-major
        return by_choice.view(-1, ctx.top_k, grad_slots.shape[-1]).sum(dim=1), None, None


class _CombineSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, order):
        combined, by_choice, gate = _combine(y, weights, order)
        ctx.save_for_backward(by_choice, gate, order)
        ctx.weights_dtype = weights.dtype
        return combined

    @staticmethod
    def backward(ctx, grad_out):
        by_choice, gate, order = ctx.saved_tensors
        grad_out = grad_out.to(by_choice.dtype)
        grad_y = grad_weights = None
        if ctx.needs_input_grad[0]:  # d/dy: each slot's gradient is its gate weight times its token's
            grad_by_choice = gate[:, :, None] * grad_out[:, None, :]
            grad_y = grad_by_choice.view(-1, grad_out.shape[-1]).index_select(0, order)
        if ctx.needs_input_grad[1]:
            grad_weights = torch.bmm(by_choice, grad_out[:, :, None]).squeeze(-1).to(ctx.weights_dtype)
        return grad_y, grad_weights, None


# ----- routed experts ------------------------------------------------------------------------------
class ExpertScratch:
    """Buffers one expert stack reuses from step to step under mixed precision: the weights cast to
    the compute dtype (forward) and the weight gradients before their cast to the master dtype.

    On CPU a fresh multi-megabyte tensor per expert per step costs more in first-touch page faults
    than the cast itself (glibc hands large blocks back to the kernel on free); these are allocated
    once. They hold nothing between steps that is read: every use rewrites them first.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != dtype or buffer.device != like.device:
            buffer = self.buffers[name] = torch.empty(like.shape, dtype=dtype, device=like.device)
        return buffer


def grouped_swiglu(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, counts: Sequence[int],
    scratch: ExpertScratch | None = None,
) -> torch.Tensor:
    """SwiGLU experts over grouped tokens: rows of `x` [slots, dim] come in runs of `counts[e]` rows
    for expert e; expert e computes down[e] @ (silu(gate) * up) with [gate; up] = gate_up[e] @ x_row.

    gate_up [E, 2 * hidden, dim] (gate rows first), down [E, dim, hidden]. Returns [slots, dim] in
    the compute dtype (autocast's when on). Same result as running `RoutedExperts.expert_forward`
    per expert; the gradient of each weight stack is one tensor in the stack's dtype, written expert
    by expert, zero for experts that got no token. `scratch` (one per expert stack) keeps the cast
    weights and low-precision gradients in buffers reused across steps.
    """
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return _GroupedSwiGLU.apply(x.to(dtype), gate_up, down, list(counts), scratch or ExpertScratch())


def _runs(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, rows) for every expert with at least one row."""
    runs, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            runs.append((expert, slice(start, start + count)))
        start += count
    return runs


class _GroupedSwiGLU(torch.autograd.Function):
    """Weights stay in their own dtype (fp32 master weights under autocast). In a lower compute
    dtype, the chosen experts are cast into the scratch stacks, and the backward pass writes the
    weight gradients in the compute dtype into scratch stacks too, then casts each stack once."""

    @staticmethod
    def forward(ctx, x, gate_up, down, counts, scratch):
        runs = _runs(counts)
        if x.dtype == gate_up.dtype:
            gate_up_c, down_c = gate_up.detach(), down.detach()
        else:
            gate_up_c, down_c = scratch.get("gate_up", gate_up, x.dtype), scratch.get("down", down, x.dtype)
            for expert, _ in runs:
                gate_up_c[expert].copy_(gate_up[expert])
                down_c[expert].copy_(down[expert])
        gate_and_up = x.new_empty(x.shape[0], gate_up.shape[1])
        for expert, rows in runs:
            torch.mm(x[rows], gate_up_c[expert].t(), out=gate_and_up[rows])
        gate, up = gate_and_up.chunk(2, dim=-1)
        activation = F.silu(gate) * up
        out = x.new_empty(x.shape[0], down.shape[1])
        for expert, rows in runs:
            torch.mm(activation[rows], down_c[expert].t(), out=out[rows])
        ctx.save_for_backward(x, gate_and_up, activation, gate_up, down)
        ctx.runs, ctx.scratch, ctx.compute_weights = runs, scratch, (gate_up_c, down_c)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gate_and_up, activation, gate_up, down = ctx.saved_tensors  # raises if the weights changed since
        runs, scratch = ctx.runs, ctx.scratch
        # A forward run since (activation checkpointing) rewrote the casts with the same values: the
        # weights have not changed, or saved_tensors would have raised.
        gate_up_c, down_c = ctx.compute_weights
        grad_out = grad_out.contiguous()
        every_expert_used = len(runs) == gate_up.shape[0]

        def new_weight_grad(name: str, weight: torch.Tensor) -> torch.Tensor:
            if x.dtype == weight.dtype:
                grad = torch.empty_like(weight) if every_expert_used else torch.zeros_like(weight)
            else:
                grad = scratch.get(f"grad_{name}", weight, x.dtype)
                if not every_expert_used:
                    grad.zero_()  # experts that got no token
            return grad

        with torch.autocast(x.device.type, enabled=False):
            grad_activation = torch.empty_like(activation)
            grad_down = new_weight_grad("down", down)
            for expert, rows in runs:
                torch.mm(grad_out[rows], down_c[expert], out=grad_activation[rows])
                torch.mm(grad_out[rows].t(), activation[rows], out=grad_down[expert])
            # The two ops autograd would run for silu(gate) * up, on every expert's rows at once.
            gate, up = gate_and_up.chunk(2, dim=-1)
            grad_gate_and_up = torch.empty_like(gate_and_up)
            grad_gate, grad_up = grad_gate_and_up.chunk(2, dim=-1)
            torch.mul(grad_activation, F.silu(gate), out=grad_up)
            grad_gate.copy_(torch.ops.aten.silu_backward(grad_activation * up, gate))
            grad_x = torch.empty_like(x)
            grad_gate_up = new_weight_grad("gate_up", gate_up)
            for expert, rows in runs:
                torch.mm(grad_gate_and_up[rows].t(), x[rows], out=grad_gate_up[expert])
                torch.mm(grad_gate_and_up[rows], gate_up_c[expert], out=grad_x[rows])
        return grad_x, grad_gate_up.to(gate_up.dtype), grad_down.to(down.dtype), None, None
