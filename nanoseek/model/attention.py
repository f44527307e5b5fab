"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) and grouped-query attention (Qwen2/Llama).

Both take `x` [batch, seq, hidden], the rotary angles of the positions, and optionally a KV cache
plus a boolean mask [batch, 1, seq, kv_len] (True = may attend). Without a cache they run causal
self-attention over `x` (training and full-sequence scoring), within packed documents when the mask
is a `DocumentMask` (SFT's packed conversations).

A KV cache is any object with
    update(layer_index, positions, kv_length, *entries) -> tuple of tensors [batch, kv_length, ...]
that stores the per-token `entries` ([batch, seq, ...]) at slots `positions` ([batch, seq]) and
returns everything cached for slots 0..kv_length-1. MLA caches (normalized latent, rotated k_pe);
GQA caches (rotated keys, values). See `nanoseek.model.cache.StaticKVCache`.
"""

from __future__ import annotations

import functools
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model import cpu_ops
from nanoseek.model.layers import (
    FusedProjection,
    Linear,
    RMSNorm,
    RotaryAngles,
    apply_rope_half,
    apply_rope_interleaved,
    is_plain_linear,
)


class KVCache(Protocol):
    def update(
        self, layer_index: int, positions: torch.Tensor, kv_length: int, *entries: torch.Tensor
    ) -> tuple[torch.Tensor, ...]: ...


# Largest [batch, heads, queries, keys] score tensor the eager path materializes (fp32: 256 MB).
EAGER_ATTENTION_MAX_SCORES = 1 << 26
# Grouped-query attention takes its fused CPU kernel up to this many queries per sequence (a decode or
# verify step), in any batch: it splits sequences (or one sequence's KV heads) over the threads.
FUSED_ATTENTION_MAX_QUERIES = 4
# MLA takes its kernel up to this many queries in a batch and FUSED_MLA_MAX_SCORES (query, cached
# position) pairs in all; it splits the sequences (one sequence: its heads' products with W_UK and
# W_UV) over the threads. Beyond, the batched matmuls' GEMMs win. Whole decode steps of `small`,
# kernel against the matmuls (2 threads): fp32 1 x 900 cached positions 2.24x, 1 x 3,000 1.18x,
# 4 x 600 1.47x, 8 x 120 1.23x, 16 x 120 1.08x, 16 x 300 0.98x, 4 x 900 0.84x; bf16 1 x 3,000 1.51x,
# 8 x 500 1.15x, 16 x 400 1.17x (a bf16 cache costs the matmuls a conversion of every cached row).
# The 16-request `benchmarks/decode.py` row: 947 -> 1,032 tok/s, 8 requests 644 -> 747.
FUSED_MLA_MAX_QUERIES = 16
FUSED_MLA_MAX_SCORES = {torch.float32: 4096, torch.bfloat16: 8192, torch.float16: 8192}
# The grouped-query kernel has no such limit: reading keys and values where they lie in the paged
# pool, it beats gathering the history and SDPA at every length measured (`qwen2-small`, fp32, whole
# decode steps: 1 request 1.00x at 64 cached positions, 1.02x at 900, 0.98x at 3,500 (there both read
# the cache from memory); 16 requests 1.15x at 64-128, 1.23x at 900; 64 requests 1.15x; bf16 16
# requests 1.15-1.31x; the kernel alone, cache in L3: 4-6x).


def decode_attention_kernels(query: torch.Tensor, mask: torch.Tensor | None, max_scores: int | None):
    """The fused CPU kernels if the attention of `query` [b, s, ...] may take them: a mask given (decode
    or verify), no gradient, CPU, and either (MLA, `max_scores` given) at most FUSED_MLA_MAX_QUERIES
    queries and `max_scores` (query, cached position) pairs in all, or (grouped-query, None) at most
    FUSED_ATTENTION_MAX_QUERIES queries per sequence; else None."""
    if mask is None:
        return None
    if max_scores is None:
        if query.shape[1] > FUSED_ATTENTION_MAX_QUERIES:
            return None
    else:
        queries = query.shape[0] * query.shape[1]
        if queries > FUSED_MLA_MAX_QUERIES or queries * mask.shape[-1] > max_scores:
            return None
    return cpu_ops.for_inference(query)


# Causal self-attention in fp32 on CPU takes the fused kernel up to this many positions (forward +
# backward against SDPA, one thread: `qwen2-nano` 64 x 74 x 4/2 heads x 24, 11.4 -> 4.7 ms; `nano`'s MLA
# 16 x 256 x 4 heads x 48/32, 41 -> 16 ms; 4 x 1,024, 2.8x; 1 x 2,048 x 8/2 heads x 64, 0.9x).
FUSED_CAUSAL_MAX_LENGTH = 1024


class DocumentMask:
    """Causal attention within packed documents: position i attends to j <= i of the same document.

    Built from document ids [batch, seq] (SFT packs several conversations into a row) and optionally
    `prefix` [batch, seq, 2]: a range [begin, end) of earlier positions each position sees as well, an
    earlier document it shares (empty where begin == end; the same for every position of a document,
    and it ends before the document: GRPO runs a prompt once and each of its completions as a document
    that sees it; the fused kernel refuses a range that varies within a document). `dense` is the
    boolean [batch, 1, seq, seq] mask for the PyTorch paths; `starts` [batch, seq] the first position
    of each position's document, for the fused kernel (which then scores only keys from there and the
    prefix: the work goes with the documents' lengths), or None when an id comes back after another
    document's (not a packed layout; the dense mask still applies).
    """

    def __init__(self, document_ids: torch.Tensor, prefix: torch.Tensor | None = None):
        self.document_ids, self.prefix = document_ids, prefix

    @functools.cached_property
    def dense(self) -> torch.Tensor:
        ids = self.document_ids
        causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool, device=ids.device).tril()
        seen = causal & (ids[:, :, None] == ids[:, None, :])
        if self.prefix is not None:
            keys = torch.arange(ids.shape[1], device=ids.device)
            seen |= (keys >= self.prefix[:, :, :1]) & (keys < self.prefix[:, :, 1:])
        return seen[:, None]

    @functools.cached_property
    def starts(self) -> torch.Tensor | None:
        ids = self.document_ids
        begins = torch.ones_like(ids, dtype=torch.bool)
        begins[:, 1:] = ids[:, 1:] != ids[:, :-1]
        ordered = ids.sort(dim=1).values
        distinct = (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1) + 1
        if not torch.equal(begins.sum(dim=1), distinct):  # some id in two runs
            return None
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return torch.where(begins, positions, 0).cummax(dim=1).values.contiguous()

    @functools.cached_property
    def longest(self) -> int:
        """The most keys a position sees (with `starts`: its document so far and its prefix; else the
        row length)."""
        if self.starts is None:
            return self.document_ids.shape[1]
        seen = torch.arange(self.starts.shape[1], device=self.starts.device) - self.starts + 1
        if self.prefix is not None:
            seen = seen + (self.prefix[..., 1] - self.prefix[..., 0]).clamp_min(0)
        return int(seen.max())

    def narrow(self, length: int) -> DocumentMask:
        """The mask of the first `length` positions (MTP depths run on shortened sequences)."""
        prefix = None if self.prefix is None else self.prefix[:, :length]
        return DocumentMask(self.document_ids[:, :length], prefix)


def dense_mask(mask: torch.Tensor | DocumentMask | None) -> torch.Tensor | None:
    """A boolean mask tensor (or None for plain causal attention) from any mask an attention gets."""
    return mask.dense if isinstance(mask, DocumentMask) else mask


def fused_documents(device: torch.device, dtype: torch.dtype, longest: int) -> bool:
    """Whether causal attention over packed documents (none longer than `longest`) in this device and
    compute dtype takes the fused kernel, whose work goes with the documents' lengths: callers may then
    pack rows of different lengths into one long sequence instead of padding them (elsewhere SDPA
    would score the packed sequence's length squared)."""
    return (device.type == "cpu" and dtype == torch.float32 and longest <= FUSED_CAUSAL_MAX_LENGTH
            and not torch.is_autocast_enabled("cpu") and cpu_ops.for_cpu(torch.empty(0)) is not None)


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                     documents: DocumentMask | None = None) -> torch.Tensor | None:
    """softmax(scale q k^T, causal) v over [batch, seq, heads, dim] tensors (keys and values with fewer
    heads for grouped-query attention, values with their own dim), by the fused CPU kernel
    (`cpu_ops.causal_attention_forward`), differentiable; within packed `documents`; None where the
    kernel does not apply (not plain fp32 CPU tensors, longer than FUSED_CAUSAL_MAX_LENGTH (the longest
    document when packed), documents not packed in runs, compiling, kernels off)."""
    longest = query.shape[1] if documents is None else documents.longest
    if (longest > FUSED_CAUSAL_MAX_LENGTH or torch.compiler.is_compiling()
            or documents is not None and documents.starts is None
            or not query.dtype == key.dtype == value.dtype == torch.float32
            or any(type(t) is not torch.Tensor or t.stride(-1) != 1 for t in (query, key, value))
            or (kernels := cpu_ops.for_cpu(query)) is None):
        return None
    starts, prefix = (None, None) if documents is None else (documents.starts, documents.prefix)
    if not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)):
        return kernels.causal_attention_forward(query, key, value, scale, starts, prefix)[0]
    return _CausalAttention.apply(query, key, value, scale, (starts, prefix), kernels)


