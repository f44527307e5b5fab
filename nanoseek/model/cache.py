"""A contiguous, preallocated KV cache: one row per sequence, slot index = token position.

For MLA layers it holds only what absorbed decoding needs, the normalized latent and the rotated
k_pe: (kv_lora_rank + qk_rope_head_dim) values per token per layer. For GQA layers it holds the
rotated keys and the values of the key/value heads. MTP depths get their own layers (indices
num_hidden_layers...). The engine's paged cache implements the same `update` contract.
"""

from __future__ import annotations

import torch

from nanoseek.config import ModelConfig


def cache_entry_shapes(config: ModelConfig) -> list[tuple[int, ...]]:
    """Per-token shapes of the tensors one layer caches."""
    if config.is_mla:
        return [(config.kv_lora_rank,), (config.qk_rope_head_dim,)]
    kv_shape = (config.num_key_value_heads, config.attention_head_dim)
    return [kv_shape, kv_shape]


def cache_bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16, include_mtp: bool = False) -> int:
    """Bytes of KV cache one token occupies across all layers."""
    layers = config.num_hidden_layers + (config.num_mtp_layers if include_mtp else 0)
    elements = sum(torch.Size(shape).numel() for shape in cache_entry_shapes(config))
    return layers * elements * torch.empty((), dtype=dtype).element_size()


class StaticKVCache:
    """[batch, max_length] slots per layer, written at the token positions given to `update`."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        include_mtp: bool = True,
    ):
        layers = config.num_hidden_layers + (config.num_mtp_layers if include_mtp else 0)
        self.max_length = max_length
        self.layers = [
            tuple(torch.zeros(batch_size, max_length, *shape, dtype=dtype, device=device) for shape in shapes)
            for shapes in [cache_entry_shapes(config)] * layers
        ]

    def update(
        self, layer_index: int, positions: torch.Tensor, kv_length: int, *entries: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        if kv_length > self.max_length:
            raise ValueError(f"position {kv_length - 1} is beyond the cache length {self.max_length}")
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(positions)
        stored = self.layers[layer_index]
        for buffer, entry in zip(stored, entries, strict=True):
            buffer[rows, positions] = entry.to(buffer.dtype)
        return tuple(buffer[:, :kv_length] for buffer in stored)
