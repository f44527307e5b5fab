"""Model internals: fast paths against naive paths, and the DeepSeek facts re-implementations get wrong."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from model_configs import tiny_config

from nanoseek import ModelConfig
from nanoseek.model import IGNORE_INDEX, build_model, cpu_ops, kernels, layers
from nanoseek.model import moe as moe_layers
from nanoseek.model.attention import _attend, _attend_eager
from nanoseek.model.cache import StaticKVCache
from nanoseek.model.kernels import combine_slots, dispatch_slots, linear_cross_entropy, linear_token_logprobs
from nanoseek.model.layers import (
    FEW_ROWS,
    Linear,
    RMSNorm,
    RotaryAngles,
    RotaryEmbedding,
    apply_rope_half,
    apply_rope_interleaved,
)
from nanoseek.model.moe import MoE, Router


def tokens(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----- YaRN and RoPE (facts 1-2) --------------------------------------------------------------
def test_v3_softmax_scale_includes_yarn_mscale_squared():
    model = build_model(ModelConfig.from_preset("v3"), device="meta")
    attention = model.model.layers[0].self_attn
    assert attention.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-6)
    assert attention.softmax_scale == pytest.approx(0.135234, abs=1e-6)
    assert model.model.rotary_emb.attention_factor == 1.0  # cos/sin unscaled for mscale == mscale_all_dim


def test_v2_lite_softmax_scale_uses_mscale_all_dim():
    model = build_model(ModelConfig.from_preset("v2-lite"), device="meta")
    assert model.model.layers[0].self_attn.softmax_scale == pytest.approx(0.114721, abs=1e-6)


def test_v3_yarn_frequency_ramp():
    rope = RotaryEmbedding(ModelConfig.from_preset("v3"))
    original = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    ratio = (original / rope.inv_freq.double())
    assert torch.allclose(ratio[:11], torch.ones(11, dtype=torch.float64), rtol=1e-6)  # pairs <= 10 untouched
    assert torch.allclose(ratio[23:], torch.full((9,), 40.0, dtype=torch.float64), rtol=1e-6)  # >= 23 divided by 40
    assert ((ratio[11:23] > 1) & (ratio[11:23] < 40)).all()


def test_interleaved_rope_rotates_adjacent_pairs_and_half_rope_rotates_halves():
    angle = 0.3  # pair 0 rotates by `angle`, pair 1 not at all
    angles = RotaryAngles(torch.tensor([[[math.cos(angle), 1.0]]]), torch.tensor([[[math.sin(angle), 0.0]]]))
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0
    interleaved = apply_rope_interleaved(x, angles)[0, 0, 0]
    assert torch.allclose(interleaved, torch.tensor([math.cos(angle), math.sin(angle), 0.0, 0.0]))
    half = apply_rope_half(x, angles)[0, 0, 0]
    assert torch.allclose(half, torch.tensor([math.cos(angle), 0.0, math.sin(angle), 0.0]))


def test_rmsnorm_computes_in_fp32():
    norm = RMSNorm(8).bfloat16()
    x = torch.randn(4, 8) * 300
    x16 = x.bfloat16()
    expected = (x16.float() / torch.sqrt(x16.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(norm(x16), expected)  # squares of ~300 would lose precision if summed in bf16
    assert norm(x16).dtype == torch.bfloat16


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("rows", [1, 2, FEW_ROWS, FEW_ROWS + 1, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_linear_equals_f_linear(threads, rows, bias, monkeypatch):
    """Inference with few rows (FEW_ROWS, on one thread or two) takes the weight @ x^T
    path, not F.linear: same values and shape for 2-D and 3-D inputs. With gradients or more rows it
    is F.linear, and gradients flow."""
    layer = Linear(48, 80, bias=bias)
    x = torch.randn(rows, 1, 48)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    few = rows <= FEW_ROWS
    calls = []
    original = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        for inputs in (x, x.view(rows, 48)):
            out = layer(inputs)
            assert out.shape == (*inputs.shape[:-1], 80) and out.is_contiguous()
            torch.testing.assert_close(out, expected.view_as(out), rtol=1e-5, atol=1e-5)
    assert len(calls) == (0 if few else 2)
    layer(x).sum().backward()
    assert len(calls) == (1 if few else 3) and layer.weight.grad is not None
    with torch.no_grad():  # a weight that is a strided view (not [out, in] contiguous) goes to F.linear
        torch.testing.assert_close(layers.linear(x, layer.weight.t().contiguous().t()), expected - (layer.bias if bias else 0))


def test_few_row_products_start_where_they_are_told(monkeypatch):
    """Without the fused kernels: inside `few_row_products(FEW_ROWS_NEVER)` (an engine decoding a model
    that stays in cache) a few-row product is one F.linear call; inside `few_row_products(2)` one row
    is and two rows are not; outside, the transposed product from one row again. The same values every
    way. (With the kernels every few-row product streams the weight with `rows_linear`: next test.)"""
    monkeypatch.setattr(cpu_ops, "_state", "off")
    layer = Linear(48, 80)
    calls = []
    original = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: calls.append(1) or original(*args))
    with torch.no_grad():
        for start, rows, single_call in [(layers.FEW_ROWS_NEVER, 2, True), (2, 1, True), (2, 2, False), (1, 1, False)]:
            x = torch.randn(rows, 1, 48)
            expected = original(x, layer.weight, layer.bias)
            calls.clear()
            with layers.few_row_products(start):
                torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
            assert len(calls) == (1 if single_call else 0), (start, rows)
        calls.clear()
        layer(torch.randn(1, 1, 48))
    assert len(calls) == 0


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("shape", [(80, 48), (4099, 136), (7, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_rows_linear_kernel_equals_f_linear(kernels, threads, shape, bias, monkeypatch):
    """`cpu_ops.rows_linear` (the weight streamed once in register blocks, its rows split over the
    threads when large enough) equals F.linear for 1 to FEW_ROWS rows, on shapes off its block sizes
    (output rows not a multiple of 4, inputs not a multiple of 16) and 2-D or 3-D inputs; `linear`
    takes it for those rows at inference whatever `few_row_products` says, and not with gradients."""
    out_features, in_features = shape
    weight = torch.randn(out_features, in_features)
    bias_tensor = torch.randn(out_features) if bias else None
    calls = []
    original = kernels.rows_linear
    monkeypatch.setattr(kernels, "rows_linear", lambda *args: calls.append(1) or original(*args))
    for rows in range(1, FEW_ROWS + 1):
        x = torch.randn(rows, 1, in_features)
        expected = torch.nn.functional.linear(x, weight, bias_tensor)
        direct = original(x, weight, bias_tensor)
        assert direct.shape == expected.shape and direct.is_contiguous()
        torch.testing.assert_close(direct, expected, rtol=1e-5, atol=1e-5)
        calls.clear()
        with torch.no_grad(), layers.few_row_products(layers.FEW_ROWS_NEVER):
            torch.testing.assert_close(layers.linear(x.view(rows, in_features), weight, bias_tensor),
                                       expected.view(rows, out_features), rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
    calls.clear()
    with torch.no_grad():
        layers.linear(torch.randn(FEW_ROWS + 1, in_features), weight, bias_tensor)  # past the few rows
    layers.linear(torch.randn(1, in_features), weight.requires_grad_(), bias_tensor)  # recording a gradient
    assert not calls
    with pytest.raises(RuntimeError, match="rows_linear"):
        original(torch.randn(2, in_features + 1), weight.detach())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_large_fp32_products_take_onednn_forward_and_backward(bias, monkeypatch):
    """fp32 CPU products from ONEDNN_MIN_MACS multiply-adds run on oneDNN's GEMM: with gradients
    (forward and both backward products, from a shape's second use on) and without (rows past the
    few-row range). Values and
    gradients of x, weight and bias equal F.linear's; an input that is a transposed view, a frozen
    weight or an input without gradient work; smaller products and autocast stay on F.linear."""
    monkeypatch.setattr(kernels, "_SHAPES_SEEN", {})
    layer = Linear(64, 96, bias=bias)
    rows = -(-kernels.ONEDNN_MIN_MACS // (64 * 96))
    calls = []
    original = kernels.onednn_product
    for module in (kernels, layers):
        monkeypatch.setattr(module, "onednn_product", lambda *args: calls.append(1) or original(*args))
    x = torch.randn(2, rows, 64, requires_grad=True)
    upstream = torch.randn(2, rows, 96)

    def gradients(function, inputs):
        for tensor in (inputs, layer.weight, layer.bias):
            if tensor is not None:
                tensor.grad = None
        out = function(inputs)
        out.backward(upstream)
        return [out] + [t.grad for t in (inputs, layer.weight, layer.bias) if t is not None]

    def reference(inputs):
        return torch.nn.functional.linear(inputs, layer.weight, layer.bias)

    transposed = torch.randn(2, 64, rows).transpose(1, 2).requires_grad_()
    first = layer(x)  # a shape's first use: F.linear
    assert not calls and type(first.grad_fn).__name__ != "_OneDNNLinearBackward"
    for inputs in (x, transposed):
        calls.clear()
        ours = gradients(layer, inputs)
        assert len(calls) == 3 and type(ours[0].grad_fn).__name__ == "_OneDNNLinearBackward"
        for got, want in zip(ours, gradients(reference, inputs), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    expected = reference(x).detach()
    layer.weight.requires_grad_(False)
    layer.weight.grad = None
    calls.clear()
    layer(x).backward(upstream)  # the input's gradient only
    assert len(calls) == 2 and layer.weight.grad is None
    layer.weight.requires_grad_(True)
    calls.clear()
    layer(x.detach()).backward(upstream)  # the weight's gradient only
    assert len(calls) == 2 and layer.weight.grad is not None
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
        assert len(calls) == 1
        layer(x[:, :2])  # few rows: the transposed product
        layer(torch.randn(layers.FEW_ROWS + 1, 8, 64)[:, :1])  # past the few-row range, below the size
    assert len(calls) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert len(calls) == 1


# ----- MLA: naive vs absorbed (fact 7) ---------------------------------------------------------
@pytest.mark.parametrize("name", ["v3", "v3-qlora-null-yarn-tied-nonorm"])
def test_mla_absorbed_path_equals_naive_path(name):
    model = build_model(tiny_config(name), seed=0).eval()
    ids = tokens(model.config.vocab_size)
    with torch.no_grad():
        naive = model(ids, absorb=False).logits
        absorbed = model(ids, absorb=True).logits
    assert (naive - absorbed).abs().max() < 1e-5


def test_mla_cache_holds_only_latent_and_rotated_rope_key():
    config = tiny_config("v3")
    cache = StaticKVCache(config, batch_size=1, max_length=8)
    shapes = [tuple(t.shape[2:]) for t in cache.layers[0]]
    assert shapes == [(config.kv_lora_rank,), (config.qk_rope_head_dim,)]


@pytest.mark.parametrize("name", ["v3", "v2-group-limited-yarn", "qwen2", "llama3"])
@pytest.mark.parametrize("absorb", [True, False])
def test_cached_decoding_equals_full_forward(name, absorb):
    """Prefill a prefix, then feed one token at a time; rows sit at different positions."""
    model = build_model(tiny_config(name), seed=0).eval()
    ids = tokens(model.config.vocab_size, batch=2, seq=10)
    with torch.no_grad():
        full = model(ids).logits
        cache = StaticKVCache(model.config, batch_size=2, max_length=16)
        prefix = 4
        positions = torch.arange(prefix).expand(2, prefix)
        step_logits = [model(ids[:, :prefix], positions=positions, cache=cache, absorb=absorb).logits]
        for position in range(prefix, 10):
            step_positions = torch.full((2, 1), position)
            step_logits.append(
                model(ids[:, position : position + 1], positions=step_positions, cache=cache, absorb=absorb).logits
            )
    assert (torch.cat(step_logits, dim=1) - full).abs().max() < 1e-4


def test_cache_rows_at_different_positions():
    """Row 0 decodes its 6th token while row 1 decodes its 3rd: each matches its own full forward."""
    model = build_model(tiny_config("v3"), seed=0).eval()
    ids = tokens(model.config.vocab_size, batch=2, seq=6)
    with torch.no_grad():
        full_row0 = model(ids[:1]).logits[0, 5]
        full_row1 = model(ids[1:, :3]).logits[0, 2]
        cache = StaticKVCache(model.config, batch_size=2, max_length=8)
        model(ids[:, :5], positions=torch.arange(5).expand(2, 5), cache=cache)
        step = torch.stack([ids[0, 5], ids[1, 2]])[:, None]
        logits = model(step, positions=torch.tensor([[5], [2]]), cache=cache).logits
    assert (logits[0, 0] - full_row0).abs().max() < 1e-4
    assert (logits[1, 0] - full_row1).abs().max() < 1e-4


def test_packed_documents_do_not_attend_to_each_other():
    model = build_model(tiny_config("v3"), seed=0).eval()
    first, second = tokens(96, 1, 5, seed=1), tokens(96, 1, 7, seed=2)
    packed = torch.cat([first, second], dim=1)
    documents = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        logits = model(packed, positions=positions, document_ids=documents).logits
        alone = model(second).logits
    assert (logits[:, 5:] - alone).abs().max() < 1e-4


# ----- DeepSeekMoE routing (facts 4-5) ----------------------------------------------------------
def test_grouped_experts_equal_naive_per_token_loop():
    moe = build_model(tiny_config("v3"), seed=0).model.layers[1].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(20, 64)
    weights, indices, _ = moe.gate(x)
    assert torch.allclose(moe.experts(x, weights, indices), moe.experts.naive_forward(x, weights, indices), atol=1e-6)
    # Inference: a few tokens (batch-1 decoding, speculative verification) run pair by pair, more are grouped.
    for tokens in (1, 3, moe_layers.FEW_PAIRS // moe.gate.top_k + 1, 20):
        rows = x[2 : 2 + tokens]
        with torch.no_grad():
            weights, indices, _ = moe.gate(rows)
            expected = moe.experts.naive_forward(rows, weights, indices)
            torch.testing.assert_close(moe.experts(rows, weights, indices), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(moe.experts.few_tokens_forward(rows, weights, indices), expected, rtol=1e-5, atol=1e-6)


def _expert_gradients(experts, forward, x, weights, indices) -> list[torch.Tensor]:
    x, weights = x.detach().requires_grad_(), weights.detach().requires_grad_()
    experts.zero_grad(set_to_none=True)
    out = forward(x, weights, indices)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [out.float(), x.grad, weights.grad, experts.gate_up_proj.grad, experts.down_proj.grad]


def test_grouped_expert_kernel_gradients_equal_naive_loop():
    """Training runs kernels.grouped_swiglu: same outputs and gradients as the per-token specification,
    and zero gradient for an expert no token chose."""
    experts = build_model(tiny_config("v3"), seed=0).model.layers[1].mlp.experts
    x = torch.randn(12, 64)
    indices = torch.randint(0, 7, (12, 2), generator=torch.Generator().manual_seed(1))  # expert 7 unused
    weights = torch.rand(12, 2)
    fast = _expert_gradients(experts, experts, x, weights, indices)
    naive = _expert_gradients(experts, experts.naive_forward, x, weights, indices)
    for got, expected in zip(fast, naive, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(fast[3][7], torch.zeros_like(fast[3][7])) and torch.equal(fast[4][7], torch.zeros_like(fast[4][7]))


def test_slot_dispatch_and_combine_equal_indexing_with_autograd():
    """The permutation kernels against plain indexing (whose gradients autograd derives itself)."""
    generator = torch.Generator().manual_seed(3)
    x, weights, y = torch.randn(6, 5, generator=generator), torch.rand(6, 3, generator=generator), torch.randn(18, 5, generator=generator)
    order = torch.randint(0, 4, (18,), generator=generator).argsort(stable=True)
    results = []
    for fast in (True, False):
        leaves = [tensor.clone().requires_grad_() for tensor in (x, weights, y)]
        x_, weights_, y_ = leaves
        if fast:
            slots, combined = dispatch_slots(x_, order, 3), combine_slots(y_, weights_, order)
        else:
            slots = x_[order // 3]
            combined = torch.zeros(6, 5).index_add(0, order // 3, y_ * weights_.flatten()[order, None])
        (slots * torch.linspace(-1, 1, slots.numel()).view_as(slots)).sum().backward()
        (combined * torch.linspace(2, -1, combined.numel()).view_as(combined)).sum().backward()
        results.append([slots, combined] + [leaf.grad for leaf in leaves])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected)


def test_eager_attention_equals_sdpa():
    """CPU bf16 attention takes the eager path: same maths as SDPA, causal and with a boolean mask."""
    generator = torch.Generator().manual_seed(4)
    query, key = torch.randn(2, 3, 6, 8, generator=generator), torch.randn(2, 3, 6, 8, generator=generator)
    value = torch.randn(2, 3, 6, 4, generator=generator)
    mask = (torch.rand(2, 1, 6, 6, generator=generator) > 0.4) | torch.eye(6, dtype=torch.bool)
    for attn_mask in (None, mask):
        expected = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, is_causal=attn_mask is None, scale=0.3)
        torch.testing.assert_close(_attend_eager(query, key, value, 0.3, attn_mask), expected)
        got = _attend(query.bfloat16(), key.bfloat16(), value.bfloat16(), 0.3, attn_mask)  # dispatches to eager
        torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_grouped_decode_attention_equals_sdpa():
    """One query per row over grouped cached keys (a strided view, as the cache returns it): folding
    each key/value head's query heads into query rows computes what SDPA's GQA computes."""
    generator = torch.Generator().manual_seed(5)
    query = torch.randn(3, 1, 8, 16, generator=generator).transpose(1, 2)
    key, value = (torch.randn(3, 10, 2, 16, generator=generator).transpose(1, 2) for _ in range(2))
    mask = torch.arange(10)[None, None, None, :] <= torch.tensor([3, 9, 6])[:, None, None, None]
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(_attend(query, key, value, 0.25, mask, num_kv_groups=4), expected)
    got = _attend(query.bfloat16(), key.bfloat16(), value.bfloat16(), 0.25, mask, num_kv_groups=4)
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_grouped_expert_kernel_under_bf16_autocast_equals_per_expert_linears():
    experts = build_model(tiny_config("v3"), seed=0).model.layers[1].mlp.experts
    x, weights = torch.randn(16, 64), torch.rand(16, 2)
    indices = torch.randint(0, 8, (16, 2), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = _expert_gradients(experts, experts, x, weights, indices)
        experts.linear = lambda x, weight: torch.nn.functional.linear(x, weight)  # not F.linear: the per-expert loop
        looped = _expert_gradients(experts, experts, x, weights, indices)
    for got, expected in zip(fast, looped, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-3)


def _router(**overrides) -> Router:
    router = Router(tiny_config("v3", **overrides))
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    return router


def test_correction_bias_changes_selection_but_not_gate_weights():
    router = _router(n_group=1, topk_group=1)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    router.e_score_correction_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
    weights, indices, scores = router(x)
    assert set(indices.flatten().tolist()) == {0, 1}  # the bias decides the selection...
    expected = scores[:, :2] / scores[:, :2].sum(-1, keepdim=True) * 2.5  # ...weights use unbiased scores
    order = indices.argsort(dim=-1)
    assert torch.allclose(weights.gather(1, order), expected, atol=1e-6)


def test_group_limiting_masks_dropped_groups_with_minus_infinity():
    """All biased scores negative: a 0.0-filled mask (as in HF/remote code) would admit dropped experts."""
    router = _router()
    router.e_score_correction_bias.fill_(-3.0)
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    _, indices, scores = router(x)
    biased = (scores - 3.0).view(64, 4, 2)
    kept_groups = biased.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
    chosen_groups = indices // 2
    for token in range(64):
        assert set(chosen_groups[token].tolist()) <= set(kept_groups[token].tolist())


def test_v2_group_score_is_max_and_weights_unnormalized():
    router = _router(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                     routed_scaling_factor=16.0)
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    weights, indices, scores = router(x)
    group_max = scores.view(32, 4, 2).amax(-1)
    kept = group_max.topk(2, dim=-1).indices
    masked = scores.view(32, 4, 2).clone()
    keep = torch.zeros(32, 4, dtype=torch.bool).scatter_(1, kept, True)
    masked[~keep] = float("-inf")
    expected = masked.view(32, 8).topk(2, dim=-1)
    assert torch.equal(indices.sort(-1).values, expected.indices.sort(-1).values)
    assert torch.allclose(weights.sort(-1).values, (expected.values * 16.0).sort(-1).values)


def test_expert_counts_and_sequence_balance_loss():
    model = build_model(tiny_config("v3"), seed=0).train()
    ids = tokens(96, batch=3, seq=10)
    output = model(ids, labels=ids, balance_alpha=0.01)
    assert len(output.router_stats) == len(model.moe_layers()) == 3  # 2 main MoE layers + the MTP block
    assert output.router_stats[0].tokens_per_expert.sum() == 30 * 2
    moe = model.model.layers[1].mlp
    x = torch.randn(3, 10, 64)
    _, indices, scores = moe.gate(x.view(-1, 64))
    expected = 0.0
    for sequence in range(3):
        s = scores.view(3, 10, 8)[sequence]
        chosen = indices.view(3, 10, 2)[sequence]
        f = torch.tensor([(chosen == i).sum().item() * 8 / (2 * 10) for i in range(8)])
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        expected += (f * p).sum() / 3
    assert torch.allclose(moe.sequence_balance_loss(scores, indices, 3), expected, atol=1e-6)


def test_first_k_dense_layers_and_shared_experts_width():
    config = tiny_config("v2-lite-greedy")
    model = build_model(config, device="meta")
    assert not isinstance(model.model.layers[0].mlp, MoE)
    assert model.model.layers[0].mlp.gate_proj.out_features == config.intermediate_size
    moe = model.model.layers[1].mlp
    assert moe.shared_experts.gate_proj.out_features == 2 * config.moe_intermediate_size


def test_router_bias_stays_fp32_in_bf16_model():
    model = build_model(tiny_config("v3"), dtype=torch.bfloat16, seed=0)
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias not in set(model.parameters())


@pytest.mark.parametrize("grad", [False, True])  # the fused routing kernel (inference) and the PyTorch ops
def test_router_logits_stay_fp32_under_autocast(grad):
    """Router logits are fp32 under bf16 autocast too (DeepSeek and HF upcast both operands): the same
    weights, indices and scores as without autocast. (The linear would otherwise autocast to bf16,
    and the fused routing kernel refused its bf16 logits: a bf16 GRPO rollout of a MoE model crashed.)"""
    router = build_model(tiny_config("v3"), seed=0).model.layers[1].mlp.gate
    x = torch.randn(7, router.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.set_grad_enabled(grad):
        expected = router(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = router(x)
    assert got[2].dtype == torch.float32
    for value, want in zip(got, expected, strict=True):
        assert torch.equal(value, want)


def test_mtp_targets_never_cross_packed_documents():
    """Depth 1 at the last token of document A would predict document B's second token: ignored."""
    model = build_model(tiny_config("v3"), seed=0).eval()
    ids = tokens(96, batch=1, seq=10, seed=3)
    documents = torch.tensor([[0] * 5 + [1] * 5])
    labels = tokens(96, batch=1, seq=10, seed=4)
    with torch.no_grad():
        output = model(ids, labels=labels, document_ids=documents, return_logits=True)
        logits = output.mtp_logits[0]
        kept = torch.ones(9, dtype=torch.bool)
        kept[4] = False  # position 4 (end of A) + 1 is in B
        expected = torch.nn.functional.cross_entropy(logits[0, kept], labels[0, 1:][kept])
    assert torch.allclose(output.mtp_loss, expected, atol=1e-6)


