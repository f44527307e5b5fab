"""Model configuration: one dataclass with Hugging Face key names, named presets, validation.

The same `ModelConfig` describes DeepSeek-V3/V2 (MLA + DeepSeekMoE + MTP) and the dense Qwen2/Llama
families used by the R1-Distill models. Field names are the keys of a Hugging Face `config.json`, so
`from_hf` / `to_hf` are (almost) the identity and a reader can map every number to the papers.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from nanoseek.errors import ConfigError

MLA_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
DENSE_MODEL_TYPES = ("qwen2", "llama")
MODEL_TYPES = MLA_MODEL_TYPES + DENSE_MODEL_TYPES
ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}
ROPE_TYPES = ("default", "yarn", "linear", "llama3", "dynamic")

# Keys found in real config.json files that carry no information for this implementation
# (bookkeeping, training-only switches of other codebases). They are accepted and dropped.
IGNORED_HF_KEYS = frozenset(
    {
        "architectures", "auto_map", "transformers_version", "_name_or_path", "name_or_path", "use_cache",
        "pretraining_tp", "attention_dropout", "quantization_config", "ep_size", "output_router_logits",
        "router_aux_loss_coef", "dtype", "model_name", "id2label", "label2id", "return_dict",
        "output_hidden_states", "output_attentions", "torchscript", "is_encoder_decoder", "tie_encoder_decoder",
        "use_mrope", "layer_types", "rope_parameters", "num_mtp_layers", "qk_head_dim", "problem_type",
        "chunk_size_feed_forward", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
        "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
        "finetuning_task", "bad_words_ids", "num_labels",
    }
)

KEPT_HF_KEYS = frozenset({"quantization_config"})


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, named exactly as in Hugging Face `config.json` files."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # dense models; MLA head dims are the qk_*/v_head_dim keys below
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # llama: bias on q/k/v/o; qwen2 always has q/k/v bias (HF semantics)
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    # Multi-head Latent Attention (deepseek_v2 / deepseek_v3)
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True
    # DeepSeekMoE
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    moe_intermediate_size: int = 2048
    num_experts_per_tok: int | None = None
    n_group: int | None = 1
    topk_group: int | None = 1
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    # Multi-Token Prediction
    num_nextn_predict_layers: int = 0
    # Qwen2 sliding window (accepted for real configs; only `use_sliding_window=False` is supported)
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    # Keys this implementation does not use but writes back in `to_hf` (e.g. quantization_config).
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        self.validate()

    # ----- derived quantities -------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.model_type in MLA_MODEL_TYPES

    @property
    def is_moe(self) -> bool:
        return self.is_mla and bool(self.n_routed_experts)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def attention_head_dim(self) -> int:
        """Per-head dimension of a dense (GQA) model."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_dim(self) -> int:
        """Number of channels that RoPE rotates per head."""
        return self.qk_rope_head_dim if self.is_mla else self.attention_head_dim

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers if self.is_mla else 0

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def is_moe_layer(self, layer_index: int) -> bool:
        """DeepSeek's rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq` layers.

        Layer indices >= num_hidden_layers are MTP blocks, which are MoE in V3.
        """
        return (
            self.is_moe
            and layer_index >= self.first_k_dense_replace
            and layer_index % self.moe_layer_freq == 0
        )

    # ----- validation --------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise one `ConfigError` naming every impossible setting."""
        problems: list[str] = []
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"unknown model_type {self.model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (only 'silu', as in every DeepSeek/Qwen2/Llama model)")
        if self.is_mla:
            if self.qk_rope_head_dim % 2:
                problems.append(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
            if self.q_lora_rank is not None and self.q_lora_rank < 1:
                problems.append("q_lora_rank must be null (no query compression) or a positive integer")
            if self.n_routed_experts:
                problems.extend(self._moe_problems())
            if self.num_nextn_predict_layers < 0:
                problems.append("num_nextn_predict_layers must be >= 0")
        else:
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                problems.append(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
                )
            if self.attention_head_dim % 2:
                problems.append(f"head dim must be even for RoPE, got {self.attention_head_dim}")
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(
                    f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads {self.num_key_value_heads}"
                )
            if self.use_sliding_window:
                problems.append("use_sliding_window=true is not supported (R1-Distill configs set it false)")
        if self.rope_scaling is not None:
            problems.extend(_rope_scaling_problems(self.rope_scaling))
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    def _moe_problems(self) -> list[str]:
        problems = []
        n_experts, top_k = self.n_routed_experts, self.num_experts_per_tok
        n_group, topk_group = self.n_group or 1, self.topk_group or 1
        if not top_k or top_k < 1 or top_k > n_experts:
            problems.append(f"num_experts_per_tok must be in [1, n_routed_experts={n_experts}], got {top_k}")
        if self.scoring_func not in ("softmax", "sigmoid"):
            problems.append(f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}")
        if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            problems.append(
                f"topk_method must be 'greedy', 'group_limited_greedy' or 'noaux_tc', got {self.topk_method!r}"
            )
        if n_experts % n_group:
            problems.append(f"n_routed_experts ({n_experts}) is not divisible by n_group ({n_group})")
        elif top_k:
            per_group = n_experts // n_group
            if topk_group > n_group:
                problems.append(f"topk_group ({topk_group}) exceeds n_group ({n_group})")
            if topk_group * per_group < top_k:
                problems.append(
                    f"topk_group * experts per group = {topk_group} * {per_group} < num_experts_per_tok ({top_k}): "
                    "not enough experts survive group limiting"
                )
            if self.topk_method == "noaux_tc" and n_group > 1 and per_group < 2:
                problems.append("noaux_tc scores groups by their top-2 experts: need at least 2 experts per group")
        if self.first_k_dense_replace < 0 or self.moe_layer_freq < 1:
            problems.append("first_k_dense_replace must be >= 0 and moe_layer_freq >= 1")
        return problems

    # ----- Hugging Face interop -------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | Path | dict) -> ModelConfig:
        """Build from a Hugging Face `config.json` (a directory, the file, or its dict)."""
        if isinstance(source, dict):
            raw = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"no config.json at {path}")
            try:
                raw = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConfigError(f"{path} is not valid JSON: {error}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path} must hold a JSON object")
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        values = dict(_HF_DEFAULTS[model_type])
        rope_parameters = raw.get("rope_parameters")
        if isinstance(rope_parameters, dict) and "rope_scaling" not in raw:
            # transformers v5 stores rope_theta and the scaling in one `rope_parameters` dict
            if "rope_theta" in rope_parameters:
                raw["rope_theta"] = rope_parameters["rope_theta"]
            if rope_parameters.get("rope_type", "default") != "default":
                raw["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        known = {f.name for f in fields(cls)} - {"extra"}
        extra = {}
        for key, value in raw.items():
            if key in known:
                values[key] = value
            elif key in IGNORED_HF_KEYS:
                if key in KEPT_HF_KEYS:
                    extra[key] = value
            else:
                raise ConfigError(_unknown_key_message(key, known))
        if values.get("torch_dtype") is None:
            values["torch_dtype"] = raw.get("dtype", "float32")
        values["extra"] = extra
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict that transformers (and this class) load back to the same model."""
        keys = _HF_KEYS[self.model_type]
        out: dict[str, Any] = {"architectures": [ARCHITECTURES[self.model_type]]}
        # None means "library default" except for q_lora_rank, where null means no query compression.
        out.update({key: getattr(self, key) for key in keys if getattr(self, key) is not None or key == "q_lora_rank"})
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(self.rope_scaling)
        out.update(self.extra)
        return out

    def save(self, directory: str | Path) -> None:
        """Write `config.json` atomically."""
        from nanoseek.io import atomic_write_text

        atomic_write_text(Path(directory) / "config.json", json.dumps(self.to_hf(), indent=2) + "\n")

    # ----- presets and overrides ---------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (`nano`, `small`, `qwen2-nano`, `qwen2-small`, `v2-lite`, `v3`) with overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        return cls.from_hf(values)

    def replace(self, **changes: Any) -> ModelConfig:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(_unknown_key_message(sorted(unknown)[0], {f.name for f in fields(self)}))
        return dataclasses.replace(self, **changes)


def load_model_config(spec: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """A config from a preset name, a checkpoint directory or a config.json, plus `key=value` overrides."""
    spec_path = Path(spec)
    if str(spec) in PRESETS:
        config = ModelConfig.from_preset(str(spec))
    elif spec_path.exists():
        config = ModelConfig.from_hf(spec_path)
    else:
        raise ConfigError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
    if overrides:
        config = config.replace(**parse_overrides(ModelConfig, overrides))
    return config


def parse_overrides(config_class: type, assignments: list[str]) -> dict[str, Any]:
    """Parse CLI `key=value` strings into typed values for the fields of a dataclass.

    Values are read as JSON when possible (numbers, true/false/null, lists, dicts) and as plain
    strings otherwise; an unknown key or a value of the wrong type raises `ConfigError`.
    """
    hints = typing.get_type_hints(config_class)
    known = {f.name for f in fields(config_class)}
    parsed: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"override {assignment!r} must look like key=value")
        if key not in known:
            raise ConfigError(_unknown_key_message(key, known))
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        parsed[key] = _coerce(key, value, hints[key])
    return parsed


def _coerce(key: str, value: Any, hint: Any) -> Any:
    allowed = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} cannot be null")
    for option in allowed:
        origin = typing.get_origin(option) or option
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is str:
            return str(value)
        if origin in (list, dict, tuple) and isinstance(value, origin):
            return value
    names = ", ".join(getattr(option, "__name__", str(option)) for option in allowed)
    raise ConfigError(f"{key}={value!r} has the wrong type (expected {names})")


def _unknown_key_message(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _normalize_rope_scaling(rope_scaling: dict) -> dict:
    scaling = dict(rope_scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling["rope_type"] = rope_type
    scaling["type"] = rope_type  # older transformers and vLLM read "type"
    return scaling


def _rope_scaling_problems(scaling: dict) -> list[str]:
    rope_type = scaling["rope_type"]
    if rope_type not in ROPE_TYPES:
        return [f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"]
    if rope_type == "default":
        return []
    factor = scaling.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 0:
        return [f"rope_scaling.factor must be a positive number, got {factor!r}"]
    if rope_type in ("yarn", "llama3") and not scaling.get("original_max_position_embeddings"):
        return [f"rope_scaling type {rope_type!r} needs original_max_position_embeddings"]
    return []


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# Keys written by `to_hf` for each model type (transformers' config classes reject nothing, but
# writing only meaningful keys keeps exported configs readable).
_COMMON_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype",
)
_MLA_KEYS = _COMMON_KEYS + (
    "attention_bias", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "rope_interleave", "n_routed_experts", "n_shared_experts", "moe_intermediate_size", "num_experts_per_tok",
    "n_group", "topk_group", "scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor",
    "first_k_dense_replace", "moe_layer_freq", "aux_loss_alpha", "seq_aux", "num_nextn_predict_layers",
)
_HF_KEYS = {
    "deepseek_v3": _MLA_KEYS,
    "deepseek_v2": _MLA_KEYS,
    "qwen2": _COMMON_KEYS + ("head_dim", "use_sliding_window", "sliding_window", "max_window_layers"),
    "llama": _COMMON_KEYS + ("head_dim", "attention_bias", "mlp_bias"),
}
# transformers' defaults where a real config.json leaves a key out and our field default differs.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {
        "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "n_routed_experts": 256, "n_shared_experts": 1,
        "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "norm_topk_prob": True,
    },
    "deepseek_v2": {
        "n_group": None, "topk_group": None, "n_routed_experts": 64, "n_shared_experts": 2,
        "scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "first_k_dense_replace": 0, "moe_intermediate_size": 1407,
    },
    "qwen2": {"tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None},
    "llama": {"bos_token_id": 1, "eos_token_id": 2},
}


# ../shared/bench/small.json verbatim (a test checks the copy against the file when it is present).
BENCH_SMALL: dict[str, Any] = {
        "model_type": "deepseek_v3", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1408,
        "moe_intermediate_size": 256, "num_hidden_layers": 8, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 192, "kv_lora_rank": 128,
        "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": 32,
        "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 1, "hidden_act": "silu", "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "attention_bias": False,
        "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
}


PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-V3 in miniature (~2.6M parameters): MLA with query compression, sigmoid group-limited
    # routing with shared experts, one dense layer first, one MTP layer. Tests and the CPU speedrun.
    "nano": {
        "model_type": "deepseek_v3", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64,
        "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "n_routed_experts": 8, "n_shared_experts": 1, "moe_intermediate_size": 96, "num_experts_per_tok": 2,
        "n_group": 2, "topk_group": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 1, "max_position_embeddings": 1024, "tie_word_embeddings": False,
        "aux_loss_alpha": 1e-4,
    },
    # ../shared/bench/small.json verbatim (about 130M parameters): every benchmark uses it.
    "small": BENCH_SMALL,
    # Dense Qwen2-shaped students (the R1-Distill family).
    "qwen2-nano": {
        "model_type": "qwen2", "vocab_size": 2048, "hidden_size": 96, "intermediate_size": 256,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 1024, "tie_word_embeddings": True, "rope_theta": 10000.0,
        "bos_token_id": 0, "eos_token_id": 1,
    },
    "qwen2-small": {
        "model_type": "qwen2", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1408,
        "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 1,
        "torch_dtype": "float32",
    },
    # DeepSeek-V2-Lite (15.7B total, 2.4B activated): no query compression, softmax greedy routing.
    "v2-lite": {
        "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1, "scoring_func": "softmax", "topk_method": "greedy",
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1, "rope_theta": 10000.0,
        "max_position_embeddings": 163840, "bos_token_id": 100000, "eos_token_id": 100001,
        "aux_loss_alpha": 0.001, "torch_dtype": "bfloat16",
        "rope_scaling": {
            "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
        },
    },
    # DeepSeek-V3 / R1 (671B total, 37B activated).
    "v3": {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 3, "num_nextn_predict_layers": 1, "rope_theta": 10000.0,
        "max_position_embeddings": 163840, "aux_loss_alpha": 1e-4, "torch_dtype": "bfloat16",
        "rope_scaling": {
            "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
    },
}
