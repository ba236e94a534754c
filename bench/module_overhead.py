"""The Python around a packed matmul: one PackedLinear call against the sparse kernel call it makes (PackedLinear._sparse_kernel, on x already padded), batch 1.

For each pattern and value type, a 576 x 576 matrix (the default model's q_proj and o_proj shape) pruned by
magnitude (three-tier with the default tier map) and packed; the module call and the extension call each timed
over --calls calls after a warm-up. Prints microseconds a call and the difference, the overhead a decoding token
pays ~210 times on the default model. Run it alone.

    python bench/module_overhead.py [--calls 3000]
"""
import argparse
import json
import time

import torch
from _common import report
from headline import commit, machine

from hybridprune.pruning import patterns
from hybridprune.sparse import kernels, packing


def matrix(pattern: str, n: int = 576):
    W = torch.randn(n, n, generator=torch.Generator().manual_seed(0))
    if pattern == "unstructured":
        return W * patterns.unstructured_keep(W.abs(), 0.5), {"kind": "unstructured", "shape": [n, n]}, None
    if pattern == "2:4":
        return W * patterns.nm_keep(W.abs(), 2, 4), {"kind": "nm", "n": 2, "m": 4, "shape": [n, n]}, None
    tp = patterns.TieredBlocks()
    keep, tiers = tp.keep(W.abs())
    return W * keep, {"kind": "tiered", "block": 16, "n": 2, "m": 4, "k": 15, "shape": [n, n]}, tiers


def per_call(f, calls: int) -> float:
    for _ in range(200):
        f()
    t = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t) / calls * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000)
    args = ap.parse_args()
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "commit": commit(), **machine()}), flush=True)
    ext, which = kernels.extension(), kernels.impl()
    x = torch.randn(1, 1, 576)
    for pattern in ("three-tier", "2:4", "unstructured"):
        W, layout, tiers = matrix(pattern)
        for values in ("float", "int8"):
            t = packing.pack_matrix(W, layout, "w", tiers)
            lay = layout
            if values == "int8":
                lay, t = packing.quantize(t, layout)
            m = kernels.PackedLinear(lay, t)
            xp = m._padded(x)

            def raw():
                return m._sparse_kernel(ext, xp, which)
            with torch.no_grad():
                module, kernel = per_call(lambda: m(x), args.calls), per_call(raw, args.calls)
            report(dict(pattern=pattern, values=values, module_us=round(module, 1), kernel_us=round(kernel, 1),
                        overhead_us=round(module - kernel, 1)))


if __name__ == "__main__":
    main()