# ----- fused output head + cross-entropy (kernels.linear_cross_entropy) ----------------------------
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(dtype):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 50, 16, generator=generator, requires_grad=True)
    weight = torch.randn(20000, 16, generator=generator, requires_grad=True)  # 150 rows: 12 chunks on CPU
    labels = torch.randint(0, 20000, (3, 50), generator=generator)
    labels[:, ::4] = IGNORE_INDEX
    upstream = 2.0**16 if dtype == torch.float16 else 0.3  # fp16: a loss scale must neither overflow nor underflow
    results = []
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for fused in (True, False):
            hidden.grad = weight.grad = None
            if fused:
                loss = linear_cross_entropy(hidden, weight, labels, IGNORE_INDEX)
            else:
                logits = torch.nn.functional.linear(hidden, weight).float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
            (upstream * loss).backward()
            results.append([loss, hidden.grad / upstream, weight.grad / upstream])
    tolerance = dict(rtol=2e-2, atol=2e-3) if dtype else dict(rtol=1e-5, atol=1e-6)
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, **tolerance)



@pytest.mark.parametrize("dtype, cpu_kernel", [(None, True), (None, False), (torch.bfloat16, False), (torch.float16, False)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [True, False])
def test_linear_token_logprobs_equal_log_softmax_then_gather(dtype, temperature, entropy, cpu_kernel, monkeypatch):
    """GRPO's fused head: per-token log-probs at a temperature (and the entropy) equal log_softmax of
    the logits / T gathered at the targets, with the same gradients for any per-token upstream gradient.
    fp32 on CPU takes `cpu_ops.token_logprobs` where the kernels are built (`cpu_kernel`), else the
    chunked PyTorch ops."""
    if not cpu_kernel:
        monkeypatch.setattr(cpu_ops, "for_cpu", lambda tensor: None)
    elif cpu_ops.for_cpu(torch.zeros(1)) is None:
        pytest.skip("the fused CPU kernels could not be built here (no C++ compiler or ninja)")
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(150, 16, generator=generator, requires_grad=True)
    weight = torch.randn(20003, 16, generator=generator, requires_grad=True)  # 150 rows: 12 chunks on CPU
    targets = torch.randint(0, 20003, (150,), generator=generator)
    upstream = torch.randn(150, generator=generator) * (2.0**12 if dtype == torch.float16 else 1.0)
    results = []
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for fused in (True, False):
            hidden.grad = weight.grad = None
            if fused:
                logprobs, values = linear_token_logprobs(hidden, weight, targets, temperature, entropy)
                assert (values is not None) == entropy and logprobs.dtype == torch.float32
            else:
                all_logprobs = (torch.nn.functional.linear(hidden, weight).float() / temperature).log_softmax(dim=-1)
                logprobs = all_logprobs.gather(1, targets[:, None]).squeeze(1)
                values = -(all_logprobs.exp() * all_logprobs).sum(dim=-1).detach() if entropy else None
            (upstream * logprobs).sum().backward()
            results.append([logprobs, hidden.grad, weight.grad] + ([values] if entropy else []))
    tolerance = dict(rtol=2e-2, atol=2e-2) if dtype else dict(rtol=1e-5, atol=1e-5)
    for got, expected in zip(*results, strict=True):
        scale = expected.abs().max().item()
        torch.testing.assert_close(got / scale, expected / scale, **tolerance)

def test_model_losses_without_logits_equal_losses_from_logits():
    """Training (labels, no logits) runs the fused head: same LM and MTP losses and gradients."""
    model = build_model(tiny_config("v3"), seed=0).train()
    ids, labels = tokens(96, seq=12), tokens(96, seq=12, seed=5)
    labels[0, :3] = IGNORE_INDEX
    results = []
    for return_logits in (False, True):
        model.zero_grad(set_to_none=True)
        output = model(ids, labels=labels, return_logits=return_logits)
        output.loss.backward()
        assert (output.logits is not None) == return_logits
        results.append([output.lm_loss, output.mtp_loss] + [p.grad for p in model.parameters()])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_onednn_mm_equals_torch_mm(monkeypatch):
    """kernels.mm: torch.mm's product for a plain `a` and for a transposed view (the fused head's
    weight gradient, computed as (b^T a^T)^T so oneDNN does not copy `a`); on torch.mm for a shape's
    first use, on oneDNN from its second."""
    monkeypatch.setattr(kernels, "_SHAPES_SEEN", {})
    calls = []
    original = kernels.onednn_product
    monkeypatch.setattr(kernels, "onednn_product", lambda *args: calls.append(1) or original(*args))
    generator = torch.Generator().manual_seed(0)
    gradient, hidden = torch.randn(300, 5000, generator=generator), torch.randn(300, 32, generator=generator)
    for a, b in ((gradient.t(), hidden), (hidden.t().contiguous(), gradient)):
        calls.clear()
        for use in range(2):
            torch.testing.assert_close(kernels.mm(a, b), torch.mm(a, b), rtol=1e-5, atol=1e-4)
            assert len(calls) == use


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("name", ["v3", "qwen2"])
def test_onednn_gemms_give_the_blas_losses_and_gradients(name, monkeypatch):
    """Every fp32 training product of the linear layers and the fused head on oneDNN
    (ONEDNN_MIN_MACS = 0) gives the losses and gradients of the BLAS (torch.mm / F.linear) path."""
    monkeypatch.setattr(kernels, "_SHAPES_SEEN", {})
    model = build_model(tiny_config(name), seed=0).train()
    ids, labels = tokens(model.config.vocab_size, seq=12), tokens(model.config.vocab_size, seq=12, seed=5)
    calls = []
    original = kernels.onednn_product
    for module in (kernels, layers):
        monkeypatch.setattr(module, "onednn_product", lambda *args: calls.append(1) or original(*args))
    results = []
    for threshold in (kernels.ONEDNN_NEVER, 0, 0):  # oneDNN from a shape's second use on
        monkeypatch.setattr(kernels, "ONEDNN_MIN_MACS", threshold)
        calls.clear()
        model.zero_grad(set_to_none=True)
        output = model(ids, labels=labels)
        output.loss.backward()
        results.append([output.loss] + [p.grad for p in model.parameters()])
        assert bool(calls) == (threshold == 0)
    for other in results[1:]:  # shapes partly seen (some on oneDNN), then all seen (all on oneDNN)
        for got, expected in zip(other, results[0], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["v3", "qwen2"])
def test_fused_projections_follow_their_parameters(name):
    """The engine fuses linears that read one input (q/k/v, gate/up, MLA's q_a + kv_a) into one buffer
    whose rows are the parameters: same outputs, optimizer steps on the parameters reach the fused
    matmul, and a parameter replaced wholesale turns the fusion off instead of going stale."""
    from nanoseek.infer.engine import fuse_projections

    model = build_model(tiny_config(name), seed=0)
    reference = copy.deepcopy(model)
    fuse_projections(model)
    fused = [m.fused for m in model.modules() if getattr(m, "fused", None) is not None]
    assert len(fused) == 2 * model.config.num_hidden_layers + (name == "v3") * (model.config.num_hidden_layers - 1)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))

    def assert_fused_equals_separate():
        with torch.no_grad():
            assert any(f.usable for f in fused)
            fast = model(ids).logits
        with torch.enable_grad():  # the layers one by one
            assert not any(f.usable for f in fused)
            separate = model(ids).logits.detach()
        torch.testing.assert_close(fast, separate, rtol=1e-5, atol=1e-6)
        return fast

    with torch.no_grad():
        torch.testing.assert_close(assert_fused_equals_separate(), reference(ids).logits, rtol=1e-5, atol=1e-6)
    before = model.model.layers[0].self_attn.fused.weight.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.equal(model.model.layers[0].self_attn.fused.weight, before)
    assert_fused_equals_separate()
    first = model.model.layers[0].self_attn.fusable_projections()[0]
    first.weight.data = torch.full_like(first.weight, 0.01)
    with torch.no_grad():
        assert not fused[0].usable and fused[1].usable
    assert_fused_equals_separate()
    # new Parameter objects (load_state_dict(assign=True)) count as replaced too
    owner = next(m for m in model.modules() if getattr(m, "fused", None) is fused[-1])
    owner.load_state_dict({key: value.clone() for key, value in owner.state_dict().items()}, assign=True)
    with torch.no_grad():
        assert not fused[-1].usable
    assert_fused_equals_separate()
