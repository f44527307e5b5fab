"""The decoder: pre-norm blocks, the causal LM with its losses, and Multi-Token Prediction depths.

    x = x + Attention(RMSNorm(x));  x = x + FFN(RMSNorm(x))

FFN is a dense SwiGLU or a DeepSeekMoE layer (`ModelConfig.is_moe_layer`). Module names follow the
Hugging Face checkpoints (`model.layers.3.self_attn.kv_b_proj`, `lm_head`, ...), so the state dict
maps onto files with only the expert stacking and the MTP index to translate (see checkpoint.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nanoseek.config import ModelConfig
from nanoseek.model.attention import DocumentMask, GroupedQueryAttention, KVCache, MultiHeadLatentAttention
from nanoseek.model.decode_layer import fused_decode_stack, fused_decode_step
from nanoseek.model.kernels import linear_cross_entropy
from nanoseek.model.layers import Linear, RMSNorm, RotaryAngles, RotaryEmbedding, SwiGLU, is_plain_linear
from nanoseek.model.moe import MoE, RoutedExperts, Router, RouterStats
from nanoseek.model.mtp import MTPModule

IGNORE_INDEX = -100


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        attention = MultiHeadLatentAttention if config.is_mla else GroupedQueryAttention
        self.self_attn = attention(config, layer_index)
        if config.is_moe_layer(layer_index):
            self.mlp = MoE(config)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.fused_decode = False  # decode steps as one C++ call (`decode_layer`), set by the inference engine

    def forward(
        self,
        x: torch.Tensor,
        angles: RotaryAngles,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        absorb: bool | None = None,
        balance_loss: bool = False,
    ) -> tuple[torch.Tensor, RouterStats | None]:
        if self.fused_decode and (fused := fused_decode_step(self, x, angles, cache, mask, absorb)) is not None:
            out, indices = fused
            return out, None if indices is None else RouterStats(indices, self.mlp.gate.num_experts, None)
        x = x + self.self_attn(self.input_layernorm(x), angles, cache, positions, mask, absorb)
        hidden = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, stats = self.mlp(hidden, balance_loss)
            return x + out, stats
        return x + self.mlp(hidden), None


class Transformer(nn.Module):
    """Embedding, decoder layers, final norm (`model.*` in checkpoints)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, index) for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        angles: RotaryAngles,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        absorb: bool | None = None,
        balance_loss: bool = False,
    ) -> tuple[torch.Tensor, list[RouterStats]]:
        x = self.embed_tokens(input_ids)
        if self.layers[0].fused_decode and (fused := fused_decode_stack(self.layers, x, angles, cache, mask, absorb)):
            x, indices = fused
            stats = [RouterStats(i, layer.mlp.gate.num_experts, None) for layer, i in zip(self.layers, indices, strict=True)
                     if i is not None]
            return self.norm(x), stats
        stats = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x, layer_stats = checkpoint(
                    layer, x, angles, cache, positions, mask, absorb, balance_loss, use_reentrant=False
                )
            else:
                x, layer_stats = layer(x, angles, cache, positions, mask, absorb, balance_loss)
            if layer_stats is not None:
                stats.append(layer_stats)
        return self.norm(x), stats


@dataclass
class ModelOutput:
    """Everything one forward produces. `loss` combines the parts with the weights passed in.

    With labels, `logits` and `mtp_logits` are there only if asked for (`return_logits`).
    """

    logits: torch.Tensor | None
    hidden_states: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    router_stats: list[RouterStats] = field(default_factory=list)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)


