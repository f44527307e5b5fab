"""Fused CPU kernels for inference, in C++ (`csrc/cpu_ops.cpp`), built once on first use.

Batch-1 decoding on CPU is bound by op count more than by arithmetic: an RMSNorm in bf16 is four
ATen ops (cast up, norm, cast down, scale), each paying dispatch and allocation with caches cold
from streaming the weights. These kernels do such chains in one call (the idea of vLLM's and
SGLang's CPU kernels, written here for our layouts): RMSNorm, SiLU-and-multiply, rotary embedding,
MoE routing, MLA's absorbed attention for the few queries of a decode step, and the int8 linear's
casts around its matmul. The small ones run on the calling thread; the decode attention kernels split
sequences (or one sequence's heads) over torch's own threads (`at::parallel_for`; on Linux the build
links the OpenMP runtime torch already loaded), and the products that stream weights split the weights:
the few-row linears over panels, a routed-experts layer's used experts, each read once, with no library
call per expert.

They run only where no gradient is recorded (`torch.is_grad_enabled()` False: the engine, eval,
rollouts) on CPU tensors; training and every CUDA path keep the PyTorch code, which stays the
specification (tests/test_cpu_ops.py compares the two). The exceptions are five fp32 training kernels,
each with its backward or feeding one: causal self-attention (`causal_attention_forward` / `_backward`,
through `nanoseek.model.attention.causal_attention`, with or without a gradient: SDPA's CPU kernels
take 2-5x longer at the small head dims and short sequences of the models trained here), the output
head's per-token log-probs and their gradient (`token_logprobs`), SwiGLU's silu(gate) * up
(`silu_mul`), RMSNorm's backward (`rms_norm_backward`) and the rotary embedding (`rope`, whose
backward is the inverse rotation). Set `NANOSEEK_CPU_KERNELS=0` to turn them off. The first use
compiles them with torch.utils.cpp_extension (a C++ compiler and ninja, about 25 seconds; `make` does
it while setting up), cached under TORCH_EXTENSIONS_DIR; if that fails, one warning is printed and the
PyTorch code runs instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
_module: ModuleType | None = None
_state = "unloaded"  # "unloaded" -> "loaded" | "off"


def set_enabled(value: bool) -> None:
    """Turn the kernels on or off for this process (tests and A/B benchmarks)."""
    global _state
    _state = ("loaded" if _module is not None else "unloaded") if value else "off"


def load() -> ModuleType | None:
    """The compiled kernels, building them on first call; None when off or when the build fails."""
    global _module, _state
    if _state == "loaded" or _state == "off":
        return _module if _state == "loaded" else None
    if os.environ.get("NANOSEEK_CPU_KERNELS", "1") == "0":
        _state = "off"  # decided once, not looked up at every op
        return None
    # Say why the first call pauses, but only if it does (a cached build loads in well under a second).
    notice = threading.Timer(1.0, lambda: print("nanoseek: building the fused CPU kernels (once, ~25 s)...",
                                                file=sys.stderr, flush=True))
    notice.start()
    try:
        from torch.utils.cpp_extension import load as build

        scripts = str(Path(sys.executable).parent)  # the `ninja` wheel's binary, when the venv is not activated
        if shutil.which("ninja") is None and shutil.which("ninja", path=scripts) is not None:
            os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")

        try:
            _module = _load_or_build(build, openmp=sys.platform.startswith("linux"))
        except Exception:  # a compiler without OpenMP (clang without libomp): the kernels run on one thread
            if not sys.platform.startswith("linux"):
                raise
            _module = _load_or_build(build, openmp=False)
        _state = "loaded"
    except Exception as error:  # no compiler, no ninja, read-only cache...: the PyTorch code still runs
        warnings.warn(f"nanoseek: fused CPU kernels unavailable ({type(error).__name__}: {str(error)[:200]}); "
                      "using PyTorch ops (set NANOSEEK_CPU_KERNELS=0 to skip the build)", stacklevel=2)
        _state = "off"
    finally:
        notice.cancel()
    return _module if _state == "loaded" else None


def _load_or_build(build, openmp: bool) -> ModuleType:
    name, flags = build_name_and_flags(openmp)
    module = _import_built(name)
    if module is None:
        module = build(name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=_ldflags(flags), verbose=False)
    return module


def build_name_and_flags(openmp: bool = sys.platform.startswith("linux")) -> tuple[str, list[str]]:
    """The extension's name and compiler flags. On x86-64 it is compiled for this CPU's vector units
    (`-march=native`), so the name carries a fingerprint of the CPU and of torch's version: a cache
    directory shared between machines, or kept across a torch upgrade (torch's own cache key covers
    only the sources and flags), gets a build of its own instead of loading one made for another CPU
    or another libtorch. The fingerprint also covers the source and the flags, so a build under this
    name is current and is imported without asking ninja (`_import_built`). No FMA contraction, so
    fused kernels round like the PyTorch ops they replace (routed_experts' products lift it locally).
    With `openmp` (tried first on Linux), `at::parallel_for` runs on torch's threads (the OpenMP runtime
    torch loaded); without, the kernels that use it run on the calling thread."""
    flags = ["-O3", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    if openmp:
        flags.append("-fopenmp")
    fingerprint = (platform.machine() + platform.processor() + _cpu_flags() + torch.__version__ + " ".join(flags)
                   + SOURCE.read_text())
    return f"nanoseek_cpu_ops_{hashlib.sha256(fingerprint.encode()).hexdigest()[:12]}", flags


def _ldflags(flags: list[str]) -> list[str]:
    return [flag for flag in flags if flag == "-fopenmp"]


def _import_built(name: str) -> ModuleType | None:
    """The extension `name` if a finished build of it is in torch's extension cache, imported directly:
    `torch.utils.cpp_extension.load` would run ninja under a file lock in every process (a subprocess
    per process start; the ranks of a torchrun job each do it). None when there is no such build, or
    one is in progress (its lock file exists), or torch's cache layout is not the one expected: then
    `load` builds or waits."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        directory = Path(_get_build_directory(name, verbose=False))
    except Exception:
        return None
    library = directory / f"{name}.so"
    if not library.is_file() or (directory / "lock").exists():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def for_cpu(tensor: torch.Tensor) -> ModuleType | None:
    """The kernels if `tensor` is on the CPU and they are available (recording a gradient or not)."""
    if _state == "off" or tensor.device.type != "cpu":
        return None
    return _module if _state == "loaded" else load()


def for_inference(tensor: torch.Tensor) -> ModuleType | None:
    """The kernels if `tensor` may take them: CPU, no gradient being recorded, kernels available."""
    if _state == "off" or torch.is_grad_enabled() or tensor.device.type != "cpu":
        return None
    return _module if _state == "loaded" else load()
