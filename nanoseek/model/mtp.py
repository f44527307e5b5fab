"""Multi-Token Prediction (V3 report §2.2): depth k predicts token i+k+1 from position i.

    h'_i = eh_proj [ enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i) ]      (embedding first, as in the weights)
    h^k  = Block_k(h')                                              (causal, same RoPE positions)
    P^k  = Head(norm(h^k))                                          (embedding and head shared)

h^0 is the main model's final (normed) hidden state, as in transformers and vLLM. Each depth
shortens the sequence by one. Checkpoints store depth k at `model.layers.{num_hidden_layers + k - 1}`.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.layers import Linear, RMSNorm, RotaryAngles


class MTPModule(nn.Module):
    """One MTP depth: two norms, the [embedding ; hidden] projection, a full decoder block, a final norm."""

    def __init__(self, config: ModelConfig, layer_index: int, block: nn.Module):
        super().__init__()
        self.layer_index = layer_index
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = block
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)  # `shared_head.norm` on disk

    def forward(
        self,
        next_token_embeddings: torch.Tensor,
        previous_hidden: torch.Tensor,
        angles: RotaryAngles,
        **block_kwargs,
    ):
        """Both inputs [batch, seq, hidden], aligned by position i. Returns (normed h^k, router stats)."""
        combined = torch.cat((self.enorm(next_token_embeddings), self.hnorm(previous_hidden)), dim=-1)
        hidden, stats = self.block(self.eh_proj(combined), angles, **block_kwargs)
        return self.norm(hidden), stats
