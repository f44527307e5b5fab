"""Hugging Face checkpoints: safetensors in, safetensors out, nothing ever unpickled.

On disk (and in transformers) every routed expert has its own `gate_proj/up_proj/down_proj`
matrices and MTP depth k lives at `model.layers.{num_hidden_layers + k}` with its own copies of
the embedding and head. In memory experts are stacked ([E, 2I, D] gate+up, [E, D, I] down) and
MTP modules sit under `mtp.{k}` sharing the main embedding and head. This module translates both
ways, dequantizes DeepSeek's FP8 weights (`weight_scale_inv`, 128x128 blocks) on load, shards on
save, and turns every problem with a checkpoint into one `CheckpointError` naming file and tensor.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError, ConfigError
from nanoseek.io import atomic_directory
from nanoseek.model.transformer import CausalLM, restore_fp32_state

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# FP8 scales are consumed with their weight; old Llama checkpoints store RoPE frequencies.
IGNORED_SUFFIXES = ("weight_scale_inv", "rotary_emb.inv_freq")
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----- name translation -------------------------------------------------------------------------
def hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names and layout (experts split, MTP re-indexed)."""
    config = model.config
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("e_score_correction_bias") and config.topk_method != "noaux_tc":
            continue  # only V3-style routing has the bias in its checkpoints
        hf_name = _to_hf_name(name, config)
        expert_stack = re.match(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$", hf_name)
        if expert_stack:
            prefix, kind = expert_stack.groups()
            for expert, weight in enumerate(tensor):
                if kind == "down_proj":
                    tensors[f"{prefix}.{expert}.down_proj.weight"] = weight
                else:
                    gate, up = weight.chunk(2, dim=0)
                    tensors[f"{prefix}.{expert}.gate_proj.weight"] = gate
                    tensors[f"{prefix}.{expert}.up_proj.weight"] = up
        else:
            tensors[hf_name] = tensor
    for depth in range(config.num_mtp_layers):
        prefix = f"model.layers.{config.num_hidden_layers + depth}"
        tensors[f"{prefix}.embed_tokens.weight"] = model.model.embed_tokens.weight
        tensors[f"{prefix}.shared_head.head.weight"] = model.lm_head.weight
    return tensors


def _to_hf_name(name: str, config: ModelConfig) -> str:
    match = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if not match:
        return name
    depth, rest = int(match.group(1)), match.group(2)
    prefix = f"model.layers.{config.num_hidden_layers + depth}"
    if rest.startswith("block."):
        return f"{prefix}.{rest[len('block.'):]}"
    if rest == "norm.weight":
        return f"{prefix}.shared_head.norm.weight"
    return f"{prefix}.{rest}"


def _from_hf_name(hf_name: str, config: ModelConfig) -> str | None:
    """Our parameter name for an HF key; None for the redundant MTP copies of embedding and head."""
    match = _LAYER_KEY.match(hf_name)
    if not match or int(match.group(1)) < config.num_hidden_layers:
        return hf_name
    depth, rest = int(match.group(1)) - config.num_hidden_layers, match.group(2)
    if rest in ("embed_tokens.weight", "shared_head.head.weight"):
        return None
    if rest == "shared_head.norm.weight":
        return f"mtp.{depth}.norm.weight"
    if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
        return f"mtp.{depth}.{rest}"
    return f"mtp.{depth}.block.{rest}"


# ----- loading ----------------------------------------------------------------------------------
def load_pretrained(
    directory: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    load_mtp: bool = True,
) -> CausalLM:
    """Load a Hugging Face checkpoint directory (config.json + safetensors, single or sharded).

    dtype: parameter dtype (default: the checkpoint's `torch_dtype`); FP8 weights are dequantized to it.
    load_mtp: False drops the MTP depths (the main model alone, as transformers loads V3).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    try:
        config = ModelConfig.from_hf(directory)
    except ConfigError as error:
        raise CheckpointError(f"{directory / 'config.json'}: {error}") from None
    has_mtp_weights = config.num_mtp_layers > 0
    if not load_mtp and config.num_mtp_layers:
        config = config.replace(num_nextn_predict_layers=0)
    dtype = _resolve_dtype(dtype, config)
    device = torch.device(device) if device is not None else torch.device("cpu")

    with torch.device("meta"):
        model = CausalLM(config)
    model.to_empty(device=device)
    model.to(dtype)
    restore_fp32_state(model)
    targets = dict(model.state_dict(keep_vars=True))
    expected = hf_state_dict_shapes(model)
    filled: set[str] = set()
    skip_mtp = not load_mtp and has_mtp_weights
    for file, key, reader in _iter_checkpoint_tensors(directory):
        if key.endswith(IGNORED_SUFFIXES) or (skip_mtp and _is_mtp_key(key, config)):
            continue
        if key not in expected and _from_hf_name(key, config) is not None:
            raise CheckpointError(f"{file.name}: unexpected tensor {key!r} for this config")
        name = _from_hf_name(key, config)
        if name is None:
            continue
        tensor = _read_tensor(file, key, reader)
        _copy_into(targets, name, key, tensor, file)
        filled.add(key)
    missing = sorted(
        key for key in expected if key not in filled and _from_hf_name(key, config) is not None
    )
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: missing tensors {shown}")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()
    return model


def hf_state_dict_shapes(model: CausalLM) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in hf_state_dict(model).items()}


def _is_mtp_key(key: str, config: ModelConfig) -> bool:
    match = _LAYER_KEY.match(key)
    return bool(match) and int(match.group(1)) >= config.num_hidden_layers


def _resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype or config.torch_dtype or "float32"
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _iter_checkpoint_tensors(directory: Path) -> Iterator[tuple[Path, str, object]]:
    """(file, key, open reader) for every tensor of the checkpoint, validating the file set first."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {error}") from None
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        weight_map, files = None, [SINGLE_FILE]
    else:
        pickles = [p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{directory} holds only pickle-based weights ({', '.join(pickles)}); they are never loaded "
                "because unpickling can run arbitrary code. Convert them to safetensors first."
            )
        raise CheckpointError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")
    for file_name in files:
        path = directory / file_name
        if not path.is_file():
            raise CheckpointError(f"{index_path.name} names {file_name}, which does not exist")
        try:
            with safe_open(path, framework="pt", device="cpu") as reader:
                keys = list(reader.keys())
                if weight_map is not None:
                    listed = {k for k, v in weight_map.items() if v == file_name}
                    if listed != set(keys):
                        raise CheckpointError(f"{path.name}: its tensors do not match {INDEX_FILE}")
                for key in keys:
                    yield path, key, reader
        except SafetensorError as error:
            raise CheckpointError(f"{path.name} is not a readable safetensors file ({error})") from None
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: {error}") from None


