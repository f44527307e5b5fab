"""Weight-only quantization for inference: int8 per output channel, FP8 E4M3 per 128x128 block.

Decode reads every active weight once per token, so fewer bytes per weight is more tokens per
second (gpt-fast's int8 is the model). Activations stay in floating point.

* int8: W[i, :] ~= q[i, :] * scale[i], q = round(W / scale) in [-127, 127], scale = max|W[i, :]| / 127.
  The matmul is `torch._weight_int8pack_mm` (int8 weights read directly), computed in bf16 whatever
  the model's activation dtype (the kernel is 10x slower with fp32 inputs on CPU), with a dequantizing
  fallback where it cannot run.
* fp8: DeepSeek-V3's own scheme (`nanoseek.fp8.quantize_blocks`): e4m3 weights and one fp32
  `scale_inv` per 128x128 block. On CPU the weight is dequantized for each matmul (memory saving only).

What is quantized: every linear layer of the decoder blocks (attention, dense MLP, shared and routed
experts, the MTP block) and, for int8, the LM head. Embeddings, norms, routers and the MTP `eh_proj`
stay in floating point, as in DeepSeek's FP8 release, and so does MLA's `kv_b_proj` in memory:
absorbed attention reads its W_UK and W_UV blocks directly (DeepSeek's FP8 checkpoints store it in
FP8; loading dequantizes it).

Checkpoints (`nanoseek quantize`):
* fp8: DeepSeek's format, `<name>.weight` float8_e4m3fn + `<name>.weight_scale_inv` [ceil(out/128),
  ceil(in/128)] fp32, and `quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
  "activation_scheme": "dynamic", "weight_block_size": [128, 128]}`. `load_pretrained` (and
  transformers) read it, dequantizing on load.
* int8 (ours): `<name>.weight` int8 [out, in] + `<name>.weight_scale` fp32 [out] for the same tensor
  names as the float checkpoint (one per expert), the rest unchanged, and `quantization_config =
  {"quant_method": "nanoseek_int8", "bits": 8, "granularity": "per_channel", "activation_dtype": ...,
  "modules": "decoder+lm_head"}`. Read it with `load_model` (kept in int8).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from nanoseek.checkpoint import (
    _EXPERT_KEY,
    DTYPES,
    _copy_into,
    _from_hf_name,
    _iter_checkpoint_tensors,
    hf_state_dict,
    load_pretrained,
)
from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError, ConfigError
from nanoseek.fp8 import dequantize_blocks, quantize_blocks
from nanoseek.io import atomic_directory
from nanoseek.model import cpu_ops
from nanoseek.model.layers import FusedProjection, concatenate_rows, silu_and_mul
from nanoseek.model.moe import RoutedExperts
from nanoseek.model.transformer import CausalLM, restore_fp32_state

SCHEMES = ("int8", "fp8")
INT8_KERNEL_DTYPE = torch.bfloat16  # int8 scales are kept in it: int8_linear computes in the scales' dtype
INT8_METHOD = "nanoseek_int8"
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
# Decoder-block linear weights in Hugging Face names (DeepSeek quantizes exactly these to FP8).
_DECODER_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\..*(proj|proj_with_mqa)\.weight$")
_EXPERT_SCALE = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight_scale$")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a [..., out, in] weight: (q int8, scale fp32 [..., out])."""
    amax = weight.float().abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = (weight.float() / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


@dataclass
class QuantizedWeight:
    """A quantized [out, in] matrix and its scales; `linear(x)` computes x @ W^T."""

    weight: torch.Tensor  # int8 [out, in] or float8_e4m3fn [out, in]
    scale: torch.Tensor  # int8: [out] in the compute dtype; fp8: scale_inv [ceil(out/128), ceil(in/128)]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.int8:
            return int8_linear(x, self.weight, self.scale)
        return F.linear(x, dequantize_blocks(self.weight, self.scale, dtype=x.dtype))


def int8_kernel_layout(q: torch.Tensor) -> bool:
    """Whether an int8 [out, in] weight suits the packed int8 kernel. torch 2.13's CPU kernel crashes
    (SIGSEGV) when in_features is 8 more than a multiple of 16 (8, 24, 40... tested: tests/test_quant.py),
    so not just "% 8"."""
    return q.shape[1] % 16 == 0 and q.is_contiguous()


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ (q * scale)^T (+ bias), computed in `scale`'s dtype; returns x's dtype."""
    out_features, in_features = q.shape
    packed_layout = int8_kernel_layout(q)
    if packed_layout and (kernels := cpu_ops.for_inference(x)) is not None:  # the same ops below, in one call
        return kernels.int8_linear(x, q, scale, bias)
    rows = x.reshape(-1, in_features).to(scale.dtype)
    if packed_layout:
        out = torch._weight_int8pack_mm(rows.contiguous(), q, scale)
    else:
        out = F.linear(rows, q.to(scale.dtype)) * scale
    out = out.view(*x.shape[:-1], out_features).to(x.dtype)
    return out if bias is None else out + bias.to(out.dtype)


class QuantizedLinear(nn.Module):
    """Drop-in for `nn.Linear` with a quantized weight (buffers: weight, weight_scale, optional bias)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.int8:
            return int8_linear(x, self.weight, self.weight_scale, self.bias)
        out = QuantizedWeight(self.weight, self.weight_scale).linear(x)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def decode_product(self) -> tuple | None:
        """("int8", weight, bias, scale, None) where `forward` takes the int8 kernel (`nanoseek.model.decode_layer`)."""
        if self.weight.dtype == torch.int8 and int8_kernel_layout(self.weight):
            return "int8", self.weight, self.bias, self.weight_scale, None
        return None


def int8_fusable(linears: list[nn.Module]) -> bool:
    """int8 layers of one input size on one device, all with or all without bias (see `fuse_int8`)."""
    first = linears[0]
    return all(
        isinstance(layer, QuantizedLinear) and layer.weight.dtype == torch.int8 and layer.weight.is_contiguous()
        and layer.weight.shape[1] == first.weight.shape[1] and layer.weight.device == first.weight.device
        and layer.weight_scale.dtype == first.weight_scale.dtype and (layer.bias is None) == (first.bias is None)
        for layer in linears
    )


@torch.no_grad()
def fuse_int8(linears: list[QuantizedLinear]) -> FusedProjection:
    """int8 layers that read the same input as one int8 matmul (what `FusedProjection.fuse` does for
    float layers): weights, scales and biases move into one buffer each and every layer's buffers
    become views of their rows, so names, shapes and values are kept."""
    sizes = [layer.weight.shape[0] for layer in linears]
    names = ("weight", "weight_scale", "bias")
    weight, scale, bias = (concatenate_rows(linears, name, sizes) for name in names)
    fused = FusedProjection(weight, bias, sizes, linears, names)
    fused.linear = lambda x, q, bias: int8_linear(x, q, scale, bias)
    fused.kind, fused.scale = "int8" if int8_kernel_layout(weight) else "int8-unpacked", scale
    return fused


class QuantizedRoutedExperts(RoutedExperts):
    """`RoutedExperts` whose stacks are quantized; routing and token grouping are inherited."""

    all_at_once = False  # one int8 matmul over all experts' down matrices cannot apply each expert's row scales

    def __init__(self, num_experts: int, gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor]):
        nn.Module.__init__(self)  # not RoutedExperts.__init__: it would allocate the float stacks
        self.num_experts = num_experts
        self.linear = F.linear  # consulted by the inherited grouping; the quantized matmuls are in expert_forward
        self.register_buffer("gate_up_proj", gate_up[0])
        self.register_buffer("gate_up_scale", gate_up[1])
        self.register_buffer("down_proj", down[0])
        self.register_buffer("down_scale", down[1])

    def expert_weights(self) -> tuple[list[QuantizedWeight], list[QuantizedWeight]]:
        """Per-expert (weight, scale) views of the stacks, made once: indexing the stacks for every
        chosen expert of every token cost four ops per expert (112 a batch-1 token for `small`).
        Made again if a stack is replaced (views follow in-place changes by themselves)."""
        stacks = (self.gate_up_proj, self.gate_up_scale, self.down_proj, self.down_scale)
        cached = self.__dict__.get("_expert_views")
        if cached is None or any(old is not new for old, new in zip(cached[0], stacks, strict=True)):
            views = tuple(
                [QuantizedWeight(w, s) for w, s in zip(weight.unbind(0), scale.unbind(0), strict=True)]
                for weight, scale in ((self.gate_up_proj, self.gate_up_scale), (self.down_proj, self.down_scale))
            )
            cached = self.__dict__["_expert_views"] = (stacks, views)
        return cached[1]

    def expert_forward(self, x: torch.Tensor, gate_up: QuantizedWeight, down: QuantizedWeight) -> torch.Tensor:
        return down.linear(silu_and_mul(gate_up.linear(x)))

    def streamable_stacks(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...] | None:
        """int8 stacks and their scales in fp32 (converted once, again if a scale tensor changes) for
        the fused CPU kernel, which rounds each product's input and output to INT8_KERNEL_DTYPE like
        `int8_linear`; for fp32 or INT8_KERNEL_DTYPE activations."""
        stacks = (self.gate_up_proj, self.down_proj)
        scales = (self.gate_up_scale, self.down_scale)
        if (dtype not in (torch.float32, INT8_KERNEL_DTYPE) or any(s.dtype != torch.int8 or not s.is_contiguous() for s in stacks)
                or any(s.dtype != INT8_KERNEL_DTYPE for s in scales)):
            return None
        key = tuple((id(s), s._version) for s in scales)
        cached = self.__dict__.get("_float_scales")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_float_scales"] = (key, tuple(s.float().contiguous() for s in scales))
        return (*stacks, *cached[1])