class _CausalAttention(torch.autograd.Function):
    """The fused kernel's forward (keeping the log-sum-exp of each row's scores) and backward (which
    recomputes the probabilities from it, as flash attention does)."""

    @staticmethod
    def forward(ctx, query, key, value, scale, documents, kernels):
        out, log_sum_exp = kernels.causal_attention_forward(query, key, value, scale, *documents)
        ctx.save_for_backward(query, key, value, out, log_sum_exp)
        ctx.scale, ctx.documents, ctx.kernels = scale, documents, kernels
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, log_sum_exp = ctx.saved_tensors
        grads = ctx.kernels.causal_attention_backward(query, key, value, out, log_sum_exp, grad_out, ctx.scale, *ctx.documents)
        return *grads, None, None, None


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    mask: torch.Tensor | DocumentMask | None,
    num_kv_groups: int = 1,
) -> torch.Tensor:
    """Scaled dot-product attention over [batch, heads, seq, dim] tensors; causal when mask is None.

    Causal self-attention in fp32 on CPU takes the fused kernel (`causal_attention`), within packed
    documents too (a `DocumentMask`: SDPA would take the dense mask and score every pair).
    Grouped keys/values are shared by `num_kv_groups` query heads inside the kernel (`enable_gqa`)
    rather than copied per head: 1.5-3x faster for Qwen2-shaped models on CPU, forward and backward.
    Multi-head attention on CPU in bf16/fp16 with several queries takes `_attend_eager` (see there).
    """
    batch, heads, queries, _ = query.shape
    keys = key.shape[-2]
    documents = mask if isinstance(mask, DocumentMask) else None
    if (mask is None or documents is not None) and queries == keys and query.device.type == "cpu" and (
        out := causal_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale, documents)
    ) is not None:
        return out.transpose(1, 2)
    mask = dense_mask(mask)
    if (
        query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16) and num_kv_groups == 1
        and queries > 1 and (mask is not None or queries == keys)
        and batch * heads * queries * keys <= EAGER_ATTENTION_MAX_SCORES
    ):
        return _attend_eager(query, key, value, scale, mask)
    if num_kv_groups > 1 and queries == 1 and mask is not None:
        # Decoding: each key/value head's query heads become its query rows (the mask is one row per
        # sequence, so it applies to all of them). On CPU the kernel's cost goes with batch x heads:
        # 16 rows x 8 heads (2 KV heads) x 150 keys, fp32 0.31 -> 0.17 ms, bf16 2.1 -> 0.24 ms.
        folded = query.reshape(batch, key.shape[1], num_kv_groups, query.shape[-1])
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scale)
        return out.reshape(batch, heads, 1, value.shape[-1])  # CUDA SDPA may hand it back strided
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=num_kv_groups > 1
    )