def _read_tensor(path: Path, key: str, reader) -> torch.Tensor:
    try:
        tensor = reader.get_tensor(key)
        if tensor.dtype == torch.float8_e4m3fn:
            scale_key = key.removesuffix("weight") + "weight_scale_inv"
            if scale_key not in reader.keys():
                raise CheckpointError(f"{path.name}: FP8 tensor {key!r} has no {scale_key!r}")
            from nanoseek.fp8 import dequantize_blocks

            try:
                tensor = dequantize_blocks(tensor, reader.get_tensor(scale_key), dtype=torch.float32)
            except ValueError as error:
                raise CheckpointError(f"{path.name}: {scale_key!r}: {error}") from None
        return tensor
    except SafetensorError as error:
        raise CheckpointError(f"{path.name}: tensor {key!r} cannot be read ({error}); is the file truncated?") from None


def _copy_into(targets, name, key, tensor, path) -> None:
    expert = _EXPERT_KEY.match(name)
    if expert:
        prefix, index, kind = expert.group(1), int(expert.group(2)), expert.group(3)
        stack = targets[f"{prefix}.{'down_proj' if kind == 'down_proj' else 'gate_up_proj'}"]
        if index >= stack.shape[0]:
            raise CheckpointError(f"{path.name}: unexpected tensor {key!r} (expert {index} of {stack.shape[0]})")
        destination = stack[index]
        if kind != "down_proj":
            half = destination.shape[0] // 2
            destination = destination[:half] if kind == "gate_proj" else destination[half:]
    else:
        destination = targets[name]
    if tuple(tensor.shape) != tuple(destination.shape):
        raise CheckpointError(
            f"{path.name}: tensor {key!r} has shape {list(tensor.shape)}, the config needs {list(destination.shape)}"
        )
    with torch.no_grad():
        destination.copy_(tensor)


# ----- saving -----------------------------------------------------------------------------------
def save_pretrained(model: CausalLM, directory: str | Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json and safetensors (sharded above `max_shard_bytes`) that transformers loads.

    The directory is replaced atomically; other files already in it (a tokenizer, a README) are kept.
    """
    directory = Path(directory)
    tensors = {name: t.detach().contiguous().cpu() for name, t in hf_state_dict(model).items()}
    shards = _shard(tensors, max_shard_bytes)
    weight_dtype = model.model.embed_tokens.weight.dtype
    dtype_name = next((name for name, value in DTYPES.items() if value == weight_dtype), "float32")
    config = model.config.replace(torch_dtype=dtype_name)
    with atomic_directory(directory) as staging:
        if directory.is_dir():
            for old in directory.iterdir():
                if old.is_file() and not _is_weight_file(old.name) and old.name != "config.json":
                    shutil.copy2(old, staging / old.name)
        config.save(staging)
        if len(shards) == 1:
            save_file(_unshare(shards[0]), staging / SINGLE_FILE, metadata={"format": "pt"})
            return
        weight_map = {}
        for number, shard in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(_unshare(shard), staging / file_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file_name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name == INDEX_FILE


def _shard(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        tensor_bytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + tensor_bytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor_bytes
    return shards


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (MTP's embedding/head copies): clone repeats."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out
