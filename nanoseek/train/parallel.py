"""Multi-process training under torchrun: process group, data-parallel wrapping, collectives.

Model code is single-device and never imports torch.distributed; this module wraps it from outside,
as torchtitan does:

    topology = init_distributed()                 # reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    wrapped = parallelize(model, "fsdp", ...)      # FSDP2 per decoder layer + root, or DDP

`fsdp` (the default) shards parameters, gradients and optimizer state over ranks with
`torch.distributed.fsdp.fully_shard` (ZeRO-3); in bf16 it all-gathers parameters in bf16 and reduces
gradients in fp32. `ddp` replicates the model and all-reduces gradients. Gloo runs on CPU, NCCL on
CUDA. Each rank reads its own slice of the global batch (the data loaders shard by rank); the loss
is the mean over the global batch because both wrappers average gradients over ranks.

Expert parallelism (DeepSeek-V3 runs 64-way EP) would slot in here, before FSDP, without touching
the model's math: build a 2-D device mesh (data x expert), shard each `RoutedExperts` stack along its
expert dimension (rank r holds experts [r*E/ep, (r+1)*E/ep)), and replace `RoutedExperts.forward`'s
local grouping with dispatch -> all-to-all -> local expert GEMMs -> all-to-all -> combine (tokens are
already sorted by expert there, so the send counts are the per-expert counts). FSDP would then shard
the non-expert parameters over the whole mesh and the expert stacks over the data dimension only.
The router and its `e_score_correction_bias` stay replicated: the global expert counts this module
all-reduces for the bias update are exactly what EP needs too.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from nanoseek.errors import ConfigError

DATA_PARALLEL_MODES = ("fsdp", "ddp")


@dataclass(frozen=True)
class Topology:
    """Where this process sits: its rank among `world_size` and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None) -> torch.device:
    """`None` picks CUDA when present, else CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but CUDA is not available")
    return device


def init_distributed(device: str | None = None) -> Topology:
    """Join the process group when launched by torchrun with more than one process (else no-op)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    base = resolve_device(device)
    if world_size == 1:
        return Topology(device=base)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if base.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"torchrun started process {local_rank} on this node but only {torch.cuda.device_count()} GPU(s) "
                "are visible: start one process per GPU (--nproc_per_node), or train on the CPU with device=cpu"
            )
        torch.cuda.set_device(local_rank)
        base = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        backend = "nccl" if base.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return Topology(rank, world_size, local_rank, base)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(
    model: nn.Module, mode: str, topology: Topology, param_dtype: torch.dtype | None = None
) -> nn.Module:
    """Wrap `model` for data parallelism over `topology`; returns the module to call for forward.

    With FSDP2 the model is sharded in place (the returned object is `model` itself); with DDP the
    returned wrapper holds `model`, and every parameter must get a gradient each step (a loss that
    skips MTP needs FSDP). `param_dtype` (FSDP only) all-gathers parameters in that dtype.
    Single-process runs get `model` back unchanged.
    """
    if mode not in DATA_PARALLEL_MODES:
        raise ConfigError(f"data_parallel {mode!r} is not one of {', '.join(DATA_PARALLEL_MODES)}")
    if not topology.is_distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [topology.device.index] if topology.device.type == "cuda" else None
        # Router biases are updated identically on every rank from all-reduced counts: no broadcast.
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP's default mesh is the accelerator's whenever one is visible, also for a CPU (gloo) run, whose
    # extra ranks then ask for GPUs that do not exist: such a run names its device type. Other runs keep
    # the default (the same mesh, built by FSDP itself).
    accelerator = torch.accelerator.current_accelerator() or torch.device("cpu")
    named = topology.device.type != accelerator.type
    mesh = init_device_mesh(topology.device.type, (topology.world_size,)) if named else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in _decoder_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units: every decoder layer of the main model and of the MTP depths."""
    blocks = list(model.model.layers)
    blocks.extend(depth.block for depth in getattr(model, "mtp", []))
    return blocks


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter for all but the last micro-batch of a step."""
    if enabled or not dist.is_initialized():
        yield
    elif hasattr(wrapped, "no_sync"):  # DDP
        with wrapped.no_sync():
            yield
    else:  # FSDP2
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (identity in a single process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's `value` (a small picklable object) on rank 0, None on the others."""
    if not dist.is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def local_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a replicated DTensor (e.g. FSDP's total gradient norm)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ----- full (unsharded) state dicts for checkpoints ------------------------------------------------------
_FULL_ON_MAIN = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete state dict on CPU, on rank 0 (an empty dict on the other ranks)."""
    return get_model_state_dict(model, options=_FULL_ON_MAIN)


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter names (not indices), on rank 0."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL_ON_MAIN)


def load_full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict
) -> None:
    """Load full state dicts (present on every rank) into a possibly sharded model and its optimizer."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