class CausalLM(nn.Module):
    """A causal language model: DeepSeek-V3/V2 (MLA, MoE, MTP) or dense Qwen2/Llama."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        first_mtp = config.num_hidden_layers
        self.mtp = nn.ModuleList(
            MTPModule(config, first_mtp + depth, DecoderLayer(config, first_mtp + depth))
            for depth in range(config.num_mtp_layers)
        )
        softmax_scale_multiplier = self.model.rotary_emb.softmax_scale_multiplier
        for module in self.modules():
            if isinstance(module, MultiHeadLatentAttention):
                module.softmax_scale *= softmax_scale_multiplier

    # ----- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        document_ids: torch.Tensor | DocumentMask | None = None,
        absorb: bool | None = None,
        logits_to_keep: int = 0,
        use_mtp: bool = True,
        mtp_weight: float = 0.3,
        balance_alpha: float | None = None,
        return_logits: bool = False,
    ) -> ModelOutput:
        """Run the model on `input_ids` [batch, seq].

        labels: [batch, seq] targets already shifted (labels[:, i] is the token after position i),
            IGNORE_INDEX where no loss applies. With labels, the LM loss, the MTP losses (depth k
            predicts labels[:, i + k]) and, in training mode, the sequence-wise balance loss are
            computed and combined as lm + mtp_weight * mtp + balance_alpha * balance.
        positions: [batch, seq] token positions (default 0..seq-1); required with a cache.
        cache: a KV cache (see attention.py); entries are written at slots `positions`.
        document_ids: [batch, seq] ids of packed documents that must not attend to each other, or a
            DocumentMask (packed documents that also see a shared earlier one: GRPO's prompts).
        absorb: force MLA's absorbed (True) or naive (False) path; None picks the cheaper one.
        logits_to_keep: compute logits only for the last n positions (0 = all).
        return_logits: with labels, return the logits too. Otherwise the losses are computed from the
            hidden states chunk by chunk, never holding fp32 [tokens, vocab] logits (kernels.py).
        """
        batch, seq = input_ids.shape
        if positions is None:
            positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        mask = self.attention_mask(positions, cache, document_ids)
        angles = self.model.rotary_emb(positions)
        balance_alpha = self.config.aux_loss_alpha if balance_alpha is None else balance_alpha
        want_balance = labels is not None and self.training and balance_alpha > 0
        hidden, router_stats = self.model(input_ids, angles, cache, positions, mask, absorb, want_balance)
        kept = hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
        logits = self.lm_head(kept) if labels is None or return_logits else None
        output = ModelOutput(logits=logits, hidden_states=hidden, router_stats=router_stats)
        if labels is None:
            return output
        output.lm_loss = self.head_loss(kept, logits, labels)
        loss = output.lm_loss
        if use_mtp and len(self.mtp) and seq > len(self.mtp):
            mtp_losses = []
            for depth, (mtp_hidden, stats) in enumerate(
                self.mtp_forward(hidden, input_ids, angles, mask, want_balance), start=1
            ):
                mtp_logits = None
                if return_logits:
                    mtp_logits = self.lm_head(mtp_hidden)
                    output.mtp_logits.append(mtp_logits)
                router_stats.extend(stats)
                targets = labels[:, depth:]
                if isinstance(mask, DocumentMask):  # position i must not predict a token of the next packed document
                    ids = mask.document_ids
                    crosses = ids[:, depth:] != ids[:, :-depth]
                    targets = targets.masked_fill(crosses, IGNORE_INDEX)
                mtp_losses.append(self.head_loss(mtp_hidden, mtp_logits, targets))
            output.mtp_loss = torch.stack(mtp_losses).mean()
            loss = loss + mtp_weight * output.mtp_loss
        if want_balance:
            output.balance_loss = torch.stack(
                [s.balance_loss for s in router_stats if s.balance_loss is not None]
            ).sum()
            loss = loss + balance_alpha * output.balance_loss
        output.loss = loss
        return output

    def head_loss(self, hidden: torch.Tensor, logits: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the output head on `hidden` [batch, seq, dim]: from `logits` when they were
        computed, else fused with the head (the same value and gradients, without the fp32 logits)."""
        if logits is None and not is_plain_linear(self.lm_head):  # a quantized or otherwise replaced head
            logits = self.lm_head(hidden)
        if logits is not None:
            return cross_entropy(logits, labels)
        labels = labels[:, : hidden.shape[1]]
        return linear_cross_entropy(hidden, self.lm_head.weight, labels, IGNORE_INDEX)

    def mtp_forward(self, hidden, input_ids, angles, mask=None, balance_loss=False):
        """Yield (normed hidden h^k, router stats) of each MTP depth on full sequences (training, scoring).

        Depth k sees positions 0..seq-k-1: its inputs are h^{k-1} there and the tokens at i + k.
        """
        seq = input_ids.shape[1]
        previous = hidden
        for depth, module in enumerate(self.mtp, start=1):
            length = seq - depth
            embeddings = self.model.embed_tokens(input_ids[:, depth:])
            if isinstance(mask, DocumentMask):
                depth_mask = mask.narrow(length)
            else:
                depth_mask = None if mask is None else mask[..., :length, :length]
            previous, stats = module(
                embeddings, previous[:, :length], angles.narrow(length), mask=depth_mask, balance_loss=balance_loss
            )
            yield previous, [stats] if stats is not None else []

    @staticmethod
    def attention_mask(
        positions: torch.Tensor, cache: KVCache | None, document_ids: torch.Tensor | DocumentMask | None
    ) -> torch.Tensor | DocumentMask | None:
        """Boolean [batch, 1, seq, kv_len] mask over a cache, a DocumentMask for packed documents, or None
        for plain causal self-attention."""
        if cache is not None:
            kv_length = getattr(cache, "kv_length", None) or int(positions.max()) + 1  # a paged cache knows it
            key_positions = torch.arange(kv_length, device=positions.device)
            return (key_positions[None, None, :] <= positions[:, :, None])[:, None]
        if document_ids is None or isinstance(document_ids, DocumentMask):
            return document_ids
        return DocumentMask(document_ids)

    # ----- construction and IO ------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zeros for biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=generator)
                module.e_score_correction_bias.zero_()
            elif isinstance(module, RoutedExperts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)

    def save_pretrained(self, directory: str | Path, max_shard_bytes: int = 4 << 30) -> None:
        from nanoseek.checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_bytes=max_shard_bytes)

    def moe_layers(self) -> list[MoE]:
        """Every MoE layer, main model first, then MTP blocks (the order of `router_stats`)."""
        return [module for module in self.modules() if isinstance(module, MoE)]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over positions whose label is not IGNORE_INDEX.

    `logits` may cover fewer positions than `labels` (MTP depths): labels are cut to match.
    """
    labels = labels[:, : logits.shape[1]]
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def build_model(
    config: ModelConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    seed: int | None = None,
) -> CausalLM:
    """A randomly initialized model. On the meta device nothing is allocated (accounting)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    with device:
        model = CausalLM(config)
    if device.type != "meta":
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        model.init_weights(generator)
    if dtype is not None:
        model.to(dtype)
        restore_fp32_state(model)
    return model


def restore_fp32_state(model: nn.Module) -> None:
    """Call after a dtype cast: the router bias (reference fact 6) and RoPE frequencies stay fp32."""
    for module in model.modules():
        if isinstance(module, Router):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
        elif isinstance(module, RotaryEmbedding):
            module.reset_parameters()