# ----- quantizing a model in memory ----------------------------------------------------------------
def _quantize(weight: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    if scheme == "int8":
        q, scale = quantize_int8(weight)
        return q.contiguous(), scale.to(INT8_KERNEL_DTYPE)
    return quantize_blocks(weight.contiguous())


def quantized_module_names(model: CausalLM, scheme: str) -> list[str]:
    """Names of the modules `quantize_model` replaces: decoder linears, routed experts, (int8) the head."""
    names = []
    for name, module in model.named_modules():
        in_block = name.startswith("model.layers.") or ".block." in name
        if in_block and (isinstance(module, nn.Linear) and not name.endswith("kv_b_proj") or isinstance(module, RoutedExperts)):
            names.append(name)
    if scheme == "int8":
        names.append("lm_head")
    return names


@torch.no_grad()
def quantize_model(model: CausalLM, scheme: str, dtype: torch.dtype | None = None) -> CausalLM:
    """Quantize `model` in place for inference; what stays in floating point is cast to `dtype` (default:
    kept as it is). On CPU fp32 activations are faster than bf16 ones around the int8 matmuls."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    for name in quantized_module_names(model, scheme):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, child)
        if isinstance(module, RoutedExperts):
            new = QuantizedRoutedExperts(
                module.num_experts, _quantize(module.gate_up_proj, scheme), _quantize(module.down_proj, scheme)
            )
        else:
            bias = None if module.bias is None else module.bias.detach()
            new = QuantizedLinear(*_quantize(module.weight, scheme), bias)
        setattr(parent, child, new)
    if dtype is not None:
        for module in model.modules():
            if isinstance(module, QuantizedLinear) and module.bias is not None:
                module.bias = module.bias.to(dtype)
        for parameter in model.parameters():
            parameter.data = parameter.data.to(dtype)
        restore_fp32_state(model)
        model.config = model.config.replace(torch_dtype=next(k for k, v in DTYPES.items() if v == dtype))
    return model.eval()


# ----- checkpoints -----------------------------------------------------------------------------------
def quantize_checkpoint(source: str | Path, out: str | Path, scheme: str, activation_dtype: str | None = None) -> dict:
    """Write a quantized copy of a float checkpoint directory (tokenizer and other files kept).

    activation_dtype: dtype of the tensors left in floating point (default: bf16 for fp8, as in
    DeepSeek's release; the source's for int8).
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    activation_dtype = activation_dtype or ("bfloat16" if scheme == "fp8" else ModelConfig.from_hf(source).torch_dtype)
    model = load_pretrained(source, dtype=torch.float32)
    if "quantization_config" in model.config.extra:
        raise CheckpointError(f"{source} is already quantized ({model.config.extra['quantization_config']})")
    tensors = {name: tensor.detach().contiguous() for name, tensor in hf_state_dict(model).items()}
    if scheme == "int8" and "lm_head.weight" not in tensors:  # tied: the head gets its own int8 copy
        tensors["lm_head.weight"] = model.lm_head.weight.detach()
    out_tensors = {}
    quantized_bytes = 0
    for name, tensor in tensors.items():
        if _is_quantized_weight(name, scheme):
            if scheme == "int8":
                q, scale = quantize_int8(tensor)
                out_tensors[name], out_tensors[name + "_scale"] = q, scale
            else:
                q, scale_inv = quantize_blocks(tensor)
                out_tensors[name], out_tensors[name + "_scale_inv"] = q, scale_inv
            quantized_bytes += q.numel()
        else:
            out_tensors[name] = tensor.to(DTYPES[activation_dtype]) if tensor.is_floating_point() else tensor
    quantization_config = (
        {"quant_method": INT8_METHOD, "bits": 8, "granularity": "per_channel", "activation_dtype": activation_dtype,
         "modules": "decoder+lm_head"}
        if scheme == "int8" else dict(FP8_CONFIG)
    )
    config = model.config.replace(torch_dtype=activation_dtype)
    config.extra = {**config.extra, "quantization_config": quantization_config}
    source = Path(source)
    with atomic_directory(out) as staging:
        for item in source.iterdir():
            if item.is_file() and not item.name.endswith(".safetensors") and item.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy2(item, staging / item.name)
        config.save(staging)
        unique = {}
        seen: set[int] = set()
        for name, tensor in out_tensors.items():  # safetensors refuses shared storage
            pointer = tensor.untyped_storage().data_ptr()
            unique[name] = tensor.clone() if pointer in seen else tensor
            seen.add(pointer)
        save_file(unique, staging / "model.safetensors", metadata={"format": "pt"})
    return {"scheme": scheme, "quantized_weights": quantized_bytes,
            "bytes": sum(t.numel() * t.element_size() for t in out_tensors.values())}


def _is_quantized_weight(name: str, scheme: str) -> bool:
    """Whether the checkpoint tensor `name` (Hugging Face naming) is stored quantized."""
    if scheme == "int8":
        return name == "lm_head.weight" or bool(_DECODER_WEIGHT.match(name)) and not name.endswith("kv_b_proj.weight")
    return bool(_DECODER_WEIGHT.match(name))


def load_model(directory: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
               load_mtp: bool = True) -> CausalLM:
    """Load any nanoseek checkpoint: float or FP8 (dequantized, `load_pretrained`) or int8 (kept in int8)."""
    config = ModelConfig.from_hf(directory)
    method = config.extra.get("quantization_config", {}).get("quant_method")
    if method != INT8_METHOD:
        return load_pretrained(directory, dtype=dtype, device=device, load_mtp=load_mtp)
    return _load_int8(Path(directory), config, dtype, device, load_mtp)


@torch.no_grad()
def _load_int8(directory: Path, config: ModelConfig, dtype, device, load_mtp: bool) -> CausalLM:
    quantization_config = config.extra["quantization_config"]
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or DTYPES[quantization_config.get("activation_dtype", "bfloat16")]
    device = torch.device(device or "cpu")
    has_mtp = config.num_mtp_layers > 0
    if not load_mtp:
        config = config.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = CausalLM(config)
    quantize_model(model, "int8", dtype)  # meta tensors: only the structure changes
    model.to_empty(device=device)
    restore_fp32_state(model)
    targets = dict(model.state_dict(keep_vars=True))
    with torch.device("meta"):
        float_names = hf_state_dict(CausalLM(config)).keys()
    expected = {name for name in float_names if _from_hf_name(name, config) is not None} | {"lm_head.weight"}
    expected |= {name + "_scale" for name in expected if _is_quantized_weight(name, "int8")}
    # Scales have their weight's layout minus the input dimension, so they fill through the same
    # name mapping (experts split per index and gate/up half) as the weights, aimed at the scale buffers.
    scale_targets = {
        name.removesuffix("_scale") + ("_proj" if name.endswith(("experts.gate_up_scale", "experts.down_scale")) else ""): tensor
        for name, tensor in targets.items() if name.endswith("_scale")
    }
    filled = set()
    for file, key, reader in _iter_checkpoint_tensors(directory):
        layer = re.match(r"^model\.layers\.(\d+)\.", key)
        if not load_mtp and has_mtp and layer and int(layer.group(1)) >= config.num_hidden_layers:
            continue
        name = _from_hf_name(key, config)
        if name is None:
            continue
        destinations = targets
        if name.endswith("weight_scale"):
            name, destinations = name.removesuffix("_scale"), scale_targets
        if name not in destinations and not _EXPERT_KEY.match(name):
            raise CheckpointError(f"{file.name}: unexpected tensor {key!r} for this config")
        _copy_into(destinations, name, key, reader.get_tensor(key), file)
        filled.add(key)
    missing = sorted(expected - filled)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{directory}: missing tensors {shown}")
    return model.eval()


# ----- perplexity and the command line ----------------------------------------------------------------
@torch.no_grad()
def perplexity(model: CausalLM, token_ids: list[int], window: int = 256) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of `token_ids`."""
    total, count = 0.0, 0
    device = model.model.embed_tokens.weight.device
    for start in range(0, len(token_ids) - 1, window):
        chunk = torch.tensor([token_ids[start : start + window + 1]], device=device)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).logits.float()
        loss = F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total, count = total + float(loss), count + chunk.shape[1] - 1
    return math.exp(total / count)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="float checkpoint directory")
    parser.add_argument("--to", required=True, choices=SCHEMES, help="int8 (per channel, ours) or fp8 (DeepSeek's blocks)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced atomically)")
    parser.add_argument("--eval-text", metavar="FILE", help="held-out text for the perplexity check "
                        "(default: generated task problems from the test split)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens of held-out text to score")
    parser.add_argument("--activation-dtype", default=None, choices=("bfloat16", "float32"),
                        help="dtype of the weights left in floating point (default: bf16 for fp8, the source's for int8)")


def cli_main(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    report = quantize_checkpoint(args.model, args.out, args.to, args.activation_dtype)
    tokens = held_out_tokens(args.model, args.eval_text, args.eval_tokens)
    reference = perplexity(load_pretrained(args.model, dtype=torch.float32), tokens)
    quantized = perplexity(load_model(args.out), tokens)
    report.update(
        perplexity_float=round(reference, 4), perplexity_quantized=round(quantized, 4),
        perplexity_change=round(quantized / reference - 1, 6), eval_tokens=len(tokens),
        seconds=round(time.perf_counter() - started, 2), out=str(args.out),
    )
    print(json.dumps(report))
    return 0


def held_out_tokens(model_dir: str | Path, text_file: str | None, count: int) -> list[int]:
    """Tokens to score: a text file or generated test-split problems, through the checkpoint's tokenizer."""
    from nanoseek.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.from_pretrained(model_dir)
    except Exception as error:
        raise CheckpointError(f"the perplexity check needs the checkpoint's tokenizer: {error}") from None
    if text_file is not None:
        text = Path(text_file).read_text(encoding="utf-8")
    else:
        from nanoseek.data.tasks import task_corpus_text

        text = task_corpus_text(400, seed=1234, split="test")
    tokens = tokenizer.encode(text)[:count]
    if len(tokens) < 2:
        raise CheckpointError("the held-out text is shorter than two tokens")
    return tokens
