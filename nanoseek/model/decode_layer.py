"""A decoder layer's decode step as one C++ call.

Decoding a few rows on CPU is bound by the Python between the ops as much as by the ops: a `small` MoE
layer's step took 241 us through its modules (module calls, views, splits, checks) and takes 174 us as
one call (hot loop; batch-1 `small` decodes 1.21x faster). When the engine turns this on
(`enable_fused_decode`), `DecoderLayer.forward` hands a decode or verify step over the paged cache to
`cpu_ops`' DecodeLayer, which runs the same ATen ops and fused kernels in the same order as the modules
would (so the same numbers: tests/test_decode_layer.py compares token ids and log-probs with ==), from
C++; `Transformer.forward` hands it all of its layers at once (`fused_decode_stack`, one C++ call:
12-layer nano model, plain decode step 624 -> 568 us). Every other case (training, prefill, long
contexts, GPUs, layers it cannot run, such as FP8 weights, or layers with forward hooks) runs the
modules.

The C++ object holds the layer's tensors, not copies: in-place updates (an optimizer step on a model the
engine shares with a trainer) reach it. It is rebuilt when anything it was built from is replaced: a
module, parameter, buffer or hook registered anywhere moves a counter (`_registrations`, checked at
every call), and what can change without a registration (a fused projection broken up by `.data =`,
MLA's absorbed copies and int8 expert scales remade after an in-place update) is compared by identity
(`_volatile`, ~1.5 us a layer, through the modules looked up at the last registration); only then is the
layer examined again (`_sources`).
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)
from torch.utils.hooks import RemovableHandle

from nanoseek.model import cpu_ops
from nanoseek.model.attention import (
    FUSED_MLA_MAX_SCORES,
    MultiHeadLatentAttention,
    decode_attention_kernels,
)
from nanoseek.model.kernels import onednn_from
from nanoseek.model.layers import (
    PANEL_MAX_ROWS,
    FusedProjection,
    Linear,
    RotaryAngles,
    SwiGLU,
    apply_rope_interleaved,
    few_row_range,
)
from nanoseek.model.moe import MoE

# layer -> its _Plan: outside the module, so that copying or pickling a model never meets a C++ object.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# How `cpu_ops.Product` runs a linear layer: F.linear, our `linear`, a oneDNN-packed weight, int8, fp32 panels.
PRODUCT_KINDS = {"f_linear": 0, "linear": 1, "packed": 2, "int8": 3, "panels": 4}


def product_of(module) -> tuple | None:
    """(kind, weight, bias, scale, plain) of a linear layer or fused projection as its forward runs it at
    inference (plain: the plain tensor of a weight packed in panels, see `packing.panel_product`), or None for one
    DecodeLayer cannot run (FP8, a broken-up fused projection...)."""
    if isinstance(module, FusedProjection):
        return (module.kind, module.weight, module.bias, module.scale, module.plain) if module.usable else None
    if type(module) is Linear:
        return "linear", module.weight, module.bias, None, None
    if type(module) is nn.Linear:
        return "f_linear", module.weight, module.bias, None, None
    decode_product = getattr(module, "decode_product", None)
    return decode_product() if decode_product is not None else None


def _products(modules) -> list[tuple] | None:
    products = [product_of(module) for module in modules]
    return None if any(p is None or p[0] not in PRODUCT_KINDS for p in products) else products


def _swiglu_products(mlp: SwiGLU) -> list[tuple] | None:
    return None if mlp.fused is None else _products([mlp.fused, mlp.down_proj])


HOOKED = "hooked"


def _sources(layer, dtype: torch.dtype) -> tuple | str | None:
    """Everything the layer's decode step reads, in a fixed order; None if DecodeLayer cannot run it,
    HOOKED while a module of the layer has forward hooks (they must see the modules run)."""
    if any(module._forward_hooks or module._forward_pre_hooks for module in layer.modules()):
        return HOOKED
    attention, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if any(n.weight.dtype != dtype for n in norms):
        return None
    if attention.fused is not None and attention.fused.usable:
        inputs = _products([attention.fused])
    elif isinstance(attention, MultiHeadLatentAttention):  # GQA rotates the fused queries and keys together
        inputs = _products(attention.fusable_projections())
    else:
        return None
    if inputs is None:
        return None
    if isinstance(attention, MultiHeadLatentAttention):
        absorbed = attention.kernel_weights()
        q_b = None if attention.q_lora_rank is None else _products([attention.q_b_proj])
        if absorbed is None or (attention.q_lora_rank is not None and q_b is None) or any(
            n.weight.dtype != dtype for n in (attention.kv_a_layernorm, getattr(attention, "q_a_layernorm", None)) if n is not None
        ):
            return None
        attention_sources = (absorbed, q_b and q_b[0], attention.kv_a_layernorm.weight,
                             attention.q_a_layernorm.weight if attention.q_lora_rank is not None else None)
    else:
        attention_sources = ()
    output = _products([attention.o_proj])
    if output is None:
        return None
    if isinstance(mlp, MoE):
        shared = None if mlp.shared_experts is None else _swiglu_products(mlp.shared_experts)
        stacks = mlp.experts.streamable_stacks(dtype)
        if stacks is None or (mlp.shared_experts is not None and shared is None):
            return None
        mlp_sources = ("moe", shared, stacks, mlp.experts.stream_panels(dtype), mlp.gate.weight,
                       mlp.gate.e_score_correction_bias)
    elif isinstance(mlp, SwiGLU):
        products = _swiglu_products(mlp)
        if products is None:
            return None
        mlp_sources = ("swiglu", products)
    else:
        return None
    return (norms[0].weight, norms[1].weight, inputs, attention_sources, output, mlp_sources)


def _same(a, b) -> bool:
    """Whether two `_sources` results hold the same objects."""
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a is b


def _product(spec: tuple):
    kind, weight, bias, scale, plain = spec
    return cpu_ops.load().Product(PRODUCT_KINDS[kind], weight, bias, scale, plain, PANEL_MAX_ROWS)


def _build(layer, sources: tuple):
    """A cpu_ops.DecodeLayer for `layer` from `_sources(layer, ...)`."""
    kernels = cpu_ops.load()
    norm_in, norm_post, inputs, attention_sources, output, (mlp_kind, *mlp_rest) = sources
    attention, mlp = layer.self_attn, layer.mlp
    plan = kernels.DecodeLayer()
    plan.input_norm, plan.post_norm = norm_in, norm_post
    plan.input_eps, plan.post_eps = layer.input_layernorm.eps, layer.post_attention_layernorm.eps
    if len(inputs) == 1:
        plan.fused_input = _product(inputs[0])
    else:
        plan.inputs = [_product(spec) for spec in inputs]
    plan.scale = attention.softmax_scale
    plan.o = _product(output[0])
    if isinstance(attention, MultiHeadLatentAttention):
        absorbed, q_b, kv_norm, q_norm = attention_sources
        plan.mla = True
        plan.input_sizes = attention.fused.sizes if len(inputs) == 1 else []
        plan.w_uk, plan.w_uv_t = absorbed
        if q_b is not None:
            plan.q_b, plan.q_norm, plan.q_eps = _product(q_b), q_norm, attention.q_a_layernorm.eps
        plan.kv_norm, plan.kv_eps = kv_norm, attention.kv_a_layernorm.eps
        plan.heads, plan.nope, plan.rope_dim = attention.num_heads, attention.qk_nope_head_dim, attention.qk_rope_head_dim
        plan.kv_rank, plan.interleaved = attention.kv_lora_rank, attention.apply_rope is apply_rope_interleaved
    else:
        plan.mla = False
        heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
        plan.input_sizes = [(heads + kv_heads) * dim, kv_heads * dim]
        plan.heads, plan.kv_heads, plan.head_dim = heads, kv_heads, dim
    if mlp_kind == "moe":
        shared, stacks, panels, router, bias = mlp_rest
        gate = mlp.gate
        plan.moe = True
        plan.has_mlp = shared is not None
        if shared is not None:
            plan.gate_up, plan.down = (_product(spec) for spec in shared)
        plan.router = router
        plan.router_bias = bias if gate.topk_method == "noaux_tc" else None
        plan.sigmoid, plan.group_top2 = gate.scoring_func == "sigmoid", gate.topk_method == "noaux_tc"
        plan.n_group, plan.topk_group, plan.top_k = gate.n_group, gate.topk_group, gate.top_k
        plan.normalize, plan.scaling = gate.norm_topk_prob, gate.routed_scaling_factor
        plan.stack_gate_up, plan.stack_down, *scales = stacks
        if scales:
            plan.stack_gate_up_scale, plan.stack_down_scale = scales
        if panels is not None:
            plan.stack_gate_up_panels, plan.stack_down_panels = panels
    else:
        plan.has_mlp = True
        plan.gate_up, plan.down = (_product(spec) for spec in mlp_rest[0])
    return plan


def enable_fused_decode(model: nn.Module, enabled: bool = True) -> None:
    """Let (or stop) every decoder layer of `model` run decode steps as one C++ call."""
    for module in model.modules():
        if hasattr(module, "fused_decode"):
            module.fused_decode = enabled


def _watched(layer) -> tuple:
    """The modules whose attributes `_volatile` reads (attention, the SwiGLU with a fused projection or
    None, the routed experts or None): replacing one is a registration, so they are looked up again
    only after one."""
    attention, mlp = layer.self_attn, layer.mlp
    if isinstance(mlp, MoE):
        return attention, mlp.shared_experts, mlp.experts
    return attention, mlp, None


def _volatile(watched: tuple, dtype: torch.dtype) -> tuple:
    """What may change under a built DecodeLayer without a module, parameter, buffer or hook being
    registered: fused projections broken up (`.data =`, `.to()`), MLA's absorbed copies and int8 expert
    scales remade after an in-place update."""
    attention, swiglu, experts = watched
    fused = tuple(f.weight if f is not None and f.usable else None for f in (attention.fused, getattr(swiglu, "fused", None)))
    absorbed = attention.kernel_weights() if isinstance(attention, MultiHeadLatentAttention) else ()
    stacks = experts.streamable_stacks(dtype) if experts is not None else ()
    return (*fused, *(absorbed or (None,)), *(stacks or (None,)))


def _registrations() -> tuple[int, int]:
    """Counters that move whenever any module, parameter, buffer (`_count_registration`) or hook
    (torch's handle ids) is registered anywhere."""
    return _registered, RemovableHandle.next_id


_registered = 0


def _count_registration(*_) -> None:
    global _registered
    _registered += 1


for _register in (register_module_module_registration_hook, register_module_parameter_registration_hook,
                  register_module_buffer_registration_hook):
    _register(_count_registration)


def fused_decode_step(layer, x: torch.Tensor, angles: RotaryAngles, cache, mask: torch.Tensor | None,
                      absorb: bool | None):
    """(output, routed-expert indices or None) of `layer` for this step through its DecodeLayer, or None
    where the modules must run it: no paged cache or mask, more queries than the attention kernels take
    (MLA: in all; grouped-query: per sequence), too many cached positions for the MLA kernel, naive MLA
    forced, autocast, or a layer it cannot run."""
    if not _step_applies(layer, x, cache, mask, absorb):
        return None
    plan = _layer_plan(layer, x.dtype)
    if plan is None:
        return None
    pools = cache.layers[layer.self_attn.layer_index]
    return plan(x, angles.cos, angles.sin, pools[0], pools[1], cache.write_slots, cache.read_slots, mask,
                *few_row_range(), onednn_from())


def fused_decode_stack(layers, x: torch.Tensor, angles: RotaryAngles, cache, mask: torch.Tensor | None,
                       absorb: bool | None):
    """(output, [routed-expert indices or None per layer]) of `layers` run one after the other as one
    C++ call (`cpu_ops.decode_layers`), or None where any of them must run on its own (see
    `fused_decode_step`, which then decides per layer). One call instead of one per layer saves the
    Python of each (~8 us: arguments, module call, checks), which is ~15% of a 12-layer nano model's
    decode step."""
    if not layers or not _step_applies(layers[0], x, cache, mask, absorb):
        return None
    plans, first_pools, second_pools = [], [], []
    for layer in layers:
        plan = _layer_plan(layer, x.dtype) if layer.fused_decode else None
        if plan is None:
            return None
        plans.append(plan)
        pools = cache.layers[layer.self_attn.layer_index]
        first_pools.append(pools[0])
        second_pools.append(pools[1])
    return cpu_ops.load().decode_layers(plans, x, angles.cos, angles.sin, first_pools, second_pools, cache.write_slots,
                                        cache.read_slots, mask, *few_row_range(), onednn_from())


def _step_applies(layer, x: torch.Tensor, cache, mask: torch.Tensor | None, absorb: bool | None) -> bool:
    """Whether this step may run as DecodeLayer calls at all (the same answer for every layer of a model)."""
    if absorb is False or not hasattr(cache, "write") or cache.dtype != x.dtype or torch.is_autocast_enabled("cpu"):
        return False
    is_mla = isinstance(layer.self_attn, MultiHeadLatentAttention)
    max_scores = FUSED_MLA_MAX_SCORES.get(x.dtype, 0) if is_mla else None
    return decode_attention_kernels(x, mask, max_scores) is not None  # the attention kernels' own limits


def _layer_plan(layer, dtype: torch.dtype):
    """The layer's DecodeLayer for `dtype` (built, or rebuilt when what it was built from changed), or
    None where the modules must run it."""
    registrations = _registrations()
    cached = _PLANS.get(layer)
    if cached is not None and cached.registrations == registrations and cached.dtype == dtype and cached.sources is not HOOKED:
        volatile = _volatile(cached.watched, dtype)  # the usual case: ~1.5 us
        if len(volatile) == len(cached.volatile) and all(map(operator.is_, volatile, cached.volatile)):
            return cached.plan
    watched = _watched(layer)
    volatile = _volatile(watched, dtype)
    sources = _sources(layer, dtype)  # hooks are looked for at every step while there are some
    if cached is None or not _same(cached.sources, sources):
        plan = None if sources is None or sources is HOOKED else _build(layer, sources)
    else:
        plan = cached.plan
    _PLANS[layer] = _Plan(registrations, dtype, watched, volatile, sources, plan)
    return plan


@dataclass
class _Plan:
    """A layer's DecodeLayer (None: the modules run it) and what it was built from."""

    registrations: tuple[int, int]
    dtype: torch.dtype
    watched: tuple
    volatile: tuple
    sources: tuple | str | None
    plan: object | None
