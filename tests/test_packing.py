"""oneDNN-packed bf16 weights for CPU inference: same outputs, same state dict, only where they apply."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import peaky_model, single_thread  # noqa: F401 (autouse fixture)
from model_configs import tiny_config

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.engine import fuse_projections
from nanoseek.infer.packing import PackedLinear, PackedRoutedExperts, pack_model, packing_supported
from nanoseek.model import build_model
from nanoseek.model.layers import is_plain_linear

requires_packing = pytest.mark.skipif(
    not packing_supported(build_model(tiny_config("qwen2"), seed=0, dtype=torch.bfloat16)),
    reason="this CPU's oneDNN has no bf16 kernels",
)


def bf16_model(name: str):
    return peaky_model(name).to(torch.bfloat16)


@requires_packing
@pytest.mark.parametrize("name", ["v3", "qwen2"])
@pytest.mark.parametrize("fused", [False, True])
def test_packed_model_gives_the_same_logits_and_state_dict(name, fused):
    """Packed alone, or as the engine prepares a model: projections fused, then packed."""
    model, packed = bf16_model(name), bf16_model(name)
    if fused:
        fuse_projections(packed)
    replaced = pack_model(packed)
    assert replaced > 0 and isinstance(packed.lm_head, PackedLinear)
    if name == "v3":
        assert isinstance(packed.model.layers[1].mlp.experts, PackedRoutedExperts)
        assert is_plain_linear(packed.model.layers[0].self_attn.kv_b_proj)  # read directly by absorbed attention
        assert packed.model.layers[0].self_attn.frozen_absorbed[0].dtype == torch.float32  # absorbed_dtype on CPU
    ids = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, rtol=0, atol=1e-2)
    expected, got = model.state_dict(), packed.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@requires_packing
def test_packed_absorbed_attention_computes_in_fp32():
    """A packed bf16 MLA model keeps W_UK/W_UV in fp32 (CPU bf16 bmm is slower at decode sizes): the
    absorbed attention equals the fp32 computation on the same bf16 inputs, rounded to bf16 at the end."""
    packed = bf16_model("v3")
    pack_model(packed)
    attention = packed.model.layers[0].self_attn
    reference = build_model(tiny_config("v3"), seed=0).model.layers[0].self_attn
    reference.kv_b_proj.weight.data = attention.kv_b_proj.weight.float()
    generator = torch.Generator().manual_seed(0)
    heads, keys = attention.num_heads, 7
    q_nope = torch.randn(2, 3, heads, attention.qk_nope_head_dim, generator=generator).bfloat16()
    q_pe = torch.randn(2, 3, heads, attention.qk_rope_head_dim, generator=generator).bfloat16()
    latent = torch.randn(2, keys, attention.kv_lora_rank, generator=generator).bfloat16()
    k_pe = torch.randn(2, keys, attention.qk_rope_head_dim, generator=generator).bfloat16()
    mask = torch.ones(2, 1, 3, keys, dtype=torch.bool).tril(diagonal=keys - 3)
    with torch.no_grad():
        out = attention.attend_absorbed(q_nope, q_pe, latent, k_pe, mask)
        expected = reference.attend_absorbed(q_nope.float(), q_pe.float(), latent.float(), k_pe.float(), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.bfloat16(), rtol=0, atol=0)


@requires_packing
def test_engine_packs_bf16_models_and_decodes_the_same_tokens():
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 13, 2, 40], [7, 7, 30]]
    plain = Engine(bf16_model("v3"), pack_weights=False)
    packed = Engine(bf16_model("v3"))  # default: packs on CPU in bf16
    assert isinstance(packed.model.lm_head, PackedLinear) and not isinstance(plain.model.lm_head, PackedLinear)
    tokens = [[o.outputs[0].token_ids for o in engine.generate(prompts, params)] for engine in (plain, packed)]
    assert tokens[0] == tokens[1]


def test_fp32_models_and_trained_engines_are_not_packed():
    model = peaky_model("v3")
    assert pack_model(model) == 0 and is_plain_linear(model.lm_head)
    bf16 = bf16_model("v3")
    Engine(bf16, pack_weights=False)  # how GRPO, SFT evaluation and distillation build theirs: the model keeps training
    assert is_plain_linear(bf16.lm_head)
