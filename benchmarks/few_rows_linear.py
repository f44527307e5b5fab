"""Few-row linears: `nanoseek.model.layers.linear` against `F.linear` on the same weights, in one run.

The matmuls of a decode step multiply a few rows (batch-1 decoding: 1; a speculative verify: 2-4;
continuous batching: 16-128) by a weight read from memory. `linear` computes them as (W @ x^T)^T
on CPU (one row doubled to two); `F.linear` computes x @ W^T, which MKL runs on its single-threaded
matrix-vector path for one row. Shapes: the `small` preset's (output head 32000 x 512, fused gate/up
2816 x 512, down 512 x 1408, an expert's 512 x 512 and 512 x 256). Each shape is replicated until
the copies exceed the last-level cache, and each timing cycles through all copies, so every matmul
reads its weight from memory as it does while decoding. The two sides alternate; medians of
`--repeats`. Outputs are asserted equal (to fp32 rounding). One JSON line per (shape, rows); `packed`
is the same matmul with the weight in oneDNN's blocked layout (`nanoseek.infer.packing`, what the
engine runs for fp32 models from 16M parameters), `packed_ratio` its speedup over F.linear.

    python benchmarks/few_rows_linear.py [--rows 1 2 4 16 64 128] [--threads N] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from nanoseek.infer.packing import pack_weight, packed_linear
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
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for name in args.shapes:
            out_features, in_features = SHAPES[name]
            copies = max(2, COPIES_BYTES // (out_features * in_features * 4))
            weights = [torch.randn(out_features, in_features, generator=generator) for _ in range(copies)]
            packed = [pack_weight(weight) for weight in weights]
            for rows in args.rows:
                x = torch.randn(rows, in_features, generator=generator)
                reference = F.linear(x, weights[0])
                # the same product up to fp32 summation order: outputs are sums of in_features products
                # (std ~ sqrt(in_features) here), so the tolerance follows their scale
                atol = 1e-5 * float(reference.abs().max())
                torch.testing.assert_close(linear(x, weights[0]), reference, rtol=1e-4, atol=atol)
                torch.testing.assert_close(packed_linear(x, packed[0]), reference, rtol=1e-4, atol=atol)
                ours, theirs, oned = [], [], []
                for _ in range(args.repeats):
                    ours.append(seconds_per_matmul(linear, x, weights))
                    theirs.append(seconds_per_matmul(F.linear, x, weights))
                    oned.append(seconds_per_matmul(packed_linear, x, packed))
                ours_us, theirs_us = statistics.median(ours) * 1e6, statistics.median(theirs) * 1e6
                packed_us = statistics.median(oned) * 1e6
                print(json.dumps({
                    "bench": "few_rows_linear", "ours": round(ours_us, 1), "baseline": round(theirs_us, 1),
                    "ratio": round(theirs_us / ours_us, 2), "unit": "us/matmul (median)", "baseline_name": "F.linear",
                    "packed": round(packed_us, 1), "packed_ratio": round(theirs_us / packed_us, 2),
                    "config": {"shape": name, "out_features": out_features, "in_features": in_features, "rows": rows,
                               "weight_copies": copies},
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu",
                }), flush=True)


if __name__ == "__main__":
    main()
