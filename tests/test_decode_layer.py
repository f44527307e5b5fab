"""A decoder layer's decode step as one C++ call (`nanoseek.model.decode_layer`) against the layer's modules.

The C++ DecodeLayer runs the ATen ops and kernels the modules run, in the same order, so every test
asks for the same bits: token ids and log-probs compared with ==, not a tolerance.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from engine_fixtures import peaky_model, single_thread, watch_fused_decode  # noqa: F401 (autouse fixture)
from torch import nn

from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.quant import quantize_model
from nanoseek.model import cpu_ops, decode_layer, layers, transformer
from nanoseek.model.decode_layer import enable_fused_decode
from nanoseek.model.kernels import onednn_product

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)


@pytest.fixture
def fused_steps(monkeypatch) -> list[bool]:
    """For each decode step with the kernels on: whether DecodeLayer ran its layers (all of them as one
    call, or a layer alone)."""
    steps: list[bool] = []

    def seen(kind, x, result):
        if x.shape[1] == 1 and cpu_ops.for_inference(x) is not None:
            steps.append(result is not None)

    watch_fused_decode(monkeypatch, seen)
    return steps


def outputs(engine: Engine, fused: bool, prompts=PROMPTS, params=PARAMS) -> list[tuple]:
    enable_fused_decode(engine.model, fused)
    results = engine.generate(prompts, params)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.outputs[0].top_logprobs) for o in results]


def assert_same_as_modules(engine: Engine, fused_steps: list[bool], **kwargs) -> None:
    expected = outputs(engine, False, **kwargs)
    fused_steps.clear()
    got = outputs(engine, True, **kwargs)
    assert fused_steps and all(fused_steps)
    assert got == expected


@pytest.mark.parametrize("name", ["v3", "v3-qlora-null-yarn-tied-nonorm", "v2-group-limited-yarn", "v2-lite-greedy",
                                  "qwen2", "llama3"])
@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8", "int8-fp32-activations"])
def test_decode_layer_gives_the_bits_of_the_modules(kernels, fused_steps, name, weights):
    """Every family (MLA with and without a query LoRA, sigmoid / softmax / group-limited routing,
    one and two shared experts, a dense first layer; Qwen2 with q/k/v biases, Llama 3), fp32, bf16
    (oneDNN-packed) and int8 weights (bf16 or fp32 activations): two ragged requests in blocks of 4
    tokens."""
    model = peaky_model(name)
    if weights == "bf16":
        model = model.to(torch.bfloat16)
    elif weights.startswith("int8"):
        model = quantize_model(model, "int8", dtype=torch.bfloat16 if weights == "int8" else None)
    engine = Engine(model, max_num_seqs=2, block_size=4, prefix_caching=False)
    assert_same_as_modules(engine, fused_steps)


@pytest.mark.parametrize("name", ["v3", "qwen2"])
@pytest.mark.parametrize("products", ["packed", "few_rows", "onednn"])
def test_decode_layer_runs_products_as_the_modules_do(kernels, fused_steps, monkeypatch, name, products):
    """fp32 weights packed in panels (the engine's default), plain ones (an engine sharing a trainer's
    model) through `linear`'s few-row products and plain ones through oneDNN's GEMM (every product past
    the few-row range, ONEDNN_MIN_MACS = 0), with one and two threads; and from two rows on only, as
    for models a little larger than the cache."""
    if products == "onednn":
        monkeypatch.setattr("nanoseek.model.kernels.ONEDNN_MIN_MACS", 0)
        monkeypatch.setattr("nanoseek.infer.engine.few_row_start", lambda model: layers.FEW_ROWS_NEVER)
    else:
        monkeypatch.setattr("nanoseek.infer.engine.few_row_start", lambda model: 1)
    engine = Engine(peaky_model(name), max_num_seqs=2, block_size=4, prefix_caching=False,
                    pack_weights=products == "packed")
    if products == "packed":
        assert engine.model.model.layers[0].self_attn.o_proj.decode_product()[0] == "panels"
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert_same_as_modules(engine, fused_steps)
    if products == "onednn":
        calls = []
        monkeypatch.setattr(layers, "onednn_product", lambda *args: calls.append(1) or onednn_product(*args))
        outputs(engine, False)
        assert calls  # the modules took oneDNN's GEMM, so the C++ products did too
    if products == "few_rows":
        engine.few_row_start = 2
        assert_same_as_modules(engine, fused_steps, prompts=PROMPTS[:1])  # single rows: F.linear
        assert_same_as_modules(engine, fused_steps)


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_grouped_query_layers_run_whole_in_any_batch(kernels, fused_steps, name, weights):
    """Grouped-query models take the whole-layer call with more than the MLA kernel's 4 query rows:
    6 ragged requests a step (their attention kernel splits sequences over threads), same bits."""
    model = peaky_model(name)
    if weights == "bf16":
        model = model.to(torch.bfloat16)
    engine = Engine(model, max_num_seqs=6, block_size=4, prefix_caching=False)
    prompts = [[5 + i, 6, 7, 8 + i, 9][: 2 + i % 4] for i in range(6)]
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert_same_as_modules(engine, fused_steps, prompts=prompts)


def test_speculative_verification_takes_the_decode_layer(kernels, monkeypatch):
    """MTP speculative decoding: the verify steps (2 queries a sequence, the layers as one call) and
    the MTP depth's own decoder block run as whole-layer calls, with the output of the modules."""
    engine = Engine(peaky_model("v3"), max_num_seqs=2, block_size=4, speculative=True, prefix_caching=False)
    expected = outputs(engine, False)
    verified, drafted = [], []
    watch_fused_decode(monkeypatch, lambda kind, x, result: (verified if kind == "stack" else drafted).append(
        (x.shape[1], result is not None)))
    got = outputs(engine, True)
    assert (2, True) in verified and drafted and all(ran for _, ran in drafted) and got == expected
    mtp_block = engine.model.mtp[0].block
    assert isinstance(mtp_block, transformer.DecoderLayer) and mtp_block.fused_decode


