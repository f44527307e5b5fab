"""`nanoseek info`: parameters (total vs activated per token), KV-cache bytes per token, layer layout.

Counts come from the real modules built on the meta device, so they can never drift from the
model code and cost no memory even for the 671B V3.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nanoseek.config import ModelConfig, load_model_config
from nanoseek.model.cache import cache_bytes_per_token
from nanoseek.model.moe import MoE
from nanoseek.model.transformer import build_model


@dataclass
class ModelAccounting:
    total_parameters: int  # main model incl. embedding and head, excl. MTP
    activated_parameters: int  # per token, incl. embedding and head
    embedding_parameters: int  # input embedding (+ untied head)
    mtp_parameters: int  # unique MTP parameters (embedding and head are shared)
    mtp_activated_parameters: int
    kv_cache_bytes_per_token: int  # what this model caches (bf16), main layers
    mha_cache_bytes_per_token: int  # the per-head K/V cache the same attention would need (bf16)
    layers: list[str]


def account(config: ModelConfig) -> ModelAccounting:
    model = build_model(config, device="meta")

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    main = count(model.model) + (0 if config.tie_word_embeddings else model.lm_head.weight.numel())
    mtp = sum(count(module) for module in model.mtp)

    def inactive(module: torch.nn.Module) -> int:
        return sum(
            count(moe.experts) // moe.gate.num_experts * (moe.gate.num_experts - moe.gate.top_k)
            for moe in module.modules()
            if isinstance(moe, MoE)
        )

    embedding = model.model.embed_tokens.weight.numel() * (1 if config.tie_word_embeddings else 2)
    if config.is_mla:
        mha_elements = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    else:
        mha_elements = 2 * config.num_attention_heads * config.attention_head_dim
    return ModelAccounting(
        total_parameters=main,
        activated_parameters=main - inactive(model.model),
        embedding_parameters=embedding,
        mtp_parameters=mtp,
        mtp_activated_parameters=mtp - sum(inactive(module) for module in model.mtp),
        kv_cache_bytes_per_token=cache_bytes_per_token(config, torch.bfloat16),
        mha_cache_bytes_per_token=mha_elements * config.num_hidden_layers * 2,
        layers=layer_layout(config),
    )


def layer_layout(config: ModelConfig) -> list[str]:
    """One line per run of identical layers, e.g. 'layers 3-60: MLA + MoE(...)'."""
    if config.is_mla:
        q = f"q_lora {config.q_lora_rank}" if config.q_lora_rank else "no q compression"
        attention = f"MLA({config.num_attention_heads} heads, {q}, kv_lora {config.kv_lora_rank})"
    else:
        attention = f"GQA({config.num_attention_heads} q / {config.num_key_value_heads} kv heads)"

    def ffn(index: int) -> str:
        if config.is_moe_layer(index):
            shared = f" + {config.n_shared_experts} shared" if config.n_shared_experts else ""
            return (
                f"MoE({config.n_routed_experts} routed x {config.moe_intermediate_size}, "
                f"top-{config.num_experts_per_tok}{shared})"
            )
        return f"SwiGLU({config.intermediate_size})"

    runs: list[tuple[int, int, str]] = []
    for index in range(config.num_hidden_layers):
        kind = f"{attention} + {ffn(index)}"
        if runs and runs[-1][2] == kind:
            runs[-1] = (runs[-1][0], index, kind)
        else:
            runs.append((index, index, kind))
    lines = [f"layers {a}-{b}: {kind}" if a != b else f"layer {a}: {kind}" for a, b, kind in runs]
    for depth in range(config.num_mtp_layers):
        index = config.num_hidden_layers + depth
        lines.append(f"layer {index}: MTP depth {depth + 1} ({attention} + {ffn(index)})")
    return lines


def format_report(name: str, config: ModelConfig, accounting: ModelAccounting) -> str:
    def billions(n: int) -> str:
        return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"

    a = accounting
    ratio = a.mha_cache_bytes_per_token / a.kv_cache_bytes_per_token
    cache_kind = "latent (c_kv + k_pe)" if config.is_mla else "grouped-query K/V"
    lines = [
        f"{name}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}",
        f"parameters: {billions(a.total_parameters)} total, {billions(a.activated_parameters)} activated per token "
        f"({billions(a.activated_parameters - a.embedding_parameters)} without embedding/head)",
    ]
    if a.mtp_parameters:
        lines.append(
            f"MTP: {billions(a.mtp_parameters)} unique parameters ({billions(a.mtp_activated_parameters)} activated); "
            f"with MTP {billions(a.total_parameters + a.mtp_parameters)} total"
        )
    lines += [
        f"KV cache per token (bf16): {a.kv_cache_bytes_per_token:,} bytes {cache_kind} vs "
        f"{a.mha_cache_bytes_per_token:,} bytes for per-head K/V ({ratio:.1f}x smaller)",
        "layout:",
        *[f"  {line}" for line in a.layers],
    ]
    return "\n".join(lines)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a preset (nano, small, v2-lite, v3, ...) or a checkpoint directory")
    parser.add_argument("overrides", nargs="*", help="config overrides as key=value")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def cli_main(args: argparse.Namespace) -> int:
    config = load_model_config(args.model, args.overrides)
    accounting = account(config)
    if args.json:
        print(json.dumps({"model": str(args.model), **asdict(accounting)}))
    else:
        print(format_report(Path(args.model).name or str(args.model), config, accounting))
    return 0
