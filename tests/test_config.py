"""ModelConfig: HF round trip, presets, validation errors, CLI overrides, and `nanoseek info`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from model_configs import PARITY_CONFIGS, tiny_config

from nanoseek.cli import main
from nanoseek.config import PRESETS, ModelConfig, load_model_config, parse_overrides
from nanoseek.errors import ConfigError
from nanoseek.model.accounting import account

BENCH_DIR = Path(__file__).resolve().parents[2] / "shared" / "bench"


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_hf_round_trip(name):
    config = tiny_config(name)
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_v5_rope_parameters_are_understood():
    raw = {**PARITY_CONFIGS["v3"], "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                                                       "original_max_position_embeddings": 64}}
    config = ModelConfig.from_hf(raw)
    assert config.rope_theta == 5000.0 and config.rope_scaling["rope_type"] == "yarn"


@pytest.mark.parametrize("preset", ["small", "qwen2-small"])
def test_bench_presets_equal_shared_bench_files(preset):
    path = BENCH_DIR / f"{preset}.json"
    if not path.exists():
        pytest.skip("../shared/bench is not next to this checkout")
    expected = ModelConfig.from_hf(json.loads(path.read_text()))
    assert ModelConfig.from_preset(preset) == expected


def test_nano_preset_is_small_and_v3_shaped():
    config = ModelConfig.from_preset("nano")
    accounting = account(config)
    assert accounting.total_parameters + accounting.mtp_parameters <= 5_000_000
    assert config.is_moe and config.q_lora_rank and config.n_shared_experts and config.num_nextn_predict_layers == 1
    assert config.topk_method == "noaux_tc" and config.scoring_func == "sigmoid"


def test_v3_accounting_matches_the_report():
    accounting = account(ModelConfig.from_preset("v3"))
    assert accounting.total_parameters == pytest.approx(671e9, rel=0.002)
    assert accounting.activated_parameters == pytest.approx(37e9, rel=0.02)
    assert accounting.mtp_parameters == pytest.approx(11.6e9, rel=0.01)
    assert accounting.kv_cache_bytes_per_token == (512 + 64) * 61 * 2
    assert accounting.mha_cache_bytes_per_token == 128 * (192 + 128) * 61 * 2


def test_v2_lite_accounting():
    accounting = account(ModelConfig.from_preset("v2-lite"))
    assert accounting.total_parameters == pytest.approx(15.7e9, rel=0.01)
    assert accounting.activated_parameters - accounting.embedding_parameters // 2 == pytest.approx(2.4e9, rel=0.05)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_group": 3}, "not divisible by n_group"),
        ({"topk_group": 1, "num_experts_per_tok": 3}, "not enough experts survive group limiting"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim must be even"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_group": 5}, "exceeds n_group"),
        ({"rope_scaling": {"type": "ntk-by-parts", "factor": 2}}, "not supported"),
        ({"rope_scaling": {"type": "yarn", "factor": 2}}, "original_max_position_embeddings"),
    ],
)
def test_invalid_combinations_raise_one_clear_error(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**PARITY_CONFIGS["v3"], **changes})


def test_unknown_model_type_and_key():
    with pytest.raises(ConfigError, match="unknown model_type 'mixtral'"):
        ModelConfig.from_hf({**PARITY_CONFIGS["v3"], "model_type": "mixtral"})
    with pytest.raises(ConfigError, match="unknown config key 'n_routed_expert'; did you mean 'n_routed_experts'"):
        ModelConfig.from_hf({**PARITY_CONFIGS["v3"], "n_routed_expert": 8})
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.from_preset("v4")


def test_bookkeeping_keys_of_real_configs_are_accepted():
    raw = {**PARITY_CONFIGS["v3"], "architectures": ["DeepseekV3ForCausalLM"], "transformers_version": "4.46.3",
           "quantization_config": {"quant_method": "fp8"}, "ep_size": 1, "use_cache": True}
    config = ModelConfig.from_hf(raw)
    assert config.to_hf()["quantization_config"] == {"quant_method": "fp8"}


def test_cli_overrides_are_typed():
    parsed = parse_overrides(ModelConfig, ["hidden_size=256", "q_lora_rank=null", "norm_topk_prob=false",
                                           "routed_scaling_factor=2", "scoring_func=softmax"])
    assert parsed == {"hidden_size": 256, "q_lora_rank": None, "norm_topk_prob": False,
                      "routed_scaling_factor": 2.0, "scoring_func": "softmax"}
    with pytest.raises(ConfigError, match="wrong type"):
        parse_overrides(ModelConfig, ["hidden_size=big"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(ModelConfig, ["hidden_size"])
    assert load_model_config("nano", ["num_hidden_layers=2"]).num_hidden_layers == 2


def test_every_preset_builds():
    for name in PRESETS:
        assert account(ModelConfig.from_preset(name)).total_parameters > 0


def test_info_command(capsys):
    assert main(["info", "v3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total_parameters"] > 6e11
    assert main(["info", "nano", "n_group=3"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not divisible by n_group" in error
