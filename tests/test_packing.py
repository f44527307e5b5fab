"""oneDNN-packed fp32 and bf16 weights for CPU inference: same outputs, same state dict, only where they apply."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import peaky_model, single_thread  # noqa: F401 (autouse fixture)
from model_configs import tiny_config

from nanoseek.errors import TrainingError
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.engine import fuse_projections
from nanoseek.infer.packing import (
    PackedLinear,
    PackedRoutedExperts,
    pack_expert_panels,
    pack_model,
    pack_panels,
    packed_while,
    packing_supported,
)
from nanoseek.model import build_model, cpu_ops
from nanoseek.model.layers import PANEL_MAX_ROWS, is_plain_linear
from nanoseek.model.moe import RoutedExperts, all_at_once_threshold

requires_packing = pytest.mark.skipif(
    not packing_supported(build_model(tiny_config("qwen2"), seed=0, dtype=torch.bfloat16)),
    reason="this CPU's oneDNN has no bf16 kernels",
)
requires_fp32_packing = pytest.mark.skipif(cpu_ops.load() is None, reason="the fused CPU kernels (fp32 panels) could not be built here")
DTYPES = [pytest.param(torch.bfloat16, marks=requires_packing), pytest.param(torch.float32, marks=requires_fp32_packing)]


def bf16_model(name: str, dtype: torch.dtype = torch.bfloat16):
    return peaky_model(name).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["v3", "qwen2"])
@pytest.mark.parametrize("fused", [False, True])
def test_packed_model_gives_the_same_logits_and_state_dict(name, fused, dtype, monkeypatch):
    """Packed alone, or as the engine prepares a model: projections fused, then packed. bf16 gives the
    same bits; fp32 the same values up to summation order. (Experts run one by one here, as in the
    plain model; running them all at once is another summation, tested below.)"""
    monkeypatch.setattr(RoutedExperts, "all_at_once_pays", lambda self, indices: False)
    model, packed = bf16_model(name, dtype), bf16_model(name, dtype)
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
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-4)
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



def test_experts_run_all_at_once_only_when_small_and_mostly_busy():
    """The cost model: `small`'s 1.5 MB fp32 experts keep one call per chosen expert at batch 1 (4 of
    32 busy) and run all at once with 16 requests (30 busy); V2-Lite's 17 MB bf16 experts never do
    (its tokens choose 6 of 64 each: fewer busy experts than the threshold at any batch)."""
    small = (512 * 512 + 512 * 256) * 4
    assert all_at_once_threshold(small, 32, tokens=1) > 4
    assert all_at_once_threshold(small, 32, tokens=16) <= 30
    assert all_at_once_threshold(small, 32, tokens=64) > 32  # prefill chunks: grouped by expert
    v2_lite = 3 * 2048 * 1408 * 2
    assert all(all_at_once_threshold(v2_lite, 64, tokens) > min(64, 6 * tokens) for tokens in (1, 2, 16, 256))



def test_experts_run_one_by_one_under_autocast_and_in_fp16():
    """Under autocast every call would convert all experts' weights, not only the chosen ones; an idle
    fp16 expert could overflow to inf, which its zero gate weight turns into NaN."""
    experts = build_model(tiny_config("v3"), seed=0).model.layers[1].mlp.experts
    indices = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    assert experts.all_at_once_pays(indices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not experts.all_at_once_pays(indices)
    assert not experts.half().all_at_once_pays(indices)

@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_experts_all_at_once_equal_each_token_through_its_experts(dtype, monkeypatch):
    """Without the fused CPU kernels (whose routed-experts kernel comes first), many tokens over most
    experts take one pair of matmuls over all experts: it equals running each token through its chosen
    experts (naive_forward), as one call per expert does; and each expert's matrices are packed."""
    model = build_model(tiny_config("v3", n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1), seed=0).to(dtype)
    experts = model.model.layers[1].mlp.experts
    monkeypatch.setattr(cpu_ops, "_state", "off")
    packed = PackedRoutedExperts(experts)
    assert not packed.streamed and packed.per_expert[0][0].is_mkldnn
    generator = torch.Generator().manual_seed(0)
    tokens = 12
    x = torch.randn(tokens, experts.gate_up_proj.shape[-1], generator=generator).to(dtype)
    indices = torch.stack([torch.randperm(16, generator=generator)[:4] for _ in range(tokens)])
    weights = torch.rand(tokens, 4, generator=generator)
    assert packed.all_at_once_pays(indices) and packed.side_by_side is None
    with torch.no_grad():
        expected = experts.naive_forward(x, weights, indices)
        got = packed(x, weights, indices)
        assert packed.side_by_side is not None  # packed on first use
        monkeypatch.setattr(PackedRoutedExperts, "all_at_once_pays", lambda self, indices: False)
        one_by_one = packed(x, weights, indices)
    tolerance = (2e-2 if dtype == torch.bfloat16 else 1e-5) * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    torch.testing.assert_close(one_by_one, expected, rtol=0, atol=tolerance)
    assert "side_by_side" not in "".join(packed.state_dict())  # not state: the same weights, repacked

