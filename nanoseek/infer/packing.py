"""fp32 weights packed in panels and bf16 weights packed for oneDNN: faster CPU inference.

PyTorch's CPU matmul reads a plain [out, in] weight poorly when only a few rows multiply it (every
decode step), and MKL's fp32 GEMM runs at a fraction of the core's rate for 8-64 rows. fp32 weights
go into panels of 32 outputs (`pack_panels`) multiplied by our own kernel (`cpu_ops.panel_linear`),
which beats oneDNN's product on a weight reordered into oneDNN's blocked layout (what the engine ran
until stop 27, itself 1.25x faster than the unpacked path at batch 1 and 1.9x with 16 requests of
`qwen2-small`) at every row count from 1 to 64 and is even with it up to 1,024 rows (figures at
`pack_panels`; `benchmarks/few_rows_linear.py` prints them side by side). bf16 weights take oneDNN's
blocked layout: the head at batch 1 5.6 -> 1.9 ms, a 512 x 512 expert 122 -> 87 us (one thread),
bit-identical results; fp32 results differ from F.linear's in summation order only.

`pack_model(model)` swaps, in place, every plain linear layer for a `PackedLinear` and every routed
expert stack for `PackedRoutedExperts` (forward hooks move with them; with the fused CPU kernels the
expert stacks stay unpacked, streamed by the routed-experts kernel), and packs the buffers of fused
projections. MLA's kv_b_proj stays as it is: the absorbed attention reads its weight directly, and
keeps its per-head split contiguous (`frozen_absorbed`, fp32 for bf16 models). A packed model is for
inference only: its weights must not change, and training it raises TrainingError; its `state_dict`
still holds ordinary tensors (fp32: the plain weights a packed layer keeps for prefill; bf16: converted
back on demand). A model that keeps training decodes inside
`packed_while(model)`, which packs its current weights and puts everything back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from nanoseek.errors import TrainingError
from nanoseek.model import cpu_ops
from nanoseek.model.attention import MultiHeadLatentAttention, absorbed_dtype
from nanoseek.model.kernels import compute_dtype
from nanoseek.model.layers import FEW_ROWS_NEVER, PANEL_MAX_ROWS, is_plain_linear, linear
from nanoseek.model.moe import RoutedExperts
from nanoseek.model.transformer import CausalLM

# dtype -> the row count oneDNN's blocked layout is chosen for (see pack_weight)
PACK_ROWS_HINT = {torch.float32: 16, torch.bfloat16: 1}


# How unpacked fp32 models run their few-row products in the engine (`nanoseek.model.layers.linear`)
# where the fused kernels are not built (with them, 1-4 rows always take `cpu_ops.rows_linear`):
# models whose weights take at most CACHE_RESIDENT_BYTES stay in this CPU's cache (32 MB L3) between
# decode steps, and F.linear's single call beats the transposed product at every row count; up to
# SINGLE_ROW_RESIDENT_BYTES it still wins for one row. In-process A/B of plain decoding with each
# layer's step as one call (`nanoseek.model.decode_layer`), 2 threads, F.linear against the transposed
# product: `nano` with 4 layers (8.8 MB) 1.22x at 1 row; 12 layers (20.5 MB) 1.27x at 1 row, even at 2;
# 24 layers (38 MB) 1.14x at 1 row, 0.89x at 4; 36 layers (56 MB) 0.93x at 1 row. (Before the fused
# decode layer the 20.5 MB model ran 0.91x with F.linear at 1 row: the Python between the ops let the
# OpenMP worker fall asleep during MKL's one-thread call.)
CACHE_RESIDENT_BYTES = 12 << 20
SINGLE_ROW_RESIDENT_BYTES = 40 << 20


def few_row_start(model: CausalLM) -> int:
    """From how many rows the engine's steps let `linear` take its transposed product for `model`."""
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size <= CACHE_RESIDENT_BYTES:
        return FEW_ROWS_NEVER
    return 2 if size <= SINGLE_ROW_RESIDENT_BYTES else 1


