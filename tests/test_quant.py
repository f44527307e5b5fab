"""Weight-only quantization: int8 per channel and FP8 blocks, in memory and as checkpoints, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from engine_fixtures import peaky_model, single_thread, tiny_tokenizer  # noqa: F401 (autouse fixture)
from safetensors import safe_open

from nanoseek.checkpoint import load_pretrained
from nanoseek.cli import main as cli_main
from nanoseek.errors import CheckpointError
from nanoseek.fp8 import dequantize_blocks
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.quant import (
    QuantizedLinear,
    QuantizedRoutedExperts,
    int8_linear,
    load_model,
    quantize_checkpoint,
    quantize_int8,
    quantize_model,
)
from nanoseek.model.moe import Router

TOKENS = torch.tensor([list(range(3, 40))])


def test_int8_rows_round_within_half_a_step():
    weight = torch.randn(6, 40)
    weight[2] = 0.0
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert (weight - q.float() * scale[:, None]).abs().le(scale[:, None] / 2 + 1e-7).all()
    assert q[2].eq(0).all() and int(q.abs().max()) == 127


# 64: the packed kernel; 36 and 40 the fallback (40 = 8 mod 16 crashed torch's packed kernel when sent there)
@pytest.mark.parametrize("in_features", [64, 36, 40])
def test_int8_linear_equals_the_dequantized_matmul(in_features):
    q, scale = quantize_int8(torch.randn(24, in_features))
    x = torch.randn(2, 3, in_features, dtype=torch.bfloat16)
    expected = F.linear(x.float(), q.float() * scale[:, None].bfloat16().float())
    out = int8_linear(x, q, scale.bfloat16())
    assert out.shape == (2, 3, 24) and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("name", ["v3", "qwen2"])
def test_quantized_model_stays_close_and_keeps_sensitive_weights_in_float(name, scheme):
    reference = peaky_model(name, logit_scale=3.0)
    model = quantize_model(peaky_model(name, logit_scale=3.0), scheme, dtype=torch.float32)
    with torch.no_grad():
        expected, logits = reference(TOKENS).logits, model(TOKENS).logits
    error = (logits - expected).norm() / expected.norm()
    assert error < (0.02 if scheme == "int8" else 0.06)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Linear" not in kinds or all(
        n.endswith(("kv_b_proj", "eh_proj")) or n == "lm_head" and scheme == "fp8"
        for n, m in model.named_modules() if type(m).__name__ == "Linear"
    )
    assert "QuantizedLinear" in kinds and (name != "v3" or "QuantizedRoutedExperts" in kinds)
    assert all(m.weight.is_floating_point() and m.weight.dtype != torch.float8_e4m3fn
               for m in model.modules() if isinstance(m, Router))
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_quantized_model_serves_through_the_engine():
    model = quantize_model(peaky_model("v3"), "int8", dtype=torch.bfloat16)
    engine = Engine(model, speculative=True)
    assert engine.cache.layers[0][0].dtype == torch.bfloat16
    output = engine.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    assert len(output.token_ids) == 6
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.weight.is_contiguous()
    assert all(m.gate_up_proj.is_contiguous() for m in model.modules() if isinstance(m, QuantizedRoutedExperts))


@pytest.mark.parametrize("name", ["v3", "qwen2"])
def test_int8_projections_fuse_into_one_matmul(name):
    """The engine fuses int8 layers that read one input (q/k/v with Qwen2's biases, gate/up, MLA's
    q_a + kv_a) like float ones: one int8 matmul per group, each layer's weight, scale and bias a view
    of the fused rows, the same logits; a buffer replaced wholesale turns the fusion off."""
    from nanoseek.infer.engine import fuse_projections

    model = quantize_model(peaky_model(name, logit_scale=3.0), "int8")
    with torch.no_grad():
        expected = model(TOKENS).logits
    fuse_projections(model)
    fused = [m.fused for m in model.modules() if getattr(m, "fused", None) is not None]
    layers = model.config.num_hidden_layers
    assert len(fused) == 2 * layers + (name == "v3") * (layers - 1) and all(f.weight.dtype == torch.int8 for f in fused)
    attention = model.model.layers[0].self_attn
    for layer, rows in zip(attention.fusable_projections(), attention.fused.weight.split(attention.fused.sizes), strict=True):
        assert layer.weight.data_ptr() == rows.data_ptr()
    calls = []
    kernel = torch._weight_int8pack_mm
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "_weight_int8pack_mm", lambda *args: calls.append(args[1]) or kernel(*args))
        patch.setattr("nanoseek.model.cpu_ops._state", "off")  # the fused CPU kernel would call it from C++
        logits = model(TOKENS).logits
    main = [m.fused for m in model.model.layers.modules() if getattr(m, "fused", None) is not None]  # not MTP's
    assert sorted(id(q) for q in calls if any(q is f.weight for f in fused)) == sorted(id(f.weight) for f in main)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    attention.fusable_projections()[0].weight_scale = attention.fusable_projections()[0].weight_scale.clone()
    with torch.no_grad():
        assert not attention.fused.usable
        torch.testing.assert_close(model(TOKENS).logits, expected, rtol=1e-4, atol=1e-4)


def test_fp8_checkpoint_uses_deepseeks_format_and_loads_with_load_pretrained(tmp_path):
    model = peaky_model("v3", logit_scale=3.0)
    model.save_pretrained(tmp_path / "float")
    quantize_checkpoint(tmp_path / "float", tmp_path / "fp8", "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]
    }
    with safe_open(tmp_path / "fp8" / "model.safetensors", "pt") as reader:
        keys = set(reader.keys())
        weight = reader.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight")
        scale_inv = reader.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv")
        assert weight.dtype == torch.float8_e4m3fn and scale_inv.shape == (1, 1)
        assert reader.get_tensor("model.layers.0.self_attn.kv_b_proj.weight").dtype == torch.float8_e4m3fn
        for float_key in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight",
                          "model.layers.3.eh_proj.weight", "model.layers.0.input_layernorm.weight"):
            assert reader.get_tensor(float_key).dtype == torch.bfloat16, float_key
    assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in keys
    loaded = load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    expected_up = dequantize_blocks(weight, scale_inv, dtype=torch.float32)
    hidden = model.config.moe_intermediate_size
    assert torch.equal(loaded.model.layers[1].mlp.experts.gate_up_proj[3, hidden:], expected_up)
    with torch.no_grad():
        error = (loaded(TOKENS).logits - model(TOKENS).logits).norm() / model(TOKENS).logits.norm()
    assert error < 0.06


@pytest.mark.parametrize("name", ["v3", "qwen2"])
def test_int8_checkpoint_round_trips_to_the_in_memory_model(tmp_path, name):
    model = peaky_model(name, logit_scale=3.0)
    model.save_pretrained(tmp_path / "float")
    quantize_checkpoint(tmp_path / "float", tmp_path / "int8", "int8")
    with safe_open(tmp_path / "int8" / "model.safetensors", "pt") as reader:
        assert reader.get_tensor("lm_head.weight").dtype == torch.int8
        assert reader.get_tensor("lm_head.weight_scale").dtype == torch.float32
    loaded = load_model(tmp_path / "int8")
    in_memory = quantize_model(peaky_model(name, logit_scale=3.0), "int8")
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, in_memory(TOKENS).logits)
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_pretrained(tmp_path / "int8")


def test_int8_checkpoint_with_a_missing_tensor_is_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    peaky_model("qwen2").save_pretrained(tmp_path / "float")
    quantize_checkpoint(tmp_path / "float", tmp_path / "int8", "int8")
    tensors = load_file(tmp_path / "int8" / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, tmp_path / "int8" / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors model.layers.1.mlp.up_proj.weight_scale"):
        load_model(tmp_path / "int8")


def test_quantize_command_reports_the_perplexity_change(tmp_path, capsys):
    tokenizer = tiny_tokenizer()
    peaky_model("v3", vocab_size=tokenizer.vocab_size, logit_scale=3.0).save_pretrained(tmp_path / "float")
    tokenizer.save_pretrained(tmp_path / "float")
    (tmp_path / "held_out.txt").write_text("The quick brown fox counts 1 2 3 4 5. " * 20)
    code = cli_main(["quantize", "--model", str(tmp_path / "float"), "--to", "int8", "--out", str(tmp_path / "int8"),
                     "--eval-text", str(tmp_path / "held_out.txt")])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["scheme"] == "int8" and report["eval_tokens"] > 50
    assert abs(report["perplexity_change"]) < 0.05
    assert (tmp_path / "int8" / "tokenizer.json").is_file()
