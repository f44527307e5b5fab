"""Checkpoint IO: sharding, FP8 dequantization, atomic saves, and one clear error for every bad file."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import transformers
from model_configs import tiny_config
from safetensors.torch import load_file, save_file

from nanoseek.checkpoint import INDEX_FILE, SINGLE_FILE, hf_state_dict, load_pretrained, save_pretrained
from nanoseek.errors import CheckpointError
from nanoseek.model import build_model


@pytest.fixture
def saved(tmp_path):
    model = build_model(tiny_config("v3"), seed=0).eval()
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_sharded_save_loads_in_ours_and_transformers(tmp_path):
    model = build_model(tiny_config("v3", num_nextn_predict_layers=0), seed=0).eval()
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / SINGLE_FILE).exists()
    assert torch.equal(logits(load_pretrained(tmp_path)), logits(model))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (reference(ids).logits - logits(model)).abs().max() < 1e-4


def test_fp8_block_quantized_checkpoint_loads_within_quantization_error(saved, tmp_path):
    from nanoseek.fp8 import quantize_blocks

    model, directory = saved
    tensors = load_file(directory / SINGLE_FILE)
    quantized = {}
    for key, tensor in tensors.items():
        is_fp8 = key.endswith("proj.weight") and ".mlp.gate." not in key and "eh_proj" not in key
        if is_fp8 and "layers." in key:
            weight_fp8, scale_inv = quantize_blocks(tensor)
            quantized[key] = weight_fp8
            quantized[key.removesuffix("weight") + "weight_scale_inv"] = scale_inv
        else:
            quantized[key] = tensor
    fp8_dir = tmp_path / "fp8"
    fp8_dir.mkdir()
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (fp8_dir / "config.json").write_text(json.dumps(config))
    save_file(quantized, fp8_dir / SINGLE_FILE)
    loaded = load_pretrained(fp8_dir)
    restored = hf_state_dict(loaded)
    for key, original in tensors.items():
        if key + "_scale_inv" in quantized:
            # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 of the value, so <= 2^-4 of the block max
            assert (restored[key] - original).abs().max() <= original.abs().max() * 2**-4, key
            assert not torch.equal(restored[key], original), key
        else:
            assert torch.equal(restored[key], original), key
    assert (logits(loaded) - logits(model)).abs().max() < 0.1


def test_missing_tensor_is_named(saved):
    _, directory = saved
    tensors = load_file(directory / SINGLE_FILE)
    del tensors["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(tensors, directory / SINGLE_FILE)
    with pytest.raises(CheckpointError, match=r"missing tensors model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        load_pretrained(directory)


def test_unexpected_tensor_is_named(saved):
    _, directory = saved
    tensors = load_file(directory / SINGLE_FILE)
    tensors["model.layers.0.self_attn.mystery.weight"] = torch.zeros(2)
    save_file(tensors, directory / SINGLE_FILE)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.mystery"):
        load_pretrained(directory)


def test_misshaped_tensor_names_file_tensor_and_shapes(saved):
    _, directory = saved
    tensors = load_file(directory / SINGLE_FILE)
    tensors["model.layers.2.mlp.experts.3.up_proj.weight"] = torch.zeros(31, 64)
    save_file(tensors, directory / SINGLE_FILE)
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight' has shape \[31, 64\], the config needs \[32, 64\]"):
        load_pretrained(directory)


def test_truncated_file_gives_clear_error(saved):
    _, directory = saved
    data = (directory / SINGLE_FILE).read_bytes()
    (directory / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(directory)


def test_pickle_checkpoints_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    directory = tmp_path / "ckpt"
    directory.mkdir()
    tiny_config("v3").save(directory)
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="pickle"):
        load_pretrained(directory)
    assert not marker.exists()


def test_bad_config_and_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text('{"model_type": "gpt17"}')
    with pytest.raises(CheckpointError, match="unknown model_type 'gpt17'"):
        load_pretrained(tmp_path)


def test_save_is_atomic_and_keeps_other_files(saved, monkeypatch):
    import nanoseek.checkpoint as checkpoint

    model, directory = saved
    (directory / "tokenizer.json").write_text("{}")
    before = (directory / SINGLE_FILE).read_bytes()
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with pytest.raises(OSError):
        model.save_pretrained(directory)
    assert (directory / SINGLE_FILE).read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in directory.parent.iterdir()) == ["ckpt"]  # no staging left behind
    monkeypatch.undo()
    model.save_pretrained(directory)
    assert (directory / "tokenizer.json").exists()
    assert torch.equal(load_pretrained(directory).lm_head.weight, model.lm_head.weight)


def test_bf16_load_keeps_router_bias_fp32(saved):
    _, directory = saved
    model = load_pretrained(directory, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