def worth_packing(dtype: torch.dtype) -> bool:
    """Whether matrices of this dtype are packed: bf16 (oneDNN's layout) and fp32 (panels)."""
    return dtype in (torch.bfloat16, torch.float32)


def packing_supported(model: CausalLM) -> bool:
    """bf16 weights on a CPU whose oneDNN has bf16 kernels, or fp32 weights on a CPU where the fused
    kernels are built (the panels' product is one of them)."""
    weight = model.model.embed_tokens.weight
    if weight.device.type != "cpu":
        return False
    if weight.dtype == torch.float32:
        return cpu_ops.load() is not None
    return weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] fp32 or bf16 weight in oneDNN's blocked layout (an opaque mkldnn tensor), laid out
    for PACK_ROWS_HINT rows. fp32's layout for 16 rows was, on the 2-core EPYC, as fast as or faster
    than the layouts for 1 and for 64 rows at every row count from 1 to 64; for bf16, 16 rows gave
    nothing over 1 in decoding (0.92-1.03x)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS_HINT[weight.dtype])


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight packed by `pack_weight`; in x's dtype. Activations of
    another dtype (bf16 from autocast around an fp32 model) are computed in the weight's dtype."""
    if x.dtype != packed.dtype:
        bias = None if bias is None else bias.to(packed.dtype)
        return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "").to(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """An fp32 [out, in] weight in panels of 32 outputs, [ceil(out / 32), in, 32] (zeros past the last
    output), for `cpu_ops.panel_linear`: input k of a panel's 32 outputs is two contiguous vectors, which
    the kernel multiplies by a broadcast input value for each of up to 8 rows at a time, sums in
    registers, no horizontal adds. Measured against oneDNN's product on a weight packed in its own
    layout (2 threads, weights cold; `benchmarks/few_rows_linear.py`): 2816 x 512 at 1 / 2 / 16 / 64
    rows 79 / 77 / 165 / 432 us against 97 / 97 / 185 / 432; 512 x 1408 43 / 48 / 83 / 221 against
    52 / 61 / 117 / 234; the 32000 x 512 head 0.85 / 0.89 / 1.76 / 4.86 ms against 0.86 / 0.95 / 1.86
    / 4.86; `qwen2-nano`'s small matrices at GRPO's 64 rows, one thread, 1.2-2.4x (oneDNN's call costs
    ~11 us whatever the size)."""
    return pack_expert_panels(weight[None])[0]


def pack_expert_panels(stack: torch.Tensor) -> torch.Tensor:
    """`pack_panels` for each expert of a stack [E, out, in] (fp32 or bf16): [E, ceil(out / 32), in, 32], as the
    routed-experts kernel streams them (each panel one sequential run of memory: `small`'s layer of 4
    experts for one token 118 -> 92 us, 16 tokens 1,072 -> 708 us, 2 threads, weights cold)."""
    experts, out_features, in_features = stack.shape
    count = -(-out_features // 32)
    padded = torch.nn.functional.pad(stack.detach(), (0, 0, 0, count * 32 - out_features))
    return padded.view(experts, count, 32, in_features).transpose(2, 3).contiguous()


def panel_product(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, plain: torch.Tensor) -> torch.Tensor:
    """F.linear(x, plain, bias) for an fp32 weight also laid out in `panels` (`pack_panels`): steps of up
    to PANEL_MAX_ROWS rows take `cpu_ops.panel_linear`, more rows (or the kernels turned off) `linear` on
    the plain weight. Activations of another dtype (bf16 under autocast) are computed in fp32."""
    if x.dtype != torch.float32:
        return panel_product(x.float(), panels, bias, plain).to(x.dtype)
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if 1 <= rows <= PANEL_MAX_ROWS and (kernels := cpu_ops.for_inference(x)) is not None:
        return kernels.panel_linear(x, panels, plain.shape[0], bias)
    return linear(x, plain, bias)


def _refuse_training(module: nn.Module) -> None:
    if module.training and torch.is_grad_enabled():
        raise TrainingError(
            "this model's weights were packed for inference (Engine(..., pack_weights=True), the default) and "
            "cannot be trained; build the engine with pack_weights=False for a model that keeps training"
        )


class PackedLinear(nn.Module):
    """Inference-only drop-in for an fp32 or bf16 `nn.Linear` (training it raises TrainingError)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # fp32: panels for decode steps and the plain tensor itself (not a copy) for prefill, so an fp32
        # engine holds its matrices twice (a tied output head shares the embedding's plain tensor)
        self.plain_weight = weight.contiguous() if weight.dtype == torch.float32 else None
        self.packed_weight = pack_panels(weight) if self.plain_weight is not None else pack_weight(weight)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.packed_weight.to_dense() if self.plain_weight is None else self.plain_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_training(self)
        if self.plain_weight is not None:
            return panel_product(x, self.packed_weight, self.bias, self.plain_weight)
        return packed_linear(x, self.packed_weight, self.bias)

    def decode_product(self) -> tuple:
        """(kind, packed weight, bias, None, plain weight): how `forward` runs, for `nanoseek.model.decode_layer`."""
        if self.plain_weight is not None:
            return "panels", self.packed_weight, self.bias, None, self.plain_weight
        return "packed", self.packed_weight, self.bias, None, None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


class PackedRoutedExperts(RoutedExperts):
    """`RoutedExperts` for CPU inference; routing and token grouping are inherited.

    With the fused CPU kernels (`nanoseek.model.cpu_ops`) the stacks stay as they are, shared with the
    model's parameters (no copy): the routed-experts kernel streams them (fp32 at any token count, bf16
    up to EXPERT_KERNEL_MAX_TOKENS; figures in nanoseek.model.moe), and larger bf16 steps multiply
    each expert's matrices unpacked (prefill of 512 tokens: 4.9 ms per `small` layer against 4.6 ms
    packed). fp32 and bf16 stacks are also laid out in panels (`pack_expert_panels`), which the kernel
    streams instead: a second copy of the experts, as fp32 linears keep theirs. Without the kernels each
    expert's two matrices are packed, and steps where most experts
    are busy (a decode batch of 16 requests on `small`'s 32 experts) run every expert in one pair of
    matmuls over all experts' matrices side by side, packed on first use (a second copy of the experts:
    only models with small experts whose batches get there pay for it)."""

    def __init__(self, experts: RoutedExperts, all_at_once: bool = True):
        nn.Module.__init__(self)  # not RoutedExperts.__init__: it would allocate the float stacks
        self.num_experts = experts.num_experts
        self.intermediate_size = experts.down_proj.shape[-1]
        self.stacks = experts.gate_up_proj.detach().contiguous(), experts.down_proj.detach().contiguous()
        self.streamed = cpu_ops.load() is not None
        if self.streamed:
            self.linear, self.per_expert = linear, self.stacks
            if self.stacks[0].dtype in (torch.float32, torch.bfloat16):
                self.panels = tuple(pack_expert_panels(stack) for stack in self.stacks)
        else:  # the inherited per-expert loop calls self.linear with these
            self.linear = packed_linear
            self.per_expert = tuple([pack_weight(weight) for weight in stack] for stack in self.stacks)
        self.side_by_side: tuple[torch.Tensor, torch.Tensor] | None = None
        self.all_at_once = all_at_once

    def expert_weights(self):
        _refuse_training(self)
        return self.per_expert

    def weights_require_grad(self) -> bool:
        return False  # never trained

    def streamable_stacks(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...] | None:
        return self.stacks if self.streamed and self.stacks[0].dtype == dtype else None

    def expert_bytes(self) -> int:
        return (self.stacks[0][0].numel() + self.stacks[1][0].numel()) * self.stacks[0].element_size()

    def expert_dtype(self) -> torch.dtype:
        return self.stacks[0].dtype

    def all_experts_forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Every expert on every token; the gate weights (zero for experts a token did not choose) scale
        the hidden activations, so the down projection also sums each token's experts."""
        _refuse_training(self)
        tokens, experts, hidden = x.shape[0], self.num_experts, self.intermediate_size
        if self.side_by_side is None:
            gate_up, down = self.stacks
            self.side_by_side = (pack_weight(gate_up.reshape(experts * 2 * hidden, -1)),  # [E * 2I, D]
                                 pack_weight(down.permute(1, 0, 2).reshape(-1, experts * hidden)))  # [D, E * I]
        gate_up, down = self.side_by_side
        projected = packed_linear(x.to(compute_dtype(x)), gate_up).view(tokens, experts, 2, hidden)
        activations = self.gated_activations(projected, weights, indices)
        return packed_linear(activations.view(tokens, experts * hidden), down)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "gate_up_proj"], destination[prefix + "down_proj"] = self.stacks


