"""The fused CPU inference kernels (nanoseek/model/cpu_ops.py) against the PyTorch code they replace."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import modules_only, peaky_model, single_thread, watch_fused_decode  # noqa: F401 (autouse fixture)
from model_configs import PARITY_CONFIGS, tiny_config

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.cache import PagedKVCache
from nanoseek.infer.packing import pack_expert_panels
from nanoseek.infer.quant import INT8_KERNEL_DTYPE, int8_linear, quantize_int8, quantize_model
from nanoseek.infer.sampling import draw, greedy_tokens
from nanoseek.model import attention, build_model, cpu_ops
from nanoseek.model.layers import (
    RMSNorm,
    RotaryAngles,
    apply_rope_half,
    apply_rope_interleaved,
    silu_and_mul,
    silu_mul,
)
from nanoseek.model.moe import EXPERT_KERNEL_MAX_TOKENS, RoutedExperts, Router

TOLERANCE = {torch.float32: {"rtol": 1e-6, "atol": 1e-6}, torch.bfloat16: {}, torch.float16: {}}  # {}: dtype defaults


@contextlib.contextmanager
def pytorch_ops():
    """Run the PyTorch code the kernels replace."""
    cpu_ops.set_enabled(False)
    try:
        yield
    finally:
        cpu_ops.set_enabled(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_equals_pytorch(kernels, dtype):
    norm = RMSNorm(96).to(dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=generator) + 0.5)
        x = (torch.randn(3, 5, 2 * 96, generator=generator) * 4).to(dtype)[..., ::2]  # strided input
        fused = norm(x)
        with pytorch_ops():
            expected = norm(x)
    assert fused.dtype == dtype and fused.shape == (3, 5, 96)
    torch.testing.assert_close(fused, expected, **TOLERANCE[dtype])
    if dtype != torch.float32:  # normalized in fp32, rounded, then scaled: at most one rounding step apart
        mismatch = (fused != expected).float().mean().item()
        assert mismatch < 0.05


def test_silu_and_mul_over_the_whole_float_range(kernels):
    """The kernel's own exp (vectorized, ~2 ulp): fp32 gates from -100 to 100, where e^-x under- and
    overflows, within 3e-7 relative of F.silu computed in float64."""
    gate = torch.linspace(-100, 100, 40001)
    with torch.no_grad():
        fused = silu_and_mul(torch.cat([gate, torch.ones_like(gate)])[None])[0]
    torch.testing.assert_close(fused, F.silu(gate.double()).float(), rtol=3e-7, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_silu_and_mul_equals_pytorch(kernels, dtype):
    gate_up = (torch.randn(4, 3, 2 * 40, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    with torch.no_grad():
        fused = silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    assert fused.shape == (4, 3, 40)
    torch.testing.assert_close(fused, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("rope", [apply_rope_interleaved, apply_rope_half])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_pytorch(kernels, rope, dtype):
    """Per-head queries (a strided slice, as MLA's q_pe is) and MLA's shared key [b, s, dim]; angles
    of shortened sequences (MTP's `narrow`) are strided too."""
    generator = torch.Generator().manual_seed(4)
    angles = torch.rand(2, 9, 8, generator=generator) * 6
    angles = RotaryAngles(angles.cos() * 1.1, angles.sin() * 1.1).narrow(7)
    queries = torch.randn(2, 7, 3, 24, generator=generator).to(dtype)[..., 8:]
    shared_key = torch.randn(2, 7, 16, generator=generator).to(dtype)
    for x in (queries, shared_key) if rope is apply_rope_interleaved else (queries,):
        with torch.no_grad():
            fused = rope(x, angles)
            with pytorch_ops():
                expected = rope(x, angles)
        assert fused.shape == x.shape and fused.dtype == dtype
        torch.testing.assert_close(fused, expected, **TOLERANCE[dtype])


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("angle_rows", [1, 2])
def test_mla_cache_write_stores_the_bits_of_the_ops(kernels, interleaved, dtype, angle_rows):
    """The one-pass MLA cache write of a verify step (2 sequences x 3 tokens, kv a slice of a wider fused
    projection, angles per sequence or shared) stores exactly what rms_norm, rope and index_copy_
    store, at the same slots, and nothing elsewhere."""
    generator = torch.Generator().manual_seed(8)
    rank, rope_dim = 40, 16
    fused = torch.randn(2, 3, 24 + rank + rope_dim, generator=generator).to(dtype)
    kv = fused[..., 24:]
    norm = (torch.rand(rank, generator=generator) + 0.5).to(dtype)
    angles = torch.rand(angle_rows, 3, rope_dim // 2, generator=generator) * 6
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([5, 9, 2, 17, 11, 0])
    pools = [torch.zeros(20, rank, dtype=dtype), torch.zeros(20, rope_dim, dtype=dtype)]
    expected = [pool.clone() for pool in pools]
    latent = kernels.rms_norm(kv[..., :rank], norm, 1e-6)
    k_pe = kernels.rope(kv[..., rank:], cos, sin, interleaved)
    expected[0].index_copy_(0, slots, latent.flatten(0, 1))
    expected[1].index_copy_(0, slots, k_pe.flatten(0, 1))
    kernels.mla_cache_write(kv, norm, 1e-6, cos, sin, interleaved, *pools, slots)
    assert torch.equal(pools[0], expected[0]) and torch.equal(pools[1], expected[1])
    assert pools[0][slots].abs().sum(-1).min() > 0 and pools[0][[1, 3, 4]].abs().sum() == 0
    with pytest.raises(RuntimeError, match="write slot out of range"):
        kernels.mla_cache_write(kv, norm, 1e-6, cos, sin, interleaved, *pools, slots + 10)


# Attention shapes off the kernel's vector widths: heads past one 8-head vector and not a multiple of
# it, a latent rank that takes a 128-wide chunk, a 16-wide one and a scalar tail, an odd value width.
WIDE_MLA = {"num_attention_heads": 11, "num_key_value_heads": 11, "kv_lora_rank": 152, "qk_nope_head_dim": 24,
            "v_head_dim": 20}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("shape", ["tiny", "wide"])
@pytest.mark.parametrize("batch", [1, 2])
def test_absorbed_mla_attention_equals_pytorch(kernels, dtype, queries, shape, batch):
    """The fused absorbed attention of a decode (1 query) or verify step (3) against the batched
    matmuls, over a ragged batch (the shorter row's padding keys masked) or one sequence, with the latent
    a strided view of a cache buffer; weights frozen in fp32 as the engine keeps them. The wide shape is
    enough work to split over two threads: the batch's sequences, or one sequence's 11 heads (unevenly)."""
    config = tiny_config("v3", **(WIDE_MLA if shape == "wide" else {}))
    attention = build_model(config, seed=0).model.layers[0].self_attn.to(dtype)
    attention.frozen_absorbed = tuple(w.contiguous() for w in attention.absorbed_weights(torch.float32))
    generator = torch.Generator().manual_seed(5)
    heads, keys = attention.num_heads, 11 if shape == "tiny" else 37
    q_nope = torch.randn(2, queries, heads, attention.qk_nope_head_dim, generator=generator).to(dtype)
    q_pe = torch.randn(2, queries, heads, attention.qk_rope_head_dim, generator=generator).to(dtype)
    entries = torch.randn(2, keys, attention.kv_lora_rank + attention.qk_rope_head_dim, generator=generator).to(dtype)
    latent, k_pe = entries.split([attention.kv_lora_rank, attention.qk_rope_head_dim], dim=-1)
    positions = torch.tensor([[keys - queries + i for i in range(queries)], [6 - queries + i for i in range(queries)]])
    mask = (torch.arange(keys)[None, None, :] <= positions[:, :, None])[:, None]
    q_nope, q_pe, latent, k_pe, mask = (t[:batch] for t in (q_nope, q_pe, latent, k_pe, mask))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            fused = attention.attend_absorbed(q_nope, q_pe, latent, k_pe, mask)
            with pytorch_ops():
                expected = attention.attend_absorbed(q_nope, q_pe, latent, k_pe, mask)
    finally:
        torch.set_num_threads(threads)
    assert fused.shape == expected.shape == (batch, queries, heads, attention.v_head_dim) and fused.dtype == dtype
    torch.testing.assert_close(fused, expected, **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_argmax_equals_pytorch(kernels, dtype):
    """Greedy decoding's argmax: the first maximum per row, over rows that are not a multiple of the
    kernel's 16-wide vectors, with ties (the first one wins), -inf entries, and NaN (its index wins,
    as torch.argmax's)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 1003, generator=generator).to(dtype)
    logits[1, 40] = logits[1, 900] = logits[1].max() + 1  # a tie: 40 first
    logits[2, :500] = float("-inf")
    logits[3, 1001] = logits[3].max() + 1  # the maximum in the scalar tail
    logits[4, 700] = float("nan")
    logits[4, 5] = float("inf")
    logits[5] = float("-inf")  # every value equal: index 0
    assert kernels.argmax(logits).tolist() == logits.float().argmax(dim=-1).tolist()
    assert kernels.argmax(logits).tolist()[1] == 40 and kernels.argmax(logits).tolist()[4] == 700
    assert kernels.argmax(logits[0]).shape == ()  # a single row: a scalar, like torch.argmax(x, -1)
    with torch.no_grad():
        assert greedy_tokens(logits) == logits.float().argmax(dim=-1).tolist()


@pytest.mark.parametrize("rows, vocab", [(1, 1), (3, 7), (8, 1024), (13, 1024), (16, 32000)])
def test_inverse_cdf_draws_the_tokens_pytorch_draws(kernels, rows, vocab):
    """Sampling's inverse-CDF draw: the same token as the PyTorch code (fp64 cumsum + searchsorted,
    which `draw` runs while a gradient is recorded) for every row, whether rows come in whole groups of
    the kernel's interleaved rows or not, with zero-probability runs (equal sums: the search must step
    over them), sharp and flat distributions, and u at 0 and just below 1."""
    generator = torch.Generator().manual_seed(8)
    for trial in range(12):
        probs = (torch.randn(rows, vocab, generator=generator) * (trial % 4 * 3 + 0.1)).softmax(dim=-1)
        if trial % 3 == 0:
            probs[probs < probs.median()] = 0
        u = torch.rand(rows, generator=generator, dtype=torch.float64)
        u[0] = 0.0 if trial == 1 else 1 - 2**-53 if trial == 2 else u[0]
        with torch.enable_grad():
            expected = draw(probs, u)
        assert kernels.inverse_cdf(probs, u).tolist() == expected.tolist()
        with torch.no_grad():
            assert draw(probs, u).tolist() == expected.tolist()
    # A target equal to a cumulative sum takes the next token, and a zero-probability token is never
    # drawn, not even at u = 0 (the search is for the first sum above the target, not at it).
    probs = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.0, 0.5]])
    assert kernels.inverse_cdf(probs, torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)).tolist() == [2, 2, 3]


@pytest.mark.parametrize("rows, vocab, temperature", [(1, 1, 1.0), (5, 16, 0.7), (64, 618, 1.0), (3, 33000, 1.3)])
def test_sample_rows_is_the_inverse_cdf_of_the_softmax(kernels, rows, vocab, temperature):
    """Temperature sampling in one call: the token is the inverse-CDF draw of softmax(logits / T)
    computed in fp64 (the same token wherever u is not within rounding of a boundary of the
    cumulative distribution), its log-prob the fp64 log-softmax's; sharp, flat and partly underflowing
    rows, vocabularies off the kernel's 16-value blocks, u at 0 and just below 1."""
    generator = torch.Generator().manual_seed(vocab)
    for trial in range(6):
        logits = torch.randn(rows, vocab, generator=generator) * (trial * 8 + 0.1)
        u = torch.rand(rows, generator=generator, dtype=torch.float64)
        u[0] = 0.0 if trial == 1 else 1 - 2**-53 if trial == 2 else u[0]
        tokens, logprobs = kernels.sample_rows(logits, torch.full((rows,), temperature), u)
        reference = (logits.double() / temperature).log_softmax(dim=-1)
        cdf = reference.exp().cumsum(dim=-1)
        expected = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1).clamp(max=vocab - 1)
        near = ((cdf - (u * cdf[:, -1])[:, None]).abs() < 1e-6).any(dim=-1)  # a boundary within rounding
        assert (tokens == expected)[~near].all()
        assert reference.exp().gather(1, tokens[:, None]).min() > 0  # never a token of probability 0
        torch.testing.assert_close(logprobs.double(), reference.gather(1, tokens[:, None]).squeeze(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_is_the_same_ops_in_one_call(kernels, dtype, with_bias):
    generator = torch.Generator().manual_seed(6)
    q, scale = quantize_int8(torch.randn(40, 32, generator=generator))
    scale = scale.to(INT8_KERNEL_DTYPE)
    bias = torch.randn(40, generator=generator) if with_bias else None
    x = torch.randn(2, 3, 32, generator=generator).to(dtype)
    with torch.no_grad():
        fused = int8_linear(x, q, scale, bias)
        with pytorch_ops():
            expected = int8_linear(x, q, scale, bias)
    assert fused.dtype == expected.dtype and torch.equal(fused, expected)


def count_decode_path(kernels, monkeypatch, path: str, kernel: str, calls: list) -> None:
    """Record in `calls` each decode-step attention of `path`: "modules" (the layer's modules call the
    kernel `kernel`, whether it got read slots: the only int64 tensor among its arguments) or
    "decode_layer" (the whole layer as one C++ call, `nanoseek.model.decode_layer`, which always reads
    the pool; whether it ran, for each decode step)."""
    if path == "modules":
        modules_only(monkeypatch)
        fused = getattr(kernels, kernel)

        def recorded(*args):
            calls.append(any(isinstance(a, torch.Tensor) and a.dtype == torch.int64 for a in args))
            return fused(*args)

        monkeypatch.setattr(kernels, kernel, recorded)
    else:
        def seen(kind, x, result):
            if x.shape[1] == 1 and cpu_ops.for_inference(x) is not None:  # a decode step with the kernels on
                calls.append(result is not None)

        watch_fused_decode(monkeypatch, seen)


@pytest.mark.parametrize("path", ["modules", "decode_layer"])
def test_an_unpacked_model_takes_the_mla_kernel_with_its_current_weights(kernels, monkeypatch, path):
    """A model the engine does not pack (small fp32, or one a trainer keeps updating) still decodes
    through the MLA kernel, with fp32 copies of its absorbed weights that are remade when kv_b_proj
    changes in place (as an optimizer step changes it): the tokens and log-probs of the PyTorch code
    before and after the change, through the modules and as whole-layer calls."""
    model = peaky_model("v3")
    calls = []
    count_decode_path(kernels, monkeypatch, path, "mla_decode_attention", calls)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)

    def decode():
        return Engine(model, max_num_seqs=2, pack_weights=False).generate([[5, 6, 7, 8]], params)[0].outputs[0]

    for step in range(2):
        if step:
            with torch.no_grad():
                for layer in model.model.layers:
                    layer.self_attn.kv_b_proj.weight.mul_(-1.5)
        calls.clear()
        got = decode()
        with pytorch_ops():
            expected = decode()
        assert calls and all(calls) and model.model.layers[0].self_attn.frozen_absorbed is None
        assert got.token_ids == expected.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(expected.logprobs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queries", [1, 3])
@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (6, 3), (9, 3), (12, 1)])
@pytest.mark.parametrize("batch, keys, dim", [(2, 37, 16), (9, 70, 24), (3, 45, 64), (4, 33, 40)])
def test_grouped_query_attention_over_the_pool_equals_pytorch(kernels, dtype, queries, heads, kv_heads, batch, keys,
                                                              dim):
    """The fused grouped-query attention of a decode (1 query) or verify step (3) reading keys and
    values in a pool through scattered slots, against gathering them and SDPA: a ragged batch (shorter
    rows' padding keys masked), groups of 4, 2, 3 and 12 query heads (so 1, 2 and 3 rows are left after
    the kernel's blocks of 4), key counts not a multiple of its 4-key blocks, head dims of one, one and
    a half, two and a half and four 16-value vectors (the halves are masked partial loads), the query a
    strided view; 9 x 70 is enough work for the kernel to split (sequence, KV head) pairs over threads."""
    generator = torch.Generator().manual_seed(7)
    pool_slots = 1000
    key_pool, value_pool = (torch.randn(pool_slots, kv_heads, dim, generator=generator).to(dtype) for _ in range(2))
    slots = torch.stack([torch.randperm(pool_slots, generator=generator)[:keys] for _ in range(batch)])
    query = torch.randn(batch, queries, heads + 3, dim, generator=generator).to(dtype)[:, :, 3:]
    lengths = [keys] + torch.randint(queries, keys, (batch - 1,), generator=generator).tolist()
    positions = torch.tensor([[length - queries + i for i in range(queries)] for length in lengths])
    mask = (torch.arange(keys)[None, None, :] <= positions[:, :, None])[:, None]
    with torch.no_grad():
        fused = kernels.gqa_decode_attention(query, key_pool, value_pool, slots, mask, dim**-0.5)
        key, value = (pool[slots.flatten()].view(batch, keys, kv_heads, dim) for pool in (key_pool, value_pool))
        expected = F.scaled_dot_product_attention(
            query.transpose(1, 2).float(), key.transpose(1, 2).float(), value.transpose(1, 2).float(),
            attn_mask=mask, scale=dim**-0.5, enable_gqa=True,
        ).transpose(1, 2)
    assert fused.shape == query.shape and fused.dtype == dtype
    torch.testing.assert_close(fused.float(), expected, **({"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}))


@pytest.mark.parametrize("path", ["modules", "decode_layer"])
@pytest.mark.parametrize("name, kernel", [("v3", "mla_decode_attention"), ("qwen2", "gqa_decode_attention"),
                                          ("llama3", "gqa_decode_attention")])
def test_decoding_reads_the_paged_pool(kernels, monkeypatch, name, kernel, path):
    """Decode steps read the cache where it lies in the engine's block pool (the kernel gets the pool
    and the read slots, no gathered copy), with the tokens and log-probs of the PyTorch code: MLA's
    latent cache, Qwen2/Llama's keys and values; through the modules and as whole-layer calls. Blocks
    of 4 tokens, so every sequence spans several non-adjacent blocks."""
    model = peaky_model(name)
    calls = []
    count_decode_path(kernels, monkeypatch, path, kernel, calls)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)

    def decode():
        outputs = Engine(model, max_num_seqs=2, block_size=4).generate(prompts, params)
        return [o.outputs[0] for o in outputs]

    got = decode()
    with pytorch_ops():
        expected = decode()
    assert calls and all(calls)  # every kernel call read the pool
    for out, reference in zip(got, expected, strict=True):
        assert out.token_ids == reference.token_ids
        assert out.logprobs == pytest.approx(reference.logprobs, abs=1e-4)
        for step, reference_step in zip(out.top_logprobs, reference.top_logprobs, strict=True):
            assert step.keys() == reference_step.keys()
            assert list(step.values()) == pytest.approx(list(reference_step.values()), abs=1e-4)


@pytest.mark.parametrize("name", ["v3", "v3-qlora-null-yarn-tied-nonorm", "v2-group-limited-yarn", "v2-lite-greedy"])
@pytest.mark.parametrize("tokens", [2, 37])
def test_routing_equals_pytorch(kernels, name, tokens):
    """Same experts in the same order (the order sets the summation order), same weights and scores:
    noaux_tc with bias and groups, softmax with group-limited and plain greedy, norm_topk_prob on/off;
    the logits of a decode step's few tokens from the kernel's own product, of more from at::linear."""
    router = Router(tiny_config(name))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        router.weight.normal_(generator=generator)
        router.e_score_correction_bias.normal_(0, 0.1, generator=generator)
        x = torch.randn(tokens, router.weight.shape[1], generator=generator)
        weights, indices, scores = router(x)
        with pytorch_ops():
            expected_weights, expected_indices, expected_scores = router(x)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype, activations", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                (torch.int8, torch.bfloat16), (torch.int8, torch.float32)])
@pytest.mark.parametrize("tokens", [1, 3, 70])
@pytest.mark.parametrize("threads", [1, 2])
def test_routed_experts_kernel_equals_each_token_through_its_experts(kernels, dtype, activations, tokens, threads):
    """The fused layer against the executable specification (naive_forward, in fp32 from the same
    rounded or quantized weights), on sizes off every block width: 72-wide rows (16-lane vectors plus a
    tail), 2 x 22 gate/up rows and 72 down rows (not multiples of the 4-row blocks), 70 tokens (tiles
    of 6 vectors plus a rest), experts shared between tokens and unused ones; with two threads the
    split of rows falls inside experts. int8: per-row scales, bf16 or fp32 activations."""
    experts = RoutedExperts(tiny_config("v3", hidden_size=72, moe_intermediate_size=22, n_routed_experts=7,
                                        num_experts_per_tok=3, n_group=1, topk_group=1))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2, generator=generator)
        experts.down_proj.normal_(0, 0.2, generator=generator)
    x = torch.randn(tokens, 72, generator=generator).to(activations)
    indices = torch.stack([torch.randperm(6, generator=generator)[:3] for _ in range(tokens)])  # expert 6 unused
    weights = torch.rand(tokens, 3, generator=generator)
    if dtype == torch.int8:
        (gate_up, gate_up_scale), (down, down_scale) = quantize_int8(experts.gate_up_proj), quantize_int8(experts.down_proj)
        scales = (gate_up_scale, down_scale)
        with torch.no_grad():  # the reference reads the dequantized weights
            experts.gate_up_proj.copy_(gate_up * gate_up_scale[..., None])
            experts.down_proj.copy_(down * down_scale[..., None])
    else:
        experts = experts.to(dtype)
        gate_up, down, scales = experts.gate_up_proj.detach(), experts.down_proj.detach(), ()
    torch.set_num_threads(threads)
    with torch.no_grad():
        got = kernels.routed_experts(x, gate_up, down, indices, weights, *scales)
        with pytorch_ops():
            expected = experts.float().naive_forward(x.float(), weights, indices)
    assert got.dtype == activations and got.shape == (tokens, 72)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=tolerance)
    with pytest.raises(RuntimeError, match="expert index out of range"):
        kernels.routed_experts(x, gate_up, down, indices + 7, weights, *scales)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [22, 230])