def test_decode_layer_follows_weights_changed_or_replaced(kernels, fused_steps):
    """The C++ layer holds the model's tensors, not copies, and is rebuilt when one is replaced: an
    in-place change (an optimizer step), a parameter assigned anew, a fused projection broken up by
    `.data =`, a module swapped: each decodes as the modules then do."""
    model = peaky_model("v3")
    engine = Engine(model, max_num_seqs=2, block_size=4, prefix_caching=False, pack_weights=False)
    assert_same_as_modules(engine, fused_steps)
    layer = model.model.layers[1]
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.post_attention_layernorm.weight.mul_(-1.0)  # in place
        model.model.layers[2].self_attn.kv_b_proj.weight.mul_(1.5)  # in place, under MLA's absorbed copies
    assert_same_as_modules(engine, fused_steps)
    attention = layer.self_attn
    attention.o_proj.weight = nn.Parameter(torch.randn(attention.o_proj.weight.shape, generator=generator) * 0.3)
    assert_same_as_modules(engine, fused_steps)
    with torch.no_grad():  # breaks the fused q_a / kv_a buffer: both run as products of their own
        attention.kv_a_proj_with_mqa.weight.data = attention.kv_a_proj_with_mqa.weight.data.clone() * 2
    assert not attention.fused.usable
    assert_same_as_modules(engine, fused_steps)
    shared = model.model.layers[2].mlp.shared_experts
    replacement = nn.Linear(shared.down_proj.in_features, shared.down_proj.out_features, bias=False)
    shared.down_proj = replacement  # a module swapped: torch's F.linear now
    with torch.no_grad():
        replacement.weight.normal_(0, 0.2, generator=generator)
    expected = outputs(engine, False)
    assert outputs(engine, True) == expected


def test_a_forward_hook_added_later_turns_the_layer_back_to_its_modules(kernels, fused_steps):
    """Hooks run: a hook registered on a layer's router after decoding started sees every step, and
    the layer goes back to the C++ call once the hook is removed."""
    model = peaky_model("v3")
    engine = Engine(model, max_num_seqs=2, block_size=4, prefix_caching=False)
    expected = outputs(engine, True)
    gate = model.model.layers[1].mlp.gate
    seen = []
    handle = gate.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[0]))
    fused_steps.clear()
    assert outputs(engine, True) == expected
    decode_steps = sum(PARAMS.max_tokens - 1 for _ in PROMPTS)
    assert len(seen) >= PARAMS.max_tokens - 1 and not all(fused_steps)
    assert sum(not ran for ran in fused_steps) == decode_steps // len(PROMPTS)  # that one layer, each step
    handle.remove()
    fused_steps.clear()
    assert outputs(engine, True) == expected and all(fused_steps)


def test_a_model_that_decoded_through_the_decode_layer_still_copies_and_pickles(kernels):
    """The C++ objects live outside the modules: deepcopy (GRPO's reference model) and pickle work, and
    the copies decode as the original does."""
    model = peaky_model("v3")
    expected = outputs(Engine(model, max_num_seqs=2, block_size=4, pack_weights=False), True)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        got = outputs(Engine(twin, max_num_seqs=2, block_size=4, pack_weights=False), True)
        assert [tokens for tokens, *_ in got] == [tokens for tokens, *_ in expected]


@pytest.mark.parametrize("case", ["fp8", "int8-off-layout"])
def test_layers_it_cannot_run_take_the_modules_without_checking_again(kernels, fused_steps, monkeypatch, case):
    """FP8 weights, and int8 projections whose input width the packed int8 kernel cannot take (72 = 8
    more than a multiple of 16, which crashes torch's kernel): the modules run every step, with their
    own output, and the layer is examined once, not at every step."""
    if case == "fp8":
        model = quantize_model(peaky_model("v3"), "fp8")
    else:
        model = quantize_model(peaky_model("qwen2", hidden_size=72), "int8", dtype=torch.bfloat16)
    engine = Engine(model, max_num_seqs=2, block_size=4, prefix_caching=False)
    expected = outputs(engine, False)
    examined = []
    sources = decode_layer._sources
    monkeypatch.setattr(decode_layer, "_sources", lambda layer, dtype: examined.append(layer) or sources(layer, dtype))
    fused_steps.clear()
    assert outputs(engine, True) == expected
    assert fused_steps and not any(fused_steps)
    assert len(examined) == len(set(map(id, examined))) == len(engine.model.model.layers)
