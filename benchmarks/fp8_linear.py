"""Forward + backward time of `Fp8Linear` against `nn.Linear`, printed as one JSON line.

Problem: x [4096, 512] through a 512 -> 1408 Linear (a V2-Lite expert's up-projection width), fp32
master weights. Baseline: nn.Linear in fp32 on CPU, under bf16 autocast on CUDA. On CPU (and on GPUs
other than Hopper) Fp8Linear runs the fp32 reference GEMM plus quantization, so it is expected to be
slower than the baseline; on Hopper it uses cuBLAS's blockwise-scaled FP8 GEMMs.

    python benchmarks/fp8_linear.py [--device cuda] [--repeats 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.nn as nn

from nanoseek.fp8 import Fp8Linear, has_blockwise_scaled_mm

TOKENS, IN_FEATURES, OUT_FEATURES = 4096, 512, 1408


def step_ms(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor, autocast: bool) -> float:
    """Wall time of one forward + backward, in milliseconds."""
    context = torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with context:
        y = module(x)
    y.backward(grad_y.to(y.dtype))
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3
    module.zero_grad(set_to_none=True)
    x.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = device.type == "cuda"

    torch.manual_seed(0)
    baseline = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False, device=device)
    ours = Fp8Linear.from_linear(baseline)
    x = torch.randn(TOKENS, IN_FEATURES, device=device, requires_grad=True)

    grad_y = torch.randn(TOKENS, OUT_FEATURES, device=device)
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for step in range(args.warmup + args.repeats):
        # Alternate the two so that load drift on a shared machine hits both alike.
        for name, module in (("ours", ours), ("baseline", baseline)):
            elapsed = step_ms(module, x, grad_y, autocast)
            if step >= args.warmup:
                times[name].append(elapsed)
    ours_ms, baseline_ms = statistics.median(times["ours"]), statistics.median(times["baseline"])
    print(json.dumps({
        "bench": "fp8_linear",
        "ours": round(ours_ms, 3),
        "baseline": round(baseline_ms, 3),
        "ratio": round(ours_ms / baseline_ms, 3),
        "unit": "ms per forward+backward (median; ratio = ours / baseline, lower is better)",
        "config": {
            "x": [TOKENS, IN_FEATURES],
            "weight": [OUT_FEATURES, IN_FEATURES],
            "device": str(device),
            "baseline": "nn.Linear, bf16 autocast" if autocast else "nn.Linear, fp32",
            "fp8_gemm": "cublas blockwise scaled_mm" if has_blockwise_scaled_mm(device) else "fp32 reference",
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "torch": torch.__version__,
        },
    }))


if __name__ == "__main__":
    main()