# A replaced module's forward hooks move to its packed replacement (the same dicts, so handles still work).
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


@torch.no_grad()
def pack_model(model: CausalLM) -> int:
    """Pack `model`'s fp32/bf16 linear and expert weights in place (see the module docstring); returns
    how many modules were replaced. A no-op (0) where `packing_supported` is False."""
    return len(_pack(model)[0])


@contextlib.contextmanager
def packed_while(model: CausalLM) -> Iterator[None]:
    """Pack `model` for the block and put every original module, buffer and setting back after it: how
    a model that keeps training decodes with packed weights (GRPO's rollouts). The packed copies are
    made from the weights as they are on entry, a copy of every packed weight each time. A no-op under
    CPU autocast: packed kernels ignore it, and rollouts must run the arithmetic the trainer runs."""
    if torch.is_autocast_enabled("cpu"):
        yield
        return
    replaced, settings = _pack(model, all_at_once=False)  # a side-by-side copy would be rebuilt every rollout
    try:
        yield
    finally:
        for parent, child, original in replaced:
            setattr(parent, child, original)
        for owner, values in settings:
            owner.__dict__.update(values)


@torch.no_grad()
def _pack(model: CausalLM, all_at_once: bool = True) -> tuple[list, list]:
    """Pack in place; returns (parent, name, original module) per replaced module and (object, its
    previous attribute values) per changed fused projection or attention layer, to undo it."""
    if not packing_supported(model):
        return [], []
    settings = []
    covered = set()  # the parameter dicts of linears whose fused projection is packed: they never run alone
    for module in model.modules():
        fused = getattr(module, "fused", None)
        if fused is not None and fused.kind == "linear" and worth_packing(fused.weight.dtype):
            settings.append((fused, {key: getattr(fused, key)
                                     for key in ("weight", "linear", "kind", "plain", "parameter_slots", "pointers")}))
            covered.update(id(parameters) for parameters, _ in fused.parameter_slots)
            if fused.weight.dtype == torch.float32:
                fused.plain = fused.weight
                fused.weight, fused.linear, fused.kind = pack_panels(fused.weight), panel_product, "panels"
            else:
                fused.weight, fused.linear, fused.kind = pack_weight(fused.weight), packed_linear, "packed"
            fused.parameter_slots, fused.pointers = [], []  # packed weights are frozen: no checks needed
        if isinstance(module, MultiHeadLatentAttention):
            settings.append((module, {"frozen_absorbed": module.frozen_absorbed}))
            weight = module.kv_b_proj.weight
            compute = absorbed_dtype(weight.dtype, weight.device)
            module.frozen_absorbed = tuple(w.contiguous() for w in module.absorbed_weights(compute))
    replaced = []
    for name, module in list(model.named_modules()):
        if id(module._parameters) in covered:
            continue
        if is_plain_linear(module) and not name.endswith("kv_b_proj") and worth_packing(module.weight.dtype):
            new: nn.Module = PackedLinear(module)
        elif type(module) is RoutedExperts and worth_packing(module.gate_up_proj.dtype):
            new = PackedRoutedExperts(module, all_at_once)
        else:
            continue
        for hooks in _HOOK_DICTS:
            setattr(new, hooks, getattr(module, hooks))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced.append((parent, child, module))
    return replaced, settings
