"""Few-row linears: what the engine runs for fp32 weights against `F.linear` on the same weights, in one run.

The matmuls of a decode step multiply a few rows (batch-1 decoding: 1; a speculative verify: 2-4;
continuous batching: 16-128) by a weight read from memory. "ours" is the engine's product for fp32
weights: the weight packed in panels of 32 outputs (`nanoseek.infer.packing.pack_panels`) and
multiplied by `cpu_ops.panel_linear` up to PANEL_MAX_ROWS rows, by oneDNN on the plain weight beyond.
Alongside: `linear` (`nanoseek.model.layers.linear`, unpacked weights: `cpu_ops.rows_linear` up to 4
rows, then oneDNN's GEMM on the plain weight) and `onednn_packed` (oneDNN's product on a weight
reordered into its own blocked layout, what the engine ran for fp32 models until stop 27).
Shapes: the `small` preset's (output head 32000 x 512, fused gate/up 2816 x 512, down 512 x 1408, an
expert's 512 x 512 and 512 x 256). Each shape is replicated until the copies exceed the last-level
cache, and each timing cycles through all copies, so every matmul reads its weight from memory as it
does while decoding. The variants alternate; medians of `--repeats`. Outputs are asserted equal (to
fp32 rounding). One JSON line per (shape, rows), with each variant's speedup over F.linear.

    python benchmarks/few_rows_linear.py [--rows 1 2 4 16 64 128] [--threads N] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from nanoseek.infer.packing import pack_panels, pack_weight, packed_linear, panel_product
from nanoseek.model import cpu_ops
from nanoseek.model.layers import linear

SHAPES = {"head": (32000, 512), "gate_up": (2816, 512), "down": (512, 1408), "expert_gate_up": (512, 512),
          "expert_down": (512, 256)}
COPIES_BYTES = 256 << 20  # well past any last-level cache here


def seconds_per_matmul(function, x: torch.Tensor, weights: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for weight in weights:
        function(x, weight)
    return (time.perf_counter() - start) / len(weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16, 64, 128])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_ops.load() is None:
        raise SystemExit("the fused CPU kernels could not be built here: the panels' product is one of them")
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name in args.shapes:
            out_features, in_features = SHAPES[name]
            copies = max(2, COPIES_BYTES // (out_features * in_features * 4))
            weights = [torch.randn(out_features, in_features, generator=generator) for _ in range(copies)]
            variants = {  # name -> (product, its weights)
                "ours": (lambda x, pair: panel_product(x, pair[0], None, pair[1]), [(pack_panels(w), w) for w in weights]),
                "F.linear": (F.linear, weights),
                "linear": (linear, weights),
                "onednn_packed": (packed_linear, [pack_weight(w) for w in weights]),
            }
            for rows in args.rows:
                x = torch.randn(rows, in_features, generator=generator)
                reference = F.linear(x, weights[0])
                # the same product up to fp32 summation order: outputs are sums of in_features products
                # (std ~ sqrt(in_features) here), so the tolerance follows their scale
                atol = 1e-5 * float(reference.abs().max())
                for product, matrices in variants.values():
                    torch.testing.assert_close(product(x, matrices[0]), reference, rtol=1e-4, atol=atol)
                times: dict[str, list[float]] = {variant: [] for variant in variants}
                for _ in range(args.repeats):
                    for variant, (product, matrices) in variants.items():
                        times[variant].append(seconds_per_matmul(product, x, matrices))
                us = {variant: statistics.median(values) * 1e6 for variant, values in times.items()}
                print(json.dumps({
                    "bench": "few_rows_linear", "ours": round(us["ours"], 1), "baseline": round(us["F.linear"], 1),
                    "ratio": round(us["F.linear"] / us["ours"], 2), "unit": "us/matmul (median)", "baseline_name": "F.linear",
                    **{variant: round(us[variant], 1) for variant in ("linear", "onednn_packed")},
                    **{f"{variant}_ratio": round(us["F.linear"] / us[variant], 2) for variant in ("linear", "onednn_packed")},
                    "config": {"shape": name, "out_features": out_features, "in_features": in_features, "rows": rows,
                               "weight_copies": copies},
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu",
                }), flush=True)

if __name__ == "__main__":
    main()