def test_packed_experts_keep_the_stacks_the_kernel_streams(monkeypatch):
    """With the fused CPU kernels the expert stacks are not copied (the parameters' own storage, which
    prefill paths without the kernel read); the routed-experts kernel streams their fp32 copy in
    panels, and nothing is packed side by side, since the kernel comes first."""
    if cpu_ops.load() is None:
        pytest.skip("the fused CPU kernels could not be built here")
    model = build_model(tiny_config("v3", n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1), seed=0)
    experts = model.model.layers[1].mlp.experts
    packed = PackedRoutedExperts(experts)
    assert packed.streamed and packed.stacks[0].data_ptr() == experts.gate_up_proj.data_ptr()
    assert packed.stacks[1].data_ptr() == experts.down_proj.data_ptr()
    assert all(torch.equal(panels, pack_expert_panels(stack)) for panels, stack in zip(packed.panels, packed.stacks, strict=True))
    x, indices = torch.randn(12, 64), torch.stack([torch.randperm(16)[:4] for _ in range(12)])
    weights = torch.rand(12, 4)
    streamed = []
    kernel = cpu_ops.load().routed_experts
    monkeypatch.setattr(cpu_ops.load(), "routed_experts", lambda *args: streamed.append(args[-2:]) or kernel(*args))
    with torch.no_grad():
        torch.testing.assert_close(packed(x, weights, indices), experts.naive_forward(x, weights, indices), rtol=1e-5, atol=1e-5)
    assert packed.side_by_side is None
    assert len(streamed) == 1 and streamed[0][0] is packed.panels[0] and streamed[0][1] is packed.panels[1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_engine_packs_models_and_decodes_the_same_tokens(dtype):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 13, 2, 40], [7, 7, 30]]
    plain = Engine(bf16_model("v3", dtype), pack_weights=False)
    packed = Engine(bf16_model("v3", dtype))  # default: packs on CPU in fp32 and bf16
    assert isinstance(packed.model.lm_head, PackedLinear) and not isinstance(plain.model.lm_head, PackedLinear)
    tokens = [[o.outputs[0].token_ids for o in engine.generate(prompts, params)] for engine in (plain, packed)]
    assert tokens[0] == tokens[1]


def test_fp16_models_and_trained_engines_are_not_packed():
    model = bf16_model("v3", torch.float16)  # no packed fp16 kernel is used
    assert pack_model(model) == 0 and is_plain_linear(model.lm_head)
    for dtype in (torch.float32, torch.bfloat16):
        trained = bf16_model("v3", dtype)
        Engine(trained, pack_weights=False)  # how GRPO, SFT evaluation and distillation build theirs: the model keeps training
        assert is_plain_linear(trained.lm_head)


@requires_fp32_packing
def test_packed_while_puts_the_model_back_and_packed_models_refuse_training():
    """GRPO decodes its rollouts inside `packed_while`: packed for the block, the original modules,
    parameters, hooks, fused buffers and MLA weights back after it, and training works again."""
    model = peaky_model("v3")
    fuse_projections(model)
    head, attention = model.lm_head, model.model.layers[0].self_attn
    fused_weight, parameters = attention.fused.weight, dict(model.named_parameters())
    seen = []
    head.register_forward_hook(lambda module, args, output: seen.append(type(module).__name__))
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        with packed_while(model):
            assert isinstance(model.lm_head, PackedLinear) and attention.frozen_absorbed is not None
            assert not model.model.layers[1].mlp.experts.all_at_once  # no second copy rebuilt every rollout
            torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=1e-4)
    assert model.lm_head is head and attention.fused.weight is fused_weight and attention.frozen_absorbed is None
    with torch.no_grad():
        assert attention.fused.usable  # its parameter slots are back
    assert dict(model.named_parameters()) == parameters and seen == ["Linear", "PackedLinear"]
    model.train()
    model(ids, labels=ids).loss.backward()
    assert head.weight.grad is not None
    pack_model(model)
    with pytest.raises(TrainingError, match="pack_weights=False"):
        model(ids, labels=ids)