def _attend_eager(query, key, value, scale, mask) -> torch.Tensor:
    """Attention as two batched matmuls in the input dtype around an fp32 softmax.

    On CPU in bf16, SDPA computes in fp32 (its math path, the only one when the value head dim differs
    from the query's, as in MLA): forward + backward of one `small`-preset MLA layer, batch 4 x 256,
    takes 23-30 ms with SDPA and 15-20 ms here.
    """
    if mask is None:  # causal self-attention
        mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale).masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1).to(value.dtype), value)


def absorbed_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype inference-only absorbed attention computes in (`frozen_absorbed`): fp32 for bf16/fp16
    on CPU, where each small batched matmul of a decode step costs 2-3x fp32's (oneDNN's per-call
    overhead: 17-40 vs 6-20 us with a 130-token cache; `small` in bf16 decodes 1.14x faster); the
    weights' dtype elsewhere."""
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


class MultiHeadLatentAttention(nn.Module):
    """MLA (V2 paper §2.1, V3 report eq. 1-11).

    Keys and values are compressed into a per-token latent c_kv (kv_lora_rank values) plus one
    rotary key k_pe shared by all heads; only those two are cached. Queries are optionally
    compressed too (q_lora_rank; V2-Lite has none). Two equivalent execution paths:

    * naive: expand the latent with kv_b_proj into per-head keys and values, then ordinary
      attention. Cheaper when many queries attend (training, prefill).
    * absorbed: fold W_UK into the query and W_UV into the output so attention runs directly
      over the cached latent, as multi-query attention with head dim kv_lora_rank + rope dim.
      Cheaper when few queries attend to a long cache (decoding).
    """

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        qk_head_dim = config.qk_head_dim
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = Linear(config.hidden_size, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(
            config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias
        )
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=bias)
        interleaved = config.rope_interleave or config.model_type == "deepseek_v2"
        self.apply_rope = apply_rope_interleaved if interleaved else apply_rope_half
        # Set by the model from its RotaryEmbedding: qk_head_dim^-0.5 * YaRN mscale^2 (fact 1 of the
        # reference: 192^-0.5 * 1.874 for V3, in both execution paths).
        self.softmax_scale = qk_head_dim**-0.5
        self.frozen_absorbed: tuple[torch.Tensor, torch.Tensor] | None = None  # see absorbed_weights
        self.kernel_copies: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # see kernel_weights
        self.fused: FusedProjection | None = None  # q (or q_a) + kv_a, set by the inference engine

    def fusable_projections(self) -> list[nn.Linear]:
        """The projections of the layer input: the query's first one and the KV compression."""
        return [self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa]

    def project_query(self, first: torch.Tensor, angles: RotaryAngles) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head query split as [nope | rope]: q_nope [b, s, h, nope], rotated q_pe [b, s, h, rope].

        `first` is the output of the query's first projection (q_proj, or q_a_proj with a q LoRA).
        """
        q = first if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(first))
        q = q.unflatten(-1, (self.num_heads, -1))
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, self.apply_rope(q_pe, angles)

    def compress_kv(self, compressed: torch.Tensor, angles: RotaryAngles) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores per token, from kv_a_proj_with_mqa's output: the normalized latent
        [b, s, r] and rotated k_pe [b, s, rope]."""
        latent, k_pe = compressed.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(latent), self.apply_rope(k_pe, angles)

    def forward(
        self,
        x: torch.Tensor,
        angles: RotaryAngles,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        if self.fused is not None and self.fused.usable:
            first, compressed = self.fused(x).split(self.fused.sizes, dim=-1)
        else:
            first, compressed = (projection(x) for projection in self.fusable_projections())
        q_nope, q_pe = self.project_query(first, angles)
        latent, k_pe = self.compress_kv(compressed, angles)
        if cache is not None and absorb is not False:
            if (out := self.attend_from_pool(q_nope, q_pe, latent, k_pe, cache, mask)) is not None:
                return self.o_proj(out.flatten(2))
        if cache is not None:
            latent, k_pe = cache.update(self.layer_index, positions, mask.shape[-1], latent, k_pe)
        if absorb is None:
            absorb = self.absorb_is_cheaper(x.shape[1], latent.shape[1])
        attend = self.attend_absorbed if absorb else self.attend_naive
        return self.o_proj(attend(q_nope, q_pe, latent, k_pe, mask).flatten(2))

    def attend_naive(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Expand the latent into per-head k_nope and v, then standard attention. Returns [b, s, h, v]."""
        kv = self.kv_b_proj(latent).unflatten(-1, (self.num_heads, -1))
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, self.num_heads, -1)), dim=-1)
        query = torch.cat((q_nope, q_pe), dim=-1)
        out = _attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.softmax_scale, mask)
        return out.transpose(1, 2)

    def attend_absorbed(self, q_nope, q_pe, latent, k_pe, mask) -> torch.Tensor:
        """Attention in latent space: score = q_nope W_UK . c + q_pe . k_pe; out = W_UV (p @ c). [b, s, h, v].

        Multi-query attention over the one latent per token: heads fold into the query rows, so each
        step reads the cache once for all heads. Plain batched matmuls: for the few queries of a decode
        step they cost less than a fused attention kernel's setup. Computed in the dtype of the frozen
        weights when there are some (fp32 for a packed bf16 model: `absorbed_dtype`), cast back after.
        """
        dtype, mask = q_nope.dtype, dense_mask(mask)
        if latent.dtype == dtype and (fused := self.decode_kernels(q_nope, mask)) is not None:
            kernels, weights = fused
            return kernels.mla_decode_attention(q_nope, q_pe, latent, k_pe, None, mask, *weights, self.softmax_scale)
        compute = dtype if self.frozen_absorbed is None else self.frozen_absorbed[0].dtype
        if compute != dtype:
            q_nope, q_pe, latent, k_pe = (t.to(compute) for t in (q_nope, q_pe, latent, k_pe))
        batch, seq, heads, _ = q_nope.shape
        w_uk, w_uv_t = self.absorbed_weights(compute)
        rows = q_nope.permute(2, 0, 1, 3).reshape(heads, batch * seq, -1)  # [h, b*s, nope]
        q_latent = torch.bmm(rows, w_uk)  # [h, b*s, r]
        q_latent = q_latent.view(heads, batch, seq, -1).transpose(0, 1).reshape(batch, heads * seq, -1)
        q_pe = q_pe.transpose(1, 2).reshape(batch, heads * seq, -1)
        scores = torch.baddbmm(
            torch.bmm(q_pe, k_pe.transpose(1, 2)), q_latent, latent.transpose(1, 2),
            beta=self.softmax_scale, alpha=self.softmax_scale,
        ).view(batch, heads, seq, -1)  # [b, h, s, t]
        if mask is None:
            mask = torch.ones(seq, latent.shape[1], dtype=torch.bool, device=scores.device).tril()
        probs = scores.masked_fill(~mask, float("-inf")).float().softmax(dim=-1).to(latent.dtype)
        out_latent = torch.bmm(probs.view(batch, heads * seq, -1), latent)  # [b, h*s, r]
        out_latent = out_latent.view(batch, heads, seq, -1).transpose(0, 1).reshape(heads, batch * seq, -1)
        out = torch.bmm(out_latent, w_uv_t.to(out_latent.dtype))  # [h, b*s, v]
        return out.view(heads, batch, seq, -1).permute(1, 2, 0, 3).to(dtype)

    def decode_kernels(self, q_nope: torch.Tensor, mask: torch.Tensor | None):
        """(the fused CPU kernels, their absorbed weights) when the absorbed attention of these queries
        may take them: a decode or verify step (few queries) over a cache of modest length, no
        gradient; else None."""
        kernels = decode_attention_kernels(q_nope, mask, FUSED_MLA_MAX_SCORES.get(q_nope.dtype, 0))
        if kernels is None or (weights := self.kernel_weights()) is None:
            return None
        return kernels, weights

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W_UK, W_UV transposed) contiguous in fp32, as the fused kernel reads them: the frozen ones of a
        packed model, or, for a model that is not packed (engines sharing a trainer's model, fp32
        models where the fused kernels are not built), copies kept until kv_b_proj's weight changes (an optimizer step or
        a load bumps its version; `.data =` or `.to()` moves it). None for a quantized kv_b_proj."""
        if self.frozen_absorbed is not None:
            return self.frozen_absorbed if self.frozen_absorbed[0].dtype == torch.float32 else None
        if not is_plain_linear(self.kv_b_proj):
            return None
        weight = self.kv_b_proj.weight
        key = (weight.data_ptr(), weight._version, weight.dtype)
        if self.kernel_copies is None or self.kernel_copies[0] != key:
            self.kernel_copies = key, tuple(w.contiguous() for w in self.absorbed_weights(torch.float32))
        return self.kernel_copies[1]

    def attend_from_pool(self, q_nope, q_pe, latent, k_pe, cache, mask) -> torch.Tensor | None:
        """`attend_absorbed` by the fused CPU kernel reading the latent cache where it lies in a paged
        cache's pool: no gathered copy of every cached row per layer per step, which grows with the
        context. [b, s, h, v], or None (nothing stored) where it does not apply."""
        if not hasattr(cache, "write") or cache.dtype != q_nope.dtype or (fused := self.decode_kernels(q_nope, mask)) is None:
            return None
        kernels, weights = fused
        latent_pool, pe_pool = cache.write(self.layer_index, latent, k_pe)
        return kernels.mla_decode_attention(
            q_nope, q_pe, latent_pool, pe_pool, cache.read_slots, mask, *weights, self.softmax_scale
        )

    def absorbed_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [h, nope, r], W_UV transposed [h, r, v]) from kv_b_proj in `dtype`.

        An inference-only model keeps them contiguous in `frozen_absorbed`, in `absorbed_dtype`
        (`nanoseek.infer.packing`): otherwise every call would copy a strided or converted operand.
        """
        if self.frozen_absorbed is not None and self.frozen_absorbed[0].dtype == dtype:
            return self.frozen_absorbed
        weight = self.kv_b_proj.weight
        w_uk, w_uv = weight.unflatten(0, (self.num_heads, -1)).split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        return w_uk.to(dtype), w_uv.to(dtype).transpose(1, 2)  # views: fp32 bmm reads them as they are

    def absorb_is_cheaper(self, num_queries: int, num_keys: int) -> bool:
        """Compare the multiply-adds of both paths (per head) for this query/key count."""
        r, nope, rope, v = self.kv_lora_rank, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        naive = num_keys * r * (nope + v) + num_queries * num_keys * (nope + rope + v)
        absorbed = num_queries * (nope * r + num_keys * (2 * r + rope) + r * v)
        return absorbed < naive


class GroupedQueryAttention(nn.Module):
    """Qwen2/Llama attention: num_key_value_heads shared by groups of query heads, NeoX-style RoPE."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        qkv_bias = config.model_type == "qwen2" or config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=config.model_type == "llama" and config.attention_bias
        )
        self.softmax_scale = self.head_dim**-0.5
        self.fused: FusedProjection | None = None  # q + k + v, set by the inference engine

    def fusable_projections(self) -> list[nn.Linear]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def forward(
        self,
        x: torch.Tensor,
        angles: RotaryAngles,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        if self.fused is not None and self.fused.usable:  # queries and keys rotated together
            query_key, value = self.fused(x).split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
            query, key = apply_rope_half(query_key.unflatten(-1, (heads + kv_heads, dim)), angles).split([heads, kv_heads], dim=2)
        else:
            query = apply_rope_half(self.q_proj(x).unflatten(-1, (heads, dim)), angles)
            key = apply_rope_half(self.k_proj(x).unflatten(-1, (kv_heads, dim)), angles)
            value = self.v_proj(x)
        value = value.unflatten(-1, (kv_heads, dim))
        if cache is not None and (kernels := self.decode_kernels(query, cache, mask)) is not None:
            key_pool, value_pool = cache.write(self.layer_index, key, value)
            out = kernels.gqa_decode_attention(query, key_pool, value_pool, cache.read_slots, mask, self.softmax_scale)
            return self.o_proj(out.flatten(2))
        if cache is not None:
            key, value = cache.update(self.layer_index, positions, mask.shape[-1], key, value)
        out = _attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.softmax_scale, mask,
            num_kv_groups=self.num_heads // self.num_kv_heads,
        )
        return self.o_proj(out.transpose(1, 2).flatten(2))

    def decode_kernels(self, query: torch.Tensor, cache: KVCache, mask: torch.Tensor | None):
        """The fused CPU kernels when this step's attention may read the paged pool through them: a
        decode or verify step (FUSED_ATTENTION_MAX_QUERIES queries per sequence at most, any batch and
        cache length), a cache in the query's dtype, no gradient; else None."""
        if not hasattr(cache, "write") or cache.dtype != query.dtype:
            return None
        return decode_attention_kernels(query, mask, None)
