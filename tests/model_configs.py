"""Tiny model configurations for tests: every architectural switch the parity tests must cover."""

from __future__ import annotations

from nanoseek import ModelConfig

TINY_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 96,
    "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
    "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 1, "num_nextn_predict_layers": 1, "max_position_embeddings": 256,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
}
TINY_YARN = {
    "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
    "mscale": 1.0, "mscale_all_dim": 1.0,
}
TINY_DENSE = {
    "model_type": "qwen2", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
}

# name -> HF config dict. Together they cover: q_lora_rank set and null, sigmoid and softmax routing,
# noaux_tc / group_limited_greedy / greedy, norm_topk_prob on and off, first_k_dense_replace 0 and >0,
# YaRN (with mscale 1.0 and 0.707), tied and untied embeddings, Qwen2 qkv bias, Llama-3 RoPE scaling.
PARITY_CONFIGS: dict[str, dict] = {
    "v3": TINY_V3,
    "v3-qlora-null-yarn-tied-nonorm": {
        **TINY_V3, "q_lora_rank": None, "first_k_dense_replace": 0, "rope_scaling": TINY_YARN,
        "tie_word_embeddings": True, "norm_topk_prob": False, "num_nextn_predict_layers": 0,
    },
    "v2-group-limited-yarn": {
        **TINY_V3, "model_type": "deepseek_v2", "scoring_func": "softmax", "topk_method": "group_limited_greedy",
        "norm_topk_prob": False, "routed_scaling_factor": 16.0, "num_nextn_predict_layers": 0,
        "rope_scaling": {**TINY_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
    "v2-lite-greedy": {
        **TINY_V3, "model_type": "deepseek_v2", "q_lora_rank": None, "scoring_func": "softmax",
        "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
        "routed_scaling_factor": 1.0, "n_shared_experts": 2, "num_nextn_predict_layers": 0,
    },
    "qwen2": TINY_DENSE,
    "qwen2-yarn-untied": {
        **TINY_DENSE, "tie_word_embeddings": False,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    },
    "llama3": {
        **TINY_DENSE, "model_type": "llama", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
}


def tiny_config(name: str = "v3", **overrides) -> ModelConfig:
    return ModelConfig.from_hf({**PARITY_CONFIGS[name], **overrides})