@pytest.mark.parametrize("tokens", [1, 3, 70])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_routed_experts_kernel_streams_panels(kernels, dtype, hidden, tokens, threads):
    """fp32 and bf16 stacks also laid out in panels (`pack_expert_panels`, what packed engines stream)
    against the executable specification (bf16: from the same rounded weights, within bf16's rounding of
    each product's output), on sizes off the 32-wide panels (72 outputs of down, 2 x 22 and 2 x 230
    of gate/up): small experts split over the threads as one range of panels; larger ones (3 x 460 x 72
    weights and more) a whole expert per thread, unless fewer experts are used than there are threads (4)."""
    experts = RoutedExperts(tiny_config("v3", hidden_size=72, moe_intermediate_size=hidden, n_routed_experts=7,
                                        num_experts_per_tok=3, n_group=1, topk_group=1))
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2, generator=generator)
        experts.down_proj.normal_(0, 0.2, generator=generator)
    experts = experts.to(dtype)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    panels = pack_expert_panels(gate_up), pack_expert_panels(down)
    assert panels[0].shape == (7, -(-2 * hidden // 32), 72, 32) and panels[1].shape == (7, 3, hidden, 32)
    x = torch.randn(tokens, 72, generator=generator).to(dtype)
    indices = torch.stack([torch.randperm(6, generator=generator)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3, generator=generator)
    torch.set_num_threads(threads)
    with torch.no_grad():
        got = kernels.routed_experts(x, gate_up, down, indices, weights, None, None, *panels)
        rows = kernels.routed_experts(x, gate_up, down, indices, weights)
        with pytorch_ops():
            expected = experts.float().naive_forward(x.float(), weights, indices)
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, rtol=1e-5, atol=tolerance)
    torch.testing.assert_close(got.float(), rows.float(), rtol=1e-5, atol=tolerance)
    with pytest.raises(RuntimeError, match="panels are"):
        kernels.routed_experts(x, gate_up, down, indices, weights, None, None, panels[1], panels[0])
    with pytest.raises(RuntimeError, match="panels are"):
        kernels.routed_experts(x, gate_up, down, indices, weights, None, None, *(p.half() for p in panels))


@pytest.mark.parametrize("activations", [torch.bfloat16, None])
def test_quantized_experts_take_the_kernel_with_the_tokens_of_the_int8_products(kernels, monkeypatch, activations):
    """An int8 model with bf16 activations (the products' own dtype) or fp32 ones (`quantize_model`'s
    default) runs its MoE layers through the kernel (int8 weights, fp32 copies of the scales) and
    decodes the tokens of one int8 product per expert. (Through the layers' modules, where the kernel
    is called from Python and can be counted; tests/test_decode_layer.py shows the one-call layer step
    gives the same tokens.)"""
    model = quantize_model(peaky_model("v3"), "int8", dtype=activations)
    modules_only(monkeypatch)
    calls = []
    fused = kernels.routed_experts
    monkeypatch.setattr(kernels, "routed_experts", lambda *args: calls.append(args[1].dtype) or fused(*args))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = Engine(model, max_num_seqs=2).generate([[5, 6, 7], [9, 10]], params)
    with pytorch_ops():
        expected = Engine(model, max_num_seqs=2).generate([[5, 6, 7], [9, 10]], params)
    assert calls and set(calls) == {torch.int8}
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


@pytest.mark.parametrize("dtype, tokens, expected", [
    (torch.float32, 1, True), (torch.float32, 300, True),
    (torch.bfloat16, EXPERT_KERNEL_MAX_TOKENS, True), (torch.bfloat16, EXPERT_KERNEL_MAX_TOKENS + 1, False),
])
def test_moe_layers_take_the_routed_experts_kernel_at_inference(kernels, monkeypatch, dtype, tokens, expected):
    """fp32 at any token count, bf16 up to EXPERT_KERNEL_MAX_TOKENS (oneDNN's bf16 products win
    beyond); never with gradients recorded (training runs the grouped PyTorch path)."""
    model = peaky_model("v3").to(dtype)
    calls = []
    fused = kernels.routed_experts
    monkeypatch.setattr(kernels, "routed_experts", lambda *args: calls.append(1) or fused(*args))
    ids = torch.randint(3, 96, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    assert bool(calls) == expected
    calls.clear()
    model.train()
    model(ids[:, :4]).logits.sum().backward()
    assert not calls


def test_kernels_stay_out_of_autograd(kernels):
    """With gradients recorded the PyTorch code runs (only causal attention has a backward kernel, tested
    below), so training is unchanged."""
    norm = RMSNorm(16)
    x = torch.randn(2, 16, requires_grad=True)
    assert cpu_ops.for_inference(x) is None
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    with torch.no_grad():
        assert cpu_ops.for_inference(x) is kernels
    with torch.no_grad(), pytorch_ops():
        assert cpu_ops.for_inference(x) is None


@pytest.mark.parametrize("name", ["v3", "v2-lite-greedy", "qwen2", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_forward_and_greedy_decoding_agree(kernels, name, dtype):
    """A whole forward with and without the kernels; fp32 greedy decoding gives the same tokens."""
    model = peaky_model(name).to(dtype)
    ids = torch.randint(3, PARITY_CONFIGS[name]["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = model(ids).logits
        with pytorch_ops():
            expected = model(ids).logits
    torch.testing.assert_close(fused, expected, rtol=0, atol=1e-4 if dtype == torch.float32 else 0.25)
    if dtype == torch.float32:
        greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        prompt = ids[0].tolist()
        fused_tokens = Engine(model, max_num_seqs=2).generate([prompt], greedy)[0].outputs[0].token_ids
        with pytorch_ops():
            expected_tokens = Engine(model, max_num_seqs=2).generate([prompt], greedy)[0].outputs[0].token_ids
        assert fused_tokens == expected_tokens


def test_a_failed_build_falls_back_with_one_warning(monkeypatch):
    """No compiler: one warning, then the PyTorch code, and no later build attempt. (On Linux the first
    load tries twice: with OpenMP, then without, for a compiler that lacks it.)"""
    monkeypatch.setattr(cpu_ops, "_module", None)
    monkeypatch.setattr(cpu_ops, "_state", "unloaded")
    attempts = []

    def failing_build(*args, **kwargs):
        attempts.append("-fopenmp" in kwargs["extra_cflags"])
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr("torch.utils.cpp_extension.load", failing_build)
    monkeypatch.setattr(cpu_ops, "_import_built", lambda name: None)  # no finished build in the cache
    model = build_model(tiny_config("qwen2"), seed=0).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad(), pytest.warns(UserWarning, match="fused CPU kernels unavailable.*Ninja is required"):
        first = model(ids).logits
    with torch.no_grad():
        second = model(ids).logits
    assert attempts == ([True, False] if sys.platform.startswith("linux") else [False]) and torch.equal(first, second)
    assert cpu_ops.for_inference(ids) is None


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(cpu_ops, "_module", None)
    monkeypatch.setattr(cpu_ops, "_state", "unloaded")
    monkeypatch.setenv("NANOSEEK_CPU_KERNELS", "0")
    monkeypatch.setattr("torch.utils.cpp_extension.load", lambda *a, **k: pytest.fail("must not build"))
    with torch.no_grad():
        assert cpu_ops.for_inference(torch.zeros(1)) is None


def test_a_build_is_kept_per_cpu_and_torch_version(monkeypatch):
    """torch's extension cache is keyed by sources and flags only: our name adds the CPU (the build is
    -march=native) and torch's version, so a shared cache or a torch upgrade never loads a stale build."""
    name, flags = cpu_ops.build_name_and_flags()
    assert "-ffp-contract=off" in flags
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert cpu_ops.build_name_and_flags()[0] != name
    monkeypatch.undo()
    monkeypatch.setattr(cpu_ops, "_cpu_flags", lambda: "flags : another cpu")
    assert cpu_ops.build_name_and_flags()[0] != name
    monkeypatch.undo()
    monkeypatch.setattr(cpu_ops, "SOURCE", Path(__file__))  # another source: another name, never a stale import
    assert cpu_ops.build_name_and_flags()[0] != name


def test_a_finished_build_is_imported_without_ninja(kernels, monkeypatch, tmp_path):
    """A process finding a finished build of the current source imports it directly (no ninja
    subprocess under a file lock at every start); a build in progress (its lock file) or none at all
    goes through torch's `load`, which builds or waits."""
    from torch.utils.cpp_extension import _get_build_directory

    name = cpu_ops.build_name_and_flags()[0]
    module = cpu_ops._import_built(name)
    assert module is not None and module.__file__ == kernels.__file__
    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    lock.touch()
    try:
        assert cpu_ops._import_built(name) is None
    finally:
        lock.unlink()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cpu_ops._import_built(name) is None


def test_which_attention_steps_take_the_fused_kernels(kernels):
    """MLA's fused attention kernel is for decode steps over caches of modest length; beyond
    FUSED_MLA_MAX_SCORES (query, position) pairs (per cache dtype), or past FUSED_MLA_MAX_QUERIES
    queries in a batch, the batched matmuls run instead. The grouped-query kernel takes decode and
    verify steps of any batch and cache length, up to FUSED_ATTENTION_MAX_QUERIES queries per sequence."""
    from nanoseek.model.attention import (
        FUSED_ATTENTION_MAX_QUERIES,
        FUSED_MLA_MAX_QUERIES,
        FUSED_MLA_MAX_SCORES,
    )

    attention = build_model(tiny_config("v3"), seed=0).model.layers[0].self_attn
    attention.frozen_absorbed = tuple(w.contiguous() for w in attention.absorbed_weights(torch.float32))

    def mask(queries: int, keys: int) -> torch.Tensor:
        return torch.ones(1, 1, queries, keys, dtype=torch.bool)

    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            budget = FUSED_MLA_MAX_SCORES[dtype]
            one, two = (torch.zeros(1, n, attention.num_heads, attention.qk_nope_head_dim, dtype=dtype) for n in (1, 2))
            assert attention.decode_kernels(one, mask(1, budget))[0] is kernels
            assert attention.decode_kernels(one, mask(1, budget + 1)) is None
            assert attention.decode_kernels(two, mask(2, budget // 2))[0] is kernels
            assert attention.decode_kernels(two, mask(2, budget // 2 + 1)) is None
        assert FUSED_MLA_MAX_SCORES[torch.bfloat16] > FUSED_MLA_MAX_SCORES[torch.float32]
        for batch in (FUSED_MLA_MAX_QUERIES, FUSED_MLA_MAX_QUERIES + 1):  # one query per sequence, 8 keys
            rows = torch.zeros(batch, 1, attention.num_heads, attention.qk_nope_head_dim)
            taken = attention.decode_kernels(rows, torch.ones(batch, 1, 1, 8, dtype=torch.bool))
            assert (taken is not None) == (batch <= FUSED_MLA_MAX_QUERIES)

    grouped = build_model(tiny_config("qwen2"), seed=0).model.layers[0].self_attn
    cache = PagedKVCache(tiny_config("qwen2"), num_blocks=4, block_size=4)
    query = torch.zeros(1, 1, grouped.num_heads, grouped.head_dim)
    batched = torch.zeros(64, FUSED_ATTENTION_MAX_QUERIES, grouped.num_heads, grouped.head_dim)
    too_many = torch.zeros(1, FUSED_ATTENTION_MAX_QUERIES + 1, grouped.num_heads, grouped.head_dim)
    with torch.no_grad():
        assert grouped.decode_kernels(query, cache, mask(1, 100_000)) is kernels
        assert grouped.decode_kernels(batched, cache, mask(FUSED_ATTENTION_MAX_QUERIES, 4096)) is kernels
        assert grouped.decode_kernels(too_many, cache, mask(FUSED_ATTENTION_MAX_QUERIES + 1, 8)) is None
        assert grouped.decode_kernels(query.bfloat16(), cache, mask(1, 8)) is None  # a cache of another dtype


@pytest.mark.parametrize("batch, seq, heads, kv_heads, dim, value_dim", [
    (2, 1, 2, 1, 16, 16),     # one position: nothing to attend but itself
    (3, 74, 4, 2, 24, 24),    # qwen2-nano's GRPO batches: 24-dim heads (a partial vector), blocks of 16 rows + 10
    (2, 37, 3, 1, 40, 40),    # three heads a KV head, 40 = 16 + 16 + 8
    (2, 130, 4, 4, 48, 32),   # MLA: value dim below the query's, past 128 positions
    (1, 33, 2, 2, 130, 70),   # head dims past 64 (the weighted sums' 64-wide chunks)
    (2, 17, 8, 2, 64, 64),
    (2, 45, 8, 1, 24, 16),    # eight query heads a KV head: a block is one position's eight heads
    (1, 40, 20, 1, 16, 16),   # twenty: blocks of eight heads, then four heads of two positions
])
@pytest.mark.parametrize("packed", [None, "documents", "shared prefix"])
def test_causal_attention_kernel_equals_sdpa_with_gradients(kernels, batch, seq, heads, kv_heads, dim, value_dim, packed):
    """The fused training attention (forward, and the backward from its saved log-sum-exp) against SDPA
    in fp64, on strided inputs (views into wider tensors, as q/k/v split from a projection are); packed:
    within documents (`DocumentMask.starts`: documents of 1 to dozens of positions, of lengths off the
    kernel's blocks of positions), against SDPA with the dense mask; shared prefix: every document
    also sees the first one (a GRPO prompt and its completions), which lies a key range apart for the
    later documents and touches the rows' own keys for the first ones."""
    generator = torch.Generator().manual_seed(seq)
    documents = None
    if packed is not None:
        cuts = torch.rand(batch, seq, generator=generator) < 0.15
        cuts[:, 1:2] = True  # a one-position document first
        if packed == "shared prefix":  # a 20-position one instead: the prompt
            cuts[:, :20], cuts[:, 20:21] = False, True
        ids = cuts.long().cumsum(dim=1)
        prefix = None
        if packed == "shared prefix":  # documents after the first see it: [0, its length)
            first_length = (ids == ids[:, :1]).sum(dim=1)
            prefix = torch.stack((torch.zeros_like(ids), first_length[:, None].expand_as(ids)), dim=-1)
            prefix = torch.where((ids != ids[:, :1])[..., None], prefix, 0)
        documents = attention.DocumentMask(ids, prefix)
        assert documents.starts is not None
    wide = torch.randn(batch, seq, heads * dim + kv_heads * (dim + value_dim) + 5, generator=generator)
    query, key, value, _ = wide.split([heads * dim, kv_heads * dim, kv_heads * value_dim, 5], dim=-1)
    query = query.unflatten(-1, (heads, dim)).requires_grad_()
    key = key.unflatten(-1, (kv_heads, dim)).requires_grad_()
    value = value.unflatten(-1, (kv_heads, value_dim)).requires_grad_()
    assert not query.is_contiguous()
    scale = dim**-0.5
    out = attention.causal_attention(query, key, value, scale, documents)
    grad_out = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, (query, key, value), grad_out)
    inputs = [t.detach().double().transpose(1, 2).requires_grad_() for t in (query, key, value)]
    expected = F.scaled_dot_product_attention(*inputs, is_causal=documents is None, scale=scale, enable_gqa=heads > kv_heads,
                                              attn_mask=None if documents is None else documents.dense)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out.double().transpose(1, 2))
    torch.testing.assert_close(out.double(), expected.transpose(1, 2), rtol=1e-5, atol=1e-5)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.double(), want.transpose(1, 2), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # without a gradient: the forward alone, the same values
        torch.testing.assert_close(attention.causal_attention(query, key, value, scale, documents), out, rtol=0, atol=0)


def test_causal_attention_kernel_refuses_a_prefix_that_varies_within_a_document(kernels):
    """The kernel gathers each document's keys once: every position of a document must see the same
    prefix range (as GRPO's packing gives), else a clear error rather than a wrong answer."""
    query = key = value = torch.randn(1, 6, 2, 16)
    starts = torch.tensor([[0, 0, 2, 2, 2, 2]])
    prefix = torch.tensor([[[0, 0], [0, 0], [0, 2], [0, 2], [0, 1], [0, 2]]])
    with pytest.raises(RuntimeError, match="same prefix range"):
        kernels.causal_attention_forward(query, key, value, 0.25, starts, prefix)
    with pytest.raises(RuntimeError, match="documents in runs"):
        kernels.causal_attention_forward(query, key, value, 0.25, torch.tensor([[0, 0, 2, 0, 2, 2]]), None)


def test_document_mask_starts_only_for_packed_layouts():
    """Each position's first key is its document's first position; an id that comes back after another
    document's (not packed runs) gives no starts, and attention then takes the dense mask."""
    documents = attention.DocumentMask(torch.tensor([[1, 1, 2, 2, 2, 0], [5, 6, 6, 6, 7, 7]]))
    assert documents.starts.tolist() == [[0, 0, 2, 2, 2, 5], [0, 1, 1, 1, 4, 4]]
    assert documents.dense[0, 0].tolist()[3] == [False, False, True, True, False, False]
    assert documents.narrow(3).starts.tolist() == [[0, 0, 2], [0, 1, 1]] and documents.longest == 3
    assert attention.DocumentMask(torch.tensor([[1, 1, 2, 1]])).starts is None


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", ["v3", "qwen2"])
def test_training_takes_the_causal_kernel_with_the_gradients_of_pytorch(kernels, monkeypatch, name, packed):
    """A model's loss and gradients with the fused attention equal those of SDPA (with packed documents,
    of SDPA over the dense document mask); the kernel ran, forward and backward, and not past
    FUSED_CAUSAL_MAX_LENGTH."""
    calls = []
    for kernel in ("causal_attention_forward", "causal_attention_backward"):
        original = getattr(kernels, kernel)
        monkeypatch.setattr(kernels, kernel, lambda *args, _f=original, _n=kernel: calls.append(_n) or _f(*args))
    model = build_model(tiny_config(name), seed=0)
    ids = torch.randint(3, PARITY_CONFIGS[name]["vocab_size"], (3, 21), generator=torch.Generator().manual_seed(1))
    documents = torch.tensor([[1] * 8 + [2] * 13, [1] * 21, [1] * 3 + [2] * 5 + [3] * 9 + [0] * 4]) if packed else None
    positions = None
    if packed:
        starts = attention.DocumentMask(documents).starts
        positions = torch.arange(21) - starts

    def loss_and_gradients():
        model.zero_grad(set_to_none=True)
        logits = model(ids, positions=positions, document_ids=documents).logits
        loss = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    loss, grads = loss_and_gradients()
    layers = model.config.num_hidden_layers
    assert calls.count("causal_attention_forward") == layers and calls.count("causal_attention_backward") == layers
    with pytorch_ops():
        expected_loss, expected_grads = loss_and_gradients()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5)
    calls.clear()
    monkeypatch.setattr(attention, "FUSED_CAUSAL_MAX_LENGTH", 20)
    loss_and_gradients()
    assert calls == []


@pytest.mark.parametrize("shape", [(3, 7, 5), (2, 9, 256)])  # a scalar tail only; whole vectors and a tail
def test_training_silu_mul_kernel_equals_pytorch_with_gradients(kernels, monkeypatch, shape):
    """SwiGLU's silu(gate) * up by the C++ kernel, forward and backward, against fp64 PyTorch."""
    calls = []
    original = kernels.silu_mul
    monkeypatch.setattr(kernels, "silu_mul", lambda *args: calls.append(len(args)) or original(*args))
    generator = torch.Generator().manual_seed(0)
    gate = (torch.randn(shape, generator=generator) * 4).requires_grad_()  # sigmoid's tails too
    up = torch.randn(shape, generator=generator).requires_grad_()
    grad = torch.randn(shape, generator=generator)
    out = silu_mul(gate, up)
    grads = torch.autograd.grad(out, (gate, up), grad)
    assert calls == [2, 3]  # forward, then backward with the gradient
    expected = F.silu(gate.double()) * up.double()
    expected_grads = torch.autograd.grad(expected, (gate, up), grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rope", [apply_rope_interleaved, apply_rope_half])
@pytest.mark.parametrize("shape", [(2, 7, 3, 24), (3, 5, 2, 40), (1, 9, 1, 64)])  # partial vectors; whole ones
def test_training_rope_kernel_equals_pytorch_with_gradients(kernels, monkeypatch, rope, shape):
    """The rotation by the C++ kernel while recording a gradient (its backward the same kernel with -sin),
    forward and input gradient against fp64 PyTorch, on a strided view, per-sequence and shared angles;
    MLA's shared key [b, s, dim] too."""
    calls = []
    original = kernels.rope
    monkeypatch.setattr(kernels, "rope", lambda *args: calls.append(1) or original(*args))
    generator = torch.Generator().manual_seed(3)
    batch, seq, heads, dim = shape
    inputs = [torch.randn(batch, seq, heads + 1, dim, generator=generator)[:, :, 1:]]
    if rope is apply_rope_interleaved:
        inputs.append(torch.randn(batch, seq, dim, generator=generator))
    for angle_batch in (batch, 1):
        turns = torch.rand(angle_batch, seq, dim // 2, generator=generator, dtype=torch.float64) * 6
        for x in inputs:
            calls.clear()
            x = x.clone().requires_grad_()
            grad = torch.randn(x.shape, generator=generator)
            out = rope(x, RotaryAngles(turns.cos().float(), turns.sin().float()))
            (got,) = torch.autograd.grad(out, x, grad)
            assert calls == [1, 1]  # forward, then backward
            with pytorch_ops():
                reference = x.detach().double().requires_grad_()
                expected = rope(reference, RotaryAngles(turns.cos(), turns.sin()))
                (expected_grad,) = torch.autograd.grad(expected, reference, grad.double())
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, threads", [((3, 5, 24), 1), ((3, 400, 96), 2)])  # one part; rows split over threads
def test_training_rms_norm_kernels_equal_pytorch(kernels, monkeypatch, shape, threads):
    """RMSNorm with a gradient: its output and gradients (input and weight) by the C++ kernels against fp64 autograd."""
    calls = []
    for name in ("rms_norm", "rms_norm_backward"):  # the forward takes the inference kernel
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, original=original, name=name: calls.append(name) or original(*args))
    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=generator))
    x = (torch.randn(shape, generator=generator) * 3).requires_grad_()
    grad = torch.randn(shape, generator=generator)
    torch.set_num_threads(threads)
    try:
        out = norm(x)
        grads = torch.autograd.grad(out, (x, norm.weight), grad)
    finally:
        torch.set_num_threads(1)
    assert calls == ["rms_norm", "rms_norm_backward"]
    x64, weight64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    expected = F.rms_norm(x64, (shape[-1],), weight64, eps=1e-5)
    expected_grads = torch.autograd.grad(expected, (x64, weight64), grad.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
