"""Our models against transformers on the same random weights (fp32, CPU): logits within 1e-4."""

from __future__ import annotations

import pytest
import torch
import transformers
from model_configs import PARITY_CONFIGS, tiny_config

from nanoseek.checkpoint import load_pretrained
from nanoseek.model import build_model
from nanoseek.model.moe import Router
from nanoseek.model.transformer import cross_entropy

TOLERANCE = 1e-4


def randomized_model(name: str, seed: int = 0, **overrides):
    """A model whose norms and router biases are random too, so every weight matters."""
    model = build_model(tiny_config(name, **overrides), seed=seed).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module_name, parameter in model.named_parameters():
            if module_name.endswith("layernorm.weight") or module_name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.2 * torch.randn(parameter.shape, generator=generator))
            elif module_name.endswith(".bias"):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, Router):
                module.e_score_correction_bias.copy_(0.3 * torch.randn(module.num_experts, generator=generator))
    return model


def random_tokens(vocab_size: int, batch: int = 2, seq: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def load_transformers(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers_on_our_checkpoint(name, tmp_path):
    model = randomized_model(name)
    model.save_pretrained(tmp_path)
    reference = load_transformers(tmp_path)
    tokens = random_tokens(model.config.vocab_size)
    with torch.no_grad():
        ours = model(tokens).logits
        theirs = reference(tokens).logits
    assert (ours - theirs).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_transformers_checkpoint_loads_to_same_logits(name, tmp_path):
    torch.manual_seed(0)
    hf_config_dict = {k: v for k, v in tiny_config(name).to_hf().items() if k != "architectures"}
    hf_config_dict["num_nextn_predict_layers"] = 0
    hf_config = transformers.AutoConfig.for_model(**hf_config_dict)
    reference = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter_name, parameter in reference.named_parameters():
            if parameter_name.endswith("norm.weight"):
                parameter.add_(0.2 * torch.randn_like(parameter))
        for buffer_name, buffer in reference.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn_like(buffer))
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    tokens = random_tokens(model.config.vocab_size, seed=1)
    with torch.no_grad():
        assert (model(tokens).logits - reference(tokens).logits).abs().max().item() < TOLERANCE
    # and back again: our save of their weights gives their logits
    model.save_pretrained(tmp_path / "again")
    with torch.no_grad():
        again = load_transformers(tmp_path / "again")(tokens).logits
        assert (again - reference(tokens).logits).abs().max().item() < TOLERANCE


def test_mtp_logits_match_transformers_mtp_model():
    """Our MTP depth against transformers' generic MtpModel on the same weights."""
    from transformers.modeling_layers import MtpModel

    if not hasattr(MtpModel, "forward_layer"):  # the oracle's API (transformers >= 5.23 has it)
        pytest.skip(f"transformers {transformers.__version__}'s MtpModel has no forward_layer")
    model = randomized_model("v3")
    config = model.config
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.to_hf().items() if k != "architectures"})
    main = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    main_state = {k: v for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    main.load_state_dict(main_state, strict=False)
    mtp_model = MtpModel(main, 1).eval()
    mtp_state = {}
    for key, value in model.state_dict().items():
        if key.startswith("mtp.0."):
            rest = key[len("mtp.0."):]
            rest = "mtp_block." + rest[len("block."):] if rest.startswith("block.") else rest
            rest = "post_norm.weight" if rest == "norm.weight" else rest
            mtp_state[f"layers.0.{rest}"] = value
    missing, unexpected = mtp_model.load_state_dict(mtp_state, strict=False)
    assert not unexpected and all("embed_tokens" in k or "shared_head" in k for k in missing)
    mtp_model.tie_with_main_model(main)

    tokens = random_tokens(config.vocab_size)
    seq = tokens.shape[1]
    with torch.no_grad():
        ours = model(tokens, labels=tokens, return_logits=True)
        hidden = main.model(tokens).last_hidden_state
        positions = torch.arange(seq - 1)[None].expand(2, -1)
        theirs_hidden = mtp_model.forward_layer(0, hidden[:, :-1], positions, None, input_ids=tokens[:, 1:])
        theirs = mtp_model._project_to_logits(theirs_hidden)
    assert (ours.mtp_logits[0] - theirs).abs().max().item() < TOLERANCE


def test_mtp_loss_is_computed_on_targets_shifted_by_depth():
    model = randomized_model("v3")
    tokens = random_tokens(model.config.vocab_size, seq=16)
    labels = random_tokens(model.config.vocab_size, seq=16, seed=7)
    with torch.no_grad():
        output = model(tokens, labels=labels)
        # Recompute depth 1 from its definition: position i combines h_i with Emb(t_{i+1}), predicts labels[i+1].
        hidden = output.hidden_states[:, :-1]
        embeddings = model.model.embed_tokens(tokens[:, 1:])
        angles = model.model.rotary_emb(torch.arange(15)[None].expand(2, -1))
        mtp = model.mtp[0]
        combined = mtp.eh_proj(torch.cat((mtp.enorm(embeddings), mtp.hnorm(hidden)), dim=-1))
        depth_hidden, _ = mtp.block(combined, angles)
        logits = model.lm_head(mtp.norm(depth_hidden))
    expected = cross_entropy(logits, labels[:, 1:])
    unshifted = cross_entropy(logits, labels[:, :-1])
    assert torch.allclose(output.mtp_loss, expected, atol=1e-6)
    assert not torch.allclose(output.mtp_loss, unshifted, atol=1e-3)
    assert torch.allclose(output.loss, output.lm_loss + 0.3 * output.mtp_loss, atol=1e-6)


def test_mtp_keys_round_trip(tmp_path):
    from safetensors import safe_open

    model = randomized_model("v3")
    config = model.config
    model.save_pretrained(tmp_path)
    mtp_prefix = f"model.layers.{config.num_hidden_layers}"
    with safe_open(tmp_path / "model.safetensors", "pt") as reader:
        keys = set(reader.keys())
        assert reader.get_tensor(f"{mtp_prefix}.eh_proj.weight").shape == (config.hidden_size, 2 * config.hidden_size)
    for suffix in ("enorm.weight", "hnorm.weight", "shared_head.norm.weight", "shared_head.head.weight",
                   "embed_tokens.weight", "self_attn.kv_b_proj.weight", "mlp.gate.e_score_correction_bias",
                   "mlp.experts.7.down_proj.weight", "mlp.shared_experts.up_proj.weight"):
        assert f"{mtp_prefix}.{suffix}" in keys
    loaded = load_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    without_mtp = load_pretrained(tmp_path, load_mtp=False)
    assert len(without_mtp.mtp) == 0
