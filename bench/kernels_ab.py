"""Two versions of the packed kernels side by side in one process: another csrc/packed.cpp (say, the last commit's)
against the working tree's, and both against torch's dense F.linear, on the prefill GEMM (AVX-512).

    git show HEAD:src/hybridprune/csrc/packed.cpp > /tmp/packed_head.cpp
    python bench/kernels_ab.py /tmp/packed_head.cpp [--patterns three-tier,2:4] [--batches 64,128,256,512]

Both builds run on the same packed matrices (random, pruned by magnitude; 11008 x 4096 fp32 by default) and the
same inputs; the working tree's output is checked against the dense product first. Dense time: the faster of a
measurement before and after the two kernels (torch's time drifts by 10% within a run on 2 cores). Printed per
pattern and batch: each time and its speedup over dense; --json keeps the rows.
"""
import argparse

import torch
import torch.nn.functional as F
from _common import write_json
from kernels import copies_for, pruned_matrix, rotating, timed


def gemm(ext, m, xp):
    if m.kind == "nm":
        return ext.nm24_gemm(xp, m.values, m.positions, 3)
    if m.kind == "tiered":
        return ext.tiered_gemm(xp, m.tiers, m.dense, m.nm_values, m.nm_positions, m.topk_values, m.topk_positions,
                               m.offsets, 3)
    return ext.unstructured_gemm(xp, m.mask, m.values, m.rowptr, 3)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other", help="the other packed.cpp to build and time")
    ap.add_argument("--shape", default="11008x4096")
    ap.add_argument("--patterns", default="three-tier,2:4,unstructured")
    ap.add_argument("--batches", default="64,128,256,512")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    from hybridprune.sparse import kernels
    from hybridprune.sparse import packing
    here, other = kernels.extension(), kernels.build("packed", "", source=args.other)
    if not here.has_avx512():
        raise SystemExit("the packed GEMM needs AVX-512")
    N, K = map(int, args.shape.split("x"))
    print(f"# {N}x{K} float32, threads {torch.get_num_threads()}; other = {args.other}", flush=True)
    rows = []
    for pattern in args.patterns.split(","):
        W, layout, tiers = pruned_matrix(pattern, N, K, torch.float32)
        m = kernels.PackedLinear(layout, packing.pack_matrix(W, layout, pattern, tiers))
        Ws = [W] + [W.clone() for _ in range(copies_for(W.numel() * 4) - 1)]
        for B in map(int, args.batches.split(",")):
            x = torch.randn(B, K)
            xp = m._padded(x)
            with torch.no_grad():
                ref = x.double() @ W.double().t()
                err = ((gemm(here, m, xp)[:, :N].double() - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-5, (pattern, B, err)
                dense = rotating([lambda w=w: F.linear(x, w) for w in Ws])
                t_dense = timed(dense, args.reps)
                t_other = timed(lambda: gemm(other, m, xp), args.reps)
                t_here = timed(lambda: gemm(here, m, xp), args.reps)
                t_dense = min(t_dense, timed(dense, args.reps))
            row = dict(pattern=pattern, shape=args.shape, batch=B, threads=torch.get_num_threads(),
                       dense_ms=round(t_dense * 1e3, 1), other_ms=round(t_other * 1e3, 1),
                       here_ms=round(t_here * 1e3, 1), other_speedup=round(t_dense / t_other, 2),
                       here_speedup=round(t_dense / t_here, 2), here_over_other=round(t_other / t_here, 2))
            rows.append(row)
            print(f"{pattern:13s} batch {B:4d}  dense {row['dense_ms']:7.1f} ms  other {row['other_ms']:7.1f} ms "
                  f"({row['other_speedup']:.2f}x)  here {row['here_ms']:7.1f} ms ({row['here_speedup']:.2f}x)  "
                  f"here/other {row['here_over_other']:.2f}x", flush=True)
    if args.json:
        write_json(rows, args.json)


if __name__ == "__main__":
    main()