@requires_fp32_packing
@pytest.mark.parametrize("threads", [1, 2])
def test_panels_give_f_linear_for_decode_steps_and_prefill_takes_the_plain_weight(kernels, threads, monkeypatch):
    """fp32 layers, alone or as a fused projection, are packed in panels and keep their plain weight (the
    same storage, no copy). Steps of 1 to PANEL_MAX_ROWS rows take `panel_linear`, more rows `linear`
    on the plain weight; values equal F.linear's either way, on row counts off the kernel's 8-row
    blocks, in the modules and in the fused decode layer's products alike."""
    torch.set_num_threads(threads)
    model = peaky_model("qwen2")
    fuse_projections(model)
    head_weight, fused = model.lm_head.weight, model.model.layers[0].self_attn.fused
    fused_buffer, fused_bias = fused.weight, fused.bias
    pack_model(model)
    assert fused.kind == "panels" and fused.weight.shape == (-(-fused_buffer.shape[0] // 32), fused_buffer.shape[1], 32)
    assert model.lm_head.plain_weight.data_ptr() == head_weight.data_ptr() and fused.plain is fused_buffer
    calls = []
    original = kernels.panel_linear
    monkeypatch.setattr(kernels, "panel_linear", lambda *args: calls.append(1) or original(*args))
    kind, panels, bias, scale, plain = model.lm_head.decode_product()
    assert kind == "panels" and plain is model.lm_head.plain_weight
    for rows in (1, 2, 7, 9, PANEL_MAX_ROWS, PANEL_MAX_ROWS + 1):
        x = torch.randn(rows, 1, head_weight.shape[1])
        calls.clear()
        with torch.no_grad():
            torch.testing.assert_close(model.lm_head(x), x @ head_weight.T, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fused(x), x @ fused_buffer.T + fused_bias, rtol=1e-5, atol=1e-5)
            # the fused decode layer's product, handed a doubled plain tensor to show which one it reads
            product = kernels.Product(4, panels, bias, scale, 2 * plain, PANEL_MAX_ROWS)
            reads = 1 if rows <= PANEL_MAX_ROWS else 2
            torch.testing.assert_close(product(x, 1, 0, 1 << 62), reads * x @ head_weight.T, rtol=1e-5, atol=1e-5)
        assert len(calls) == (2 if rows <= PANEL_MAX_ROWS else 0)


@requires_fp32_packing
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(33, 20), (100, 136), (4099, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_panel_linear_equals_f_linear(kernels, threads, shape, bias):
    """`cpu_ops.panel_linear` on `pack_panels` equals F.linear for output counts off the 32-wide panels
    (the last one partly zeros), row counts off the kernel's 8-row blocks, 2-D and 3-D inputs, one
    thread or panels split over two; bad shapes are refused with a message."""
    torch.set_num_threads(threads)
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features)
    bias_tensor = torch.randn(out_features) if bias else None
    panels = pack_panels(weight)
    assert panels.shape == (-(-out_features // 32), in_features, 32)
    for rows in (1, 2, 7, 8, 9, 17, 64, 300):
        x = torch.randn(rows, 1, in_features)
        out = kernels.panel_linear(x, panels, out_features, bias_tensor)
        assert out.shape == (rows, 1, out_features) and out.is_contiguous()
        torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias_tensor), rtol=1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="panel_linear"):
        kernels.panel_linear(torch.randn(2, in_features), panels, out_features + 32)


def test_fp32_matrices_are_packed_in_panels_only_with_the_kernels(monkeypatch):
    """Every fp32 linear (not MLA's kv_b_proj) is packed in panels where the fused kernels are built;
    without them an fp32 model stays plain, while bf16 ones are packed for oneDNN either way."""
    if cpu_ops.load() is not None:
        model = peaky_model("qwen2")
        assert pack_model(model) > 0 and model.lm_head.decode_product()[0] == "panels"
        assert isinstance(model.model.layers[0].self_attn.o_proj, PackedLinear)  # 64 x 64: small ones too
    monkeypatch.setattr(cpu_ops, "_state", "off")
    assert pack_model(peaky_model("qwen2")) == 0
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16 = bf16_model("qwen2")
        pack_model(bf16)
        assert isinstance(bf16.model.layers[0].self_attn.o_proj, PackedLinear)
        assert bf16.model.layers[0].self_attn.o_proj.decode_product()[0] == "packed"


@requires_fp32_packing
def test_packed_fp32_model_runs_under_bf16_autocast_and_packed_while_stands_aside():
    """bf16 activations from autocast reach fp32-packed weights as fp32 (cast back after); GRPO's
    rollouts under autocast keep the trainer's arithmetic, so packed_while packs nothing there."""
    model, packed = peaky_model("qwen2"), peaky_model("qwen2")
    pack_model(packed)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected, logits = model(ids).logits, packed(ids).logits
        with packed_while(model):
            assert is_plain_linear(model.lm_head)
    torch.testing.assert_close(logits.float(), expected.float(), rtol=0, atol=0.1 * expected.float().abs().max().item())
