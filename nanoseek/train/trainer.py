"""The training loop every stage shares: pretraining here, SFT / GRPO / distillation later.

A `Trainer` owns the model, AdamW, the learning-rate schedule, the precision mode, gradient
accumulation and clipping, DeepSeek-V3's MoE balancing, checkpoints and metrics. A stage supplies

    batches  an iterator of dicts of tensors with `state_dict()` / `load_state_dict()` (its position
             is saved in checkpoints), e.g. `nanoseek.data.loader.PretrainLoader` or `SFTLoader`;
    loss_fn  `(model, batch) -> (loss, metrics)`: a scalar loss to minimize and a dict of detached
             scalars to log, averaged over micro-batches and ranks. The default, `language_model_loss`,
             is next-token cross-entropy + lambda * MTP + alpha * sequence-wise balance loss on
             `batch["input_ids"]` / `batch["targets"]` (plus SFT's `position_ids` / `segment_ids`).
             Put `output_metrics(output)` into the metrics of a custom loss to keep the expert-load
             entry (`EXPERT_LOAD`) that drives the router-bias update and the load logs.

One optimizer step = `grad_accum_steps` micro-batches on each of `world_size` ranks; every
micro-batch's mean loss has equal weight. After the step, the aux-loss-free bias update (V3 report
§2.1.2) moves each router's `e_score_correction_bias` by gamma * sign(mean load - load) using the
expert counts of the whole global batch (summed over micro-batches, all-reduced over ranks).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from nanoseek.allocator import keep_freed_memory
from nanoseek.config import ModelConfig
from nanoseek.errors import ConfigError, TrainingError
from nanoseek.model import CausalLM, ModelOutput, kernels
from nanoseek.model.accounting import account
from nanoseek.model.moe import Router
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import checkpointing, parallel
from nanoseek.train.precision import PRECISIONS, Precision

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, Any]]]
EXPERT_LOAD = "tokens_per_expert"  # metrics key: [moe layers, experts] token counts, summed not averaged
LR_SCHEDULES = ("cosine", "wsd", "constant")
# Dense bf16 tensor-core peaks (TFLOP/s) for MFU, by substring of the device name.
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "H800": 989.0, "H20": 148.0,
                   "A100": 312.0, "A800": 312.0, "L40S": 362.0, "4090": 165.0, "B200": 2250.0}


class BatchSource(Protocol):
    def __next__(self) -> Batch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainConfig:
    """Everything about a run except the model architecture and the data. CLI: `key=value`."""

    # batch: `global_batch_size` sequences of `seq_len` tokens per optimizer step, run as
    # micro-batches of `micro_batch_size` per rank; the quotient is the gradient-accumulation count.
    global_batch_size: int = 32
    micro_batch_size: int = 8
    seq_len: int = 256
    max_steps: int = 1000
    # AdamW as in V3: betas (0.9, 0.95), weight decay 0.1 on matrices only, clip 1.0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr / peak lr (V3: 2.2e-5 / 2.2e-4)
    lr_schedule: str = "cosine"  # "cosine", "wsd" (warmup-stable-decay) or "constant"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to min lr
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still computed and logged)
    precision: str = "auto"  # fp32, bf16, fp16, fp8; auto = bf16 on GPUs, fp32 on CPU
    # DeepSeek-V3 balancing and Multi-Token Prediction
    bias_update_speed: float = 1e-3  # gamma of the aux-loss-free bias update; 0 disables it
    bias_update_stop: float = 1.0  # fraction of max_steps after which the bias is frozen (V3: 0.966)
    balance_alpha: float | None = None  # sequence-wise balance loss weight; None = model's aux_loss_alpha
    mtp_weight: float = 0.3  # lambda for the first `mtp_weight_switch` of the steps (V3: 0.3)
    mtp_weight_final: float = 0.1  # lambda afterwards (V3: 0.1)
    mtp_weight_switch: float = 0.676  # V3 switched after 10T of 14.8T tokens
    # memory and parallelism
    gradient_checkpointing: bool = False
    data_parallel: str = "fsdp"  # "fsdp" (FSDP2) or "ddp" under torchrun
    device: str | None = None  # None: cuda if available, else cpu
    # bookkeeping
    seed: int = 0
    log_every: int = 1
    eval_every: int = 200  # 0: evaluate only at the end
    eval_batches: int = 16  # validation micro-batches in all, split over ranks
    checkpoint_every: int = 500  # 0: checkpoint only at the end
    keep_checkpoints: int = 3
    peak_tflops: float | None = None  # MFU denominator per device; None: GPU table or measured CPU matmul
    deterministic: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise one ConfigError naming every impossible setting (world-size checks come later)."""
        problems = []
        for name in ("global_batch_size", "micro_batch_size", "seq_len", "max_steps", "log_every",
                     "eval_batches", "keep_checkpoints"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "grad_clip",
                     "bias_update_speed", "mtp_weight", "mtp_weight_final", "min_lr_ratio"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("decay_fraction", "bias_update_stop", "mtp_weight_switch", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.warmup_steps >= self.max_steps and self.lr_schedule != "constant":
            problems.append(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.data_parallel not in parallel.DATA_PARALLEL_MODES:
            problems.append(f"data_parallel {self.data_parallel!r} is not one of {', '.join(parallel.DATA_PARALLEL_MODES)}")
        if self.global_batch_size % max(self.micro_batch_size, 1):
            problems.append(
                f"global_batch_size ({self.global_batch_size}) is not a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        if not 0 <= self.adam_beta1 < 1 or not 0 <= self.adam_beta2 < 1:
            problems.append("adam_beta1 and adam_beta2 must be in [0, 1)")
        if problems:
            raise ConfigError("invalid training config: " + "; ".join(problems))

    def grad_accum_steps(self, world_size: int) -> int:
        """Micro-batches per rank per step; ConfigError unless the global batch divides evenly."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"global_batch_size ({self.global_batch_size}) is not divisible by micro_batch_size "
                f"({self.micro_batch_size}) x {world_size} processes; pick sizes whose product divides it"
            )
        return self.global_batch_size // per_step


# ----- schedules ---------------------------------------------------------------------------------------
def learning_rate(config: TrainConfig, step: int) -> float:
    """The lr of optimizer step `step` (0-based): linear warmup, then cosine / WSD / constant."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return peak
    last = config.max_steps - 1
    if config.lr_schedule == "cosine":
        progress = min(1.0, (step - config.warmup_steps) / max(1, last - config.warmup_steps))
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = max(config.warmup_steps, last - round(config.decay_fraction * config.max_steps))
    if step <= decay_start:
        return peak
    return peak + (floor - peak) * min(1.0, (step - decay_start) / max(1, last - decay_start))


def mtp_weight(config: TrainConfig, step: int) -> float:
    """lambda of the MTP loss: `mtp_weight`, then `mtp_weight_final` (V3: 0.3 -> 0.1)."""
    return config.mtp_weight if step < config.mtp_weight_switch * config.max_steps else config.mtp_weight_final


def bias_update_speed(config: TrainConfig, step: int) -> float:
    """gamma of the router-bias update: constant, then 0 (V3 froze it for the last 500B tokens)."""
    return config.bias_update_speed if step < config.bias_update_stop * config.max_steps else 0.0


# ----- optimizer -----------------------------------------------------------------------------------------
def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices (attention, MLPs, experts, router, untied head); none on
    norms, biases and embeddings (decaying embeddings pulls rare tokens to zero; OLMo 2 drops it too).
    Router correction biases are buffers, never seen by the optimizer.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        matrix = parameter.dim() >= 2 and id(parameter) not in embeddings
        (decay if matrix else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel where PyTorch has one (CPU and CUDA: ~6x faster than the per-tensor loop)."""
    return torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        fused=device.type in ("cpu", "cuda"),
    )


# ----- losses and MoE balancing ----------------------------------------------------------------------------
def causal_lm_loss(model: nn.Module, batch: Batch, mtp_weight: float, balance_alpha: float | None) -> tuple[torch.Tensor, dict]:
    """lm + mtp_weight * MTP + balance_alpha * sequence-wise balance loss, with the metrics to log."""
    output = model(
        batch["input_ids"],
        labels=batch["targets"],
        positions=batch.get("position_ids"),
        document_ids=batch.get("segment_ids"),
        mtp_weight=mtp_weight,
        balance_alpha=balance_alpha,
    )
    return output.loss, output_metrics(output)


def output_metrics(output: ModelOutput) -> dict[str, torch.Tensor]:
    """The loss parts of a model output and its per-layer expert counts (`EXPERT_LOAD`), detached."""
    metrics = {}
    for name in ("lm_loss", "mtp_loss", "balance_loss"):
        value = getattr(output, name)
        if value is not None:
            metrics[name] = value.detach()
    if output.router_stats:
        metrics[EXPERT_LOAD] = torch.stack([stats.tokens_per_expert for stats in output.router_stats])
    return metrics


@torch.no_grad()
def update_router_biases(routers: list[Router], tokens_per_expert: torch.Tensor, speed: float) -> None:
    """Aux-loss-free balancing: b_i += speed * sign(mean load - load_i), per layer (V3 report §2.1.2).

    `tokens_per_expert` [layers, experts] must count the whole global batch. Only routers that select
    with the bias (topk_method noaux_tc) are updated; the bias stays fp32 and outside autograd.
    """
    for router, load in zip(routers, tokens_per_expert, strict=True):
        if router.topk_method == "noaux_tc" and speed > 0:
            bias = router.e_score_correction_bias
            bias.add_(speed * torch.sign(load.mean() - load).to(device=bias.device, dtype=bias.dtype))


def expert_load_summary(tokens_per_expert: torch.Tensor) -> dict[str, Any]:
    """Per-layer max and min expert load relative to the mean (1.0 = perfectly balanced) and the
    largest violation max_i(load_i) / mean - 1 over layers (MaxVio, Wang et al. 2024)."""
    relative = tokens_per_expert / tokens_per_expert.mean(dim=1, keepdim=True).clamp_min(1e-9)
    maxima, minima = relative.amax(dim=1), relative.amin(dim=1)
    return {
        "expert_load_max": [round(v, 4) for v in maxima.tolist()],
        "expert_load_min": [round(v, 4) for v in minima.tolist()],
        "max_violation": round(float(maxima.max()) - 1.0, 4),
    }


# ----- throughput accounting -------------------------------------------------------------------------------
def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Model FLOPs of one trained token (forward + backward = 3 x forward, PaLM appendix B convention).

    6 x the parameters a token activates in matmuls (`nanoseek info`'s count: routed experts at
    top_k / n_routed_experts, the MTP depths included, the output head once more per MTP depth, the
    embedding lookup excluded) plus attention's 6 x heads x (qk_dim + v_dim) x seq_len per layer
    (non-causal count, as PaLM and nanoGPT report).
    """
    accounting = account(config)
    head = config.vocab_size * config.hidden_size
    lookup = 0 if config.tie_word_embeddings else head  # tied: the one matrix is also the head
    matmul = accounting.activated_parameters - lookup + accounting.mtp_activated_parameters
    matmul += config.num_mtp_layers * head
    if config.is_mla:
        qk_dim, v_dim = config.qk_head_dim, config.v_head_dim
    else:
        qk_dim = v_dim = config.attention_head_dim
    layers = config.num_hidden_layers + config.num_mtp_layers
    attention = 6 * layers * config.num_attention_heads * (qk_dim + v_dim) * seq_len
    return 6 * matmul + attention


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, override_tflops: float | None = None) -> float:
    """FLOP/s that MFU divides by: the override, the dense bf16 peak of a known GPU, or (CPU) the best
    of a few timed `dtype` matmuls by the BLAS and, for fp32, by oneDNN's GEMM (which fp32 training's
    products take, at twice the BLAS's rate on AVX-512 cores: timed on the BLAS alone, MFU read 105%),
    i.e. MFU relative to the fastest product this CPU reaches."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
        return float("nan")
    size, repeats = 512, 4
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    products: list[Callable[[], torch.Tensor]] = [lambda: a @ b]
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        products.append(lambda: kernels.onednn_mm(a, b))
    best = float("inf")
    for product in products:
        product()  # oneDNN prepares a shape's kernel on first use
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeats):
                product()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best


# ----- the trainer -------------------------------------------------------------------------------------------
class Trainer:
    """Owns model, optimizer, schedule, precision, MoE balancing, checkpoints and metrics of one run.

    model: an unwrapped `CausalLM` (fp32 master weights). The trainer moves it to the run's device,
    converts it for FP8 when asked, turns on activation checkpointing, and wraps it for data parallelism.
    run_dir: where `metrics.jsonl` and `checkpoints/step_*` go.
    loss_fn: `(model, batch) -> (loss, metrics)`; default `language_model_loss`.
    tokenizer: saved into every checkpoint, which then is a complete model directory.
    """

    def __init__(
        self,
        model: CausalLM,
        config: TrainConfig,
        run_dir: str | Path,
        topology: parallel.Topology | None = None,
        loss_fn: LossFn | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        keep_freed_memory()  # steps reuse their freed activations instead of faulting fresh pages in
        self.config = config
        self.topology = topology or parallel.Topology(device=parallel.resolve_device(config.device))
        self.device = self.topology.device
        self.grad_accum_steps = config.grad_accum_steps(self.topology.world_size)
        self.run_dir = Path(run_dir)
        self.model = model.to(self.device)  # a model built on the CPU trains where the run runs
        self.loss_fn = loss_fn or self.language_model_loss
        self.tokenizer = tokenizer
        self.precision = Precision(config.precision, self.device)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        self.flops_per_token = training_flops_per_token(model.config, config.seq_len)
        self.routers = [layer.gate for layer in model.moe_layers()]
        self.precision.prepare(model)
        model.model.gradient_checkpointing = config.gradient_checkpointing
        fsdp_param_dtype = torch.bfloat16 if self.precision.mode in ("bf16", "fp8") else None
        self.wrapped = parallel.parallelize(model, config.data_parallel, self.topology, fsdp_param_dtype)
        self.optimizer = build_optimizer(model, config, self.device)
        self.step = 0
        self.tokens = 0
        self.peak_flops = peak_flops(self.device, self.precision.autocast_dtype or torch.float32, config.peak_tflops)
        self.last_checkpoint: Path | None = None

    # ----- the default loss --------------------------------------------------------------------------
    def language_model_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        return causal_lm_loss(model, batch, mtp_weight(self.config, self.step), self.config.balance_alpha)

    # ----- one optimizer step --------------------------------------------------------------------------
    def train_step(self, batches: Iterator[Batch]) -> dict[str, Any]:
        """Run `grad_accum_steps` micro-batches, clip, step, update router biases; return metrics.

        A non-finite loss or gradient norm stops the run (TrainingError) in fp32/bf16/fp8; in fp16 the
        step is skipped and the loss scale backs off, as dynamic loss scaling intends.
        """
        start = time.perf_counter()
        self.wrapped.train()
        scaler = self.precision.scaler
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        for micro in range(self.grad_accum_steps):
            batch = {key: value.to(self.device, non_blocking=True) for key, value in next(batches).items()}
            tokens += batch["input_ids"].numel()
            with parallel.gradient_sync(self.wrapped, micro == self.grad_accum_steps - 1):
                with self.precision.autocast():
                    loss, metrics = self.loss_fn(self.wrapped, batch)
                scaler.scale_loss(loss / self.grad_accum_steps).backward()
            _accumulate(sums, {"loss": loss.detach(), **metrics})
        metrics = self._reduce(sums, averaged_over=self.grad_accum_steps * self.topology.world_size)

        parameters = list(self.model.parameters())
        scaler.unscale_(parameters)
        max_norm = self.config.grad_clip or float("inf")
        grad_norm = float(parallel.local_value(torch.nn.utils.clip_grad_norm_(parameters, max_norm)))
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if not finite and not scaler.enabled:
            raise TrainingError(
                f"step {self.step + 1}: loss {metrics['loss']} / gradient norm {grad_norm} is not finite "
                f"({self.precision.mode}); stopping. Last good checkpoint: {self.last_checkpoint or 'none yet'}"
            )
        lr = learning_rate(self.config, self.step)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            if EXPERT_LOAD in metrics:
                update_router_biases(self.routers, metrics[EXPERT_LOAD], bias_update_speed(self.config, self.step))
        self.optimizer.zero_grad(set_to_none=True)
        if scaler.enabled:
            metrics.update(loss_scale=scaler.scale, skipped=not finite)
        scaler.update(finite)

        global_tokens = tokens * self.topology.world_size
        self.step += 1
        self.tokens += global_tokens
        seconds = time.perf_counter() - start
        tokens_per_second = global_tokens / seconds
        load = metrics.pop(EXPERT_LOAD, None)
        metrics.update(
            step=self.step, tokens=self.tokens, lr=lr, grad_norm=grad_norm, step_seconds=round(seconds, 4),
            tokens_per_second=round(tokens_per_second, 1),
            mfu=round(tokens_per_second * self.flops_per_token / (self.peak_flops * self.topology.world_size), 5),
        )
        if "mtp_loss" in metrics:
            metrics["mtp_weight"] = mtp_weight(self.config, self.step - 1)
        if load is not None:
            metrics.update(expert_load_summary(load))
        return metrics

    def _reduce(self, sums: dict[str, torch.Tensor], averaged_over: int) -> dict[str, Any]:
        """One all-reduce for every metric: scalars become global means, expert counts global sums."""
        names = sorted(sums)
        flat = torch.cat([sums[name].double().flatten().to(self.device) for name in names])
        parallel.all_reduce_sum_(flat)
        reduced: dict[str, Any] = {}
        offset = 0
        for name in names:
            size = sums[name].numel()
            value = flat[offset : offset + size].view(sums[name].shape)
            offset += size
            reduced[name] = value.float().cpu() if name == EXPERT_LOAD else float(value) / averaged_over
        return reduced

    # ----- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Mean of the loss function's scalar metrics over `eval_batches` batches in all (each rank
        reads its share), prefixed `val_` (e.g. `val_lm_loss`, the main next-token loss)."""
        self.wrapped.eval()
        sums: dict[str, torch.Tensor] = {}
        count = 0
        per_rank = -(-self.config.eval_batches // self.topology.world_size)
        for batch in batches:
            if count == per_rank:
                break
            batch = {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}
            with self.precision.autocast():
                loss, metrics = self.loss_fn(self.wrapped, batch)
            metrics.pop(EXPERT_LOAD, None)
            _accumulate(sums, {"loss": loss.detach(), **metrics})
            count += 1
        self.wrapped.train()
        if not count:
            return {}
        reduced = self._reduce(sums, averaged_over=count * self.topology.world_size)
        return {f"val_{name}": value for name, value in reduced.items()}

    # ----- the loop -----------------------------------------------------------------------------------
    def fit(
        self,
        batches: BatchSource,
        val_batches: Callable[[], Iterable[Batch]] | None = None,
        on_step: Callable[[dict[str, Any]], bool | None] | None = None,
    ) -> dict[str, Any]:
        """Train until `max_steps`, evaluating, logging and checkpointing on schedule; returns the last
        metrics. `val_batches` makes a fresh iterable for each evaluation (the same batches each time).
        `on_step(metrics)` runs after each step (and its evaluation), before logging: a stage adds its
        own entries to `metrics` (GRPO's rollout statistics, held-out task accuracy; `val_*` keys are
        always logged) and returns True to end the run early. Ends with a checkpoint (and, at max_steps,
        a final evaluation)."""
        config = self.config
        log = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.topology.is_main)
        progress = tqdm(
            total=config.max_steps, initial=self.step, disable=not self.topology.is_main,
            dynamic_ncols=True, desc="train", file=sys.stderr,
        )
        metrics: dict[str, Any] = {}
        try:
            while self.step < config.max_steps:
                metrics = self.train_step(batches)
                done = self.step == config.max_steps
                if val_batches is not None and (done or (config.eval_every and self.step % config.eval_every == 0)):
                    metrics.update(self.evaluate(val_batches()))
                if on_step is not None and on_step(metrics):
                    done = True
                if done or self.step % config.log_every == 0 or any(k.startswith("val_") for k in metrics):
                    log.write(metrics)
                progress.update(1)
                progress.set_postfix_str(_progress_text(metrics), refresh=False)
                if done or (config.checkpoint_every and self.step % config.checkpoint_every == 0):
                    self.save_checkpoint(batches)
                if done:
                    break
        finally:
            progress.close()
            log.close()
        return metrics

    # ----- checkpoints ----------------------------------------------------------------------------------
    def save_checkpoint(self, batches: BatchSource) -> Path:
        """Write `checkpoints/step_N` atomically (HF weights + optimizer + trainer state), keep the last
        `keep_checkpoints`. Collective: every rank must call it."""
        model_state = parallel.full_model_state_dict(self.model)
        optimizer_state = parallel.full_optimizer_state_dict(self.model, self.optimizer)
        rank_states = parallel.gather_to_main({"batches": batches.state_dict(), "rng": _rng_state()})
        directory = checkpointing.checkpoint_path(self.run_dir, self.step)
        if self.topology.is_main:
            trainer_state = {
                "step": self.step,
                "tokens": self.tokens,
                "loss_scaler": self.precision.scaler.state_dict(),
                "ranks": rank_states,
                "train_config": dataclasses.asdict(self.config),
            }
            checkpointing.write_checkpoint(
                directory, self.model.config, model_state, optimizer_state, trainer_state, self.tokenizer
            )
            checkpointing.prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        parallel.barrier()
        self.last_checkpoint = directory
        return directory

    def load_checkpoint(self, directory: str | Path, batches: BatchSource) -> None:
        """Restore weights (router biases included), optimizer, step, loss scale, data position and RNG
        from `directory`, so that training continues exactly where it stopped."""
        directory = Path(directory)
        model_state, optimizer_state, trainer_state = checkpointing.read_checkpoint(directory, self.model.config)
        saved_ranks = len(trainer_state["ranks"])
        if saved_ranks != self.topology.world_size:
            raise TrainingError(
                f"{directory} was written by {saved_ranks} processes; resume it with the same number "
                f"(this run has {self.topology.world_size})"
            )
        parallel.load_full_state_dicts(self.model, self.optimizer, model_state, optimizer_state)
        rank_state = trainer_state["ranks"][self.topology.rank]
        batches.load_state_dict(rank_state["batches"])
        _set_rng_state(rank_state["rng"])
        self.precision.scaler.load_state_dict(trainer_state["loss_scaler"])
        self.step, self.tokens = trainer_state["step"], trainer_state["tokens"]
        self.last_checkpoint = directory
        if self.topology.is_main:
            checkpointing.truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            changed = {
                f.name for f in fields(self.config)
                if trainer_state["train_config"].get(f.name) != getattr(self.config, f.name)
            }
            if changed:
                print(f"resuming with changed settings: {', '.join(sorted(changed))}", file=sys.stderr)


class MetricsLog:
    """Appends one JSON object per line (flushed each write), on the main rank only."""

    def __init__(self, path: Path, enabled: bool = True):
        self.handle = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def _accumulate(sums: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
    for name, value in metrics.items():
        value = torch.as_tensor(value).detach().float()
        sums[name] = sums[name] + value if name in sums else value


def _progress_text(metrics: dict[str, Any]) -> str:
    text = (
        f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} gnorm {metrics['grad_norm']:.3f} "
        f"tok/s {metrics['tokens_per_second']:,.0f} mfu {100 * metrics['mfu']:.2f}%"
    )
    if "max_violation" in metrics:
        text += f" maxvio {metrics['max_violation']:.2f}"
    if "val_lm_loss" in metrics:
        text += f" val {metrics['val_lm_loss']:.4f}"
    return text


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
