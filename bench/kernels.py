"""Packed sparse kernels against torch's dense matmul, side by side in this one process.

Per pattern and shape: the packed bytes over the dense bytes, the kernel's time over torch's (F.linear on the
dense matrix with its zeros) at several batch sizes, and the read ceiling: this machine's read bandwidth,
measured over as many bytes as the dense matrix (the faster of a sum and torch's dense matrix-vector product), so
the fastest a kernel that reads the packed bytes once could be. Every timing cycles through enough copies of
the matrix (twice the L3) that its weights come from DRAM, as they do when a model decodes. Then batch 1 on the
default model's own matrix shapes, added up to one token's decoder matmuls; then end to end: greedy decoding on
the default model, dense against pruned three-tier and Wanda 50% through the kernels, tokens per second (median
of --e2e-repeats passes) and whether the outputs are the same.

    python bench/kernels.py                              # 11008 x 4096 fp32 (a 7B MLP matrix), then end to end
    python bench/kernels.py --shape 4096x4096 --dtype bfloat16 --batches 1,8 --no-e2e --no-bytes --json out.json
    python bench/kernels.py --batches 1 --no-bytes --no-e2e   # batch 1 and the default model's shapes only
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import report, write_json


def l3_bytes() -> int:
    """This CPU's last-level cache (hybridprune.core.specs.cache_bytes: sysfs, 32 MB where it does not say)."""
    from hybridprune.core.specs import cache_bytes
    return cache_bytes()


def copies_for(nbytes: int) -> int:
    """How many distinct copies of an nbytes matrix to cycle through so that each call reads it from DRAM, as
    decoding does (a model's matrices pass through the cache one after another): twice the L3 in all."""
    return max(1, -(-2 * l3_bytes() // nbytes))


def cold_copies(W: torch.Tensor, layout: dict, packed: dict):
    """Distinct copies of a dense matrix and of its PackedLinear, enough of each (copies_for) that cycling through
    them reads every call's weights from DRAM."""
    from hybridprune.sparse import kernels
    from hybridprune.sparse import packing
    Ws = [W] + [W.clone() for _ in range(copies_for(W.numel() * W.element_size()) - 1)]
    modules = [kernels.PackedLinear(layout, {k: v.clone() for k, v in packed.items()})
               for _ in range(copies_for(packing.packed_bytes(packed)))]
    return Ws, modules


def rotating(fns):
    """One callable that calls fns[0], fns[1], ... in turn."""
    state = {"i": 0}

    def call():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()
    return call


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls after two warm-ups."""
    fn(), fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def pruned_matrix(pattern: str, N: int, K: int, dtype, seed: int = 0):
    """A random matrix pruned by magnitude to `pattern`, its layout and tier map (the timing does not depend on
    which weights are kept, only on the pattern)."""
    from hybridprune.pruning import patterns
    torch.manual_seed(seed)
    W = torch.randn(N, K)
    tiers = None
    if pattern == "unstructured":
        keep = patterns.unstructured_keep(W.abs(), 0.5)
        layout = {"kind": "unstructured"}
    elif pattern == "2:4":
        keep = patterns.nm_keep(W.abs(), 2, 4)
        layout = {"kind": "nm", "n": 2, "m": 4}
    else:
        keep, tiers = patterns.TieredBlocks().keep(W.abs())
        layout = {"kind": "tiered", "block": 16, "n": 2, "m": 4, "k": 15}
    return (W * keep).to(dtype), {**layout, "shape": [N, K]}, tiers


def kernel_rows(args) -> list:
    from hybridprune.sparse import kernels, packing, routes
    N, K = map(int, args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    rows = []
    ext = kernels.extension()
    # The read ceiling: the faster of two reads of the same bytes, a sum and torch's dense matrix-vector product
    # (on some CPUs a 2-thread sum does not reach the rate that the matmul's loads do).
    bw_buf = torch.randn(N, K).to(dtype)
    nbytes = N * K * bw_buf.element_size()
    bufs = [bw_buf] + [bw_buf.clone() for _ in range(copies_for(nbytes) - 1)]
    t_sum = timed(rotating([lambda b=b: b.sum() for b in bufs]), args.reps)
    with torch.no_grad():
        x1 = torch.randn(1, K).to(dtype)
        t_mv = timed(rotating([lambda b=b: F.linear(x1, b) for b in bufs]), args.reps)
    bandwidth = nbytes / min(t_sum, t_mv)
    del bw_buf, bufs
    path = {3: "AVX-512", 2: "AVX2", 1: "portable"}[kernels._path(kernels.impl())]  # as HYBRIDPRUNE_KERNELS forces
    print(f"# {N}x{K} {args.dtype}, threads {torch.get_num_threads()}, kernel path {path}, read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s over {nbytes / 1e6:.0f} MB (sum {nbytes / t_sum / 1e9:.1f}, dense "
          f"matrix-vector {nbytes / t_mv / 1e9:.1f}); every timing cycles through {copies_for(nbytes)} copies of "
          f"the matrix (twice the {l3_bytes() >> 20} MB L3), so the weights come from DRAM", flush=True)
    for pattern in args.patterns.split(","):
        W, layout, tiers = pruned_matrix(pattern, N, K, dtype)
        packed = packing.pack_matrix(W, layout, pattern, tiers)
        dense_bytes = W.numel() * W.element_size()
        ratio = packing.packed_bytes(packed) / dense_bytes
        Ws, modules = cold_copies(W, layout, packed)
        module = modules[0]
        for B in map(int, args.batches.split(",")):
            x = torch.randn(B, K).to(dtype)
            with torch.no_grad():
                t_dense = timed(rotating([lambda w=w: F.linear(x, w) for w in Ws]), args.reps)
                t_kernel = timed(rotating([lambda m=m: m(x) for m in modules]), args.reps)  # as dispatched
                by_route = {}  # each route forced (the sparse kernel up to 128 rows: beyond, it is far slower)
                for route in module.routes():
                    if route != routes.SPARSE or B <= 128:
                        by_route[route] = timed(rotating([lambda m=m, r=route: m.matmul(x.float(), route=r)
                                                          for m in modules]), args.reps)
            ceiling = t_dense / (ratio * dense_bytes / bandwidth)  # dense time over reading the packed bytes once
            row = dict(pattern=pattern, shape=args.shape, dtype=args.dtype, batch=B, threads=torch.get_num_threads(),
                       bytes_ratio=round(ratio, 4), dense_ms=round(t_dense * 1e3, 2), kernel_ms=round(t_kernel * 1e3, 2),
                       route=module.route(B, kernels.impl()),
                       routes_ms={r: round(t * 1e3, 2) for r, t in by_route.items()},
                       sparse_kernel_ms=round(by_route[routes.SPARSE] * 1e3, 2) if routes.SPARSE in by_route else None,
                       speedup=round(t_dense / t_kernel, 2), read_ceiling_speedup=round(ceiling, 2),
                       dense_GBps=round(dense_bytes / t_dense / 1e9, 1),
                       kernel_GBps=round(ratio * dense_bytes / t_kernel / 1e9, 1),
                       bandwidth_GBps=round(bandwidth / 1e9, 1))
            report(row)
            rows.append(row)
        mine = [r for r in rows if r["pattern"] == pattern]
        worst = min(mine, key=lambda r: r["speedup"])
        print(f"# {pattern}: slowest against dense {worst['speedup']}x at batch {worst['batch']} "
              f"(target: at least 0.95x at every batch); measured routes: "
              f"{dict(zip(module.route_table(kernels.impl())['buckets'], module.route_table(kernels.impl())['choice']))}",
              flush=True)
        del W, Ws, packed, module, modules
    return rows


def model_bytes_rows(args) -> list:
    """The default model pruned (magnitude: the bytes depend on the pattern, not on which weights are kept),
    saved, packed: prunable bytes packed over dense, and both folders' sizes."""
    import tempfile
    from pathlib import Path

    from hybridprune import PruneConfig
    from hybridprune.pruning.engine import prune
    from hybridprune.sparse.load import load_model
    from hybridprune.sparse import packing
    from hybridprune.pruning.engine import save_pruned
    rows = []
    for dtype in ("float32", "bfloat16"):
        for name, cfg in (("three-tier", dict(pattern="three-tier")), ("2:4", dict(pattern="2:4")),
                          ("unstructured50", dict(pattern="unstructured", sparsity=0.5))):
            model, tok = load_model("default", dtype=dtype)
            config = PruneConfig(method="magnitude", **cfg)
            result = prune(model, config, tokenizer=tok)
            with tempfile.TemporaryDirectory() as tmp:
                dense, packed = Path(tmp) / "dense", Path(tmp) / "packed"
                save_pruned(model, tok, dense, config, result, source="default")
                stats = packing.pack_folder(dense, packed, log=lambda *a: None)
                row = dict(model="default", pattern=name, dtype=dtype,
                           prunable_bytes_ratio=round(stats["packed_bytes"] / stats["dense_bytes"], 4),
                           prunable_MB=f"{stats['dense_bytes'] / 1e6:.1f}->{stats['packed_bytes'] / 1e6:.1f}",
                           folder_MB=f"{packing.folder_bytes(dense) / 1e6:.1f}->{packing.folder_bytes(packed) / 1e6:.1f}")
            report(row)
            rows.append(row)
    return rows


def decode_shape_rows(args) -> list:
    """Batch 1 on the default model's own matrix shapes (576 x 576 q/o, 192 x 576 k/v, 1536 x 576 gate/up,
    576 x 1536 down; fp32), each cycled through twice the L3 as in decoding: what end-to-end decoding is made of.
    The last row adds them up as one token's decoder matmuls (30 layers)."""
    from hybridprune.sparse import packing
    shapes = {"q_proj/o_proj": (576, 576, 2), "k_proj/v_proj": (192, 576, 2), "gate_proj/up_proj": (1536, 576, 2),
              "down_proj": (576, 1536, 1)}
    rows = []
    for pattern in args.patterns.split(","):
        total_dense = total_kernel = 0.0
        for name, (N, K, per_layer) in shapes.items():
            W, layout, tiers = pruned_matrix(pattern, N, K, torch.float32)
            Ws, modules = cold_copies(W, layout, packing.pack_matrix(W, layout, pattern, tiers))
            x = torch.randn(1, 1, K)
            with torch.no_grad():
                t_dense = timed(rotating([lambda w=w: F.linear(x, w) for w in Ws]), len(Ws) * 3)
                t_kernel = timed(rotating([lambda m=m: m(x) for m in modules]), len(modules) * 3)
            total_dense += 30 * per_layer * t_dense
            total_kernel += 30 * per_layer * t_kernel
            row = dict(pattern=pattern, matrix=name, shape=f"{N}x{K}", batch=1, dense_us=round(t_dense * 1e6, 1),
                       kernel_us=round(t_kernel * 1e6, 1), speedup=round(t_dense / t_kernel, 2))
            report(row)
            rows.append(row)
            del Ws, modules
        row = dict(pattern=pattern, matrix="one token (30 layers)", dense_ms=round(total_dense * 1e3, 2),
                   kernel_ms=round(total_kernel * 1e3, 2), speedup=round(total_dense / total_kernel, 2))
        report(row)
        rows.append(row)
    return rows


def e2e_rows(args) -> list:
    """Greedy decoding, dense vs pruned (packed, through the kernels), same prompts; tokens/s and equality."""
    from hybridprune import PruneConfig
    from hybridprune.pruning.engine import prune
    from hybridprune.sparse import kernels
    from hybridprune.sparse.load import load_model
    model, tok = load_model("default")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
               "The three laws of thermodynamics"]

    def decode(m):
        """Outputs and tokens/s: one short warm-up generation, then the prompts `--e2e-repeats` times (median)."""
        from decode import decode as run  # bench/decode.py
        return run(m, tok, args.new_tokens, args.e2e_repeats, prompts)

    dense_out, dense_tps = decode(model)
    rows = []
    for name, cfg in (("three-tier", dict(pattern="three-tier")), ("wanda50", dict(pattern="unstructured", sparsity=0.5))):
        pruned, _ = load_model("default")
        result = prune(pruned, PruneConfig(method="wanda", calib="wikitext2", nsamples=8, seqlen=256, **cfg), tokenizer=tok)
        ref_out, ref_tps = decode(pruned)  # the pruned model as dense matrices with zeros
        n = kernels.sparsify_(pruned, PruneConfig(method="wanda", **cfg), result)
        out, tps = decode(pruned)
        row = dict(model="default", pattern=name, packed_matrices=n, new_tokens=args.new_tokens,
                   dense_tok_s=round(dense_tps, 1), zeros_dense_tok_s=round(ref_tps, 1), kernels_tok_s=round(tps, 1),
                   speedup=round(tps / dense_tps, 2), same_outputs_as_unpacked=all(torch.equal(a, b) for a, b in zip(out, ref_out)))
        report(row)
        rows.append(row)
        del pruned
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="11008x4096", help="N x K of the weight matrix (default: a 7B MLP matrix)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--patterns", default="three-tier,2:4,unstructured")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256,512")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--e2e-repeats", type=int, default=3, help="passes over the prompts per model (median)")
    ap.add_argument("--no-e2e", action="store_true", help="no end-to-end decoding")
    ap.add_argument("--no-decode-shapes", action="store_true", help="no rows for the default model's shapes")
    ap.add_argument("--no-bytes", action="store_true", help="no packed sizes of the default model")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--plot", help="also draw time against batch size per pattern into this PNG")
    args = ap.parse_args()
    rows = kernel_rows(args)
    if not args.no_decode_shapes:
        rows += decode_shape_rows(args)
    if not args.no_bytes:
        rows += model_bytes_rows(args)
    if not args.no_e2e:
        rows += e2e_rows(args)
    write_json(rows, args.json)
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list, path: str) -> None:
    """Milliseconds per matmul against batch size: torch dense and each pattern's packed kernel (as dispatched)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if "route" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    for ax, pattern in zip(axes, dict.fromkeys(r["pattern"] for r in rows)):
        sel = [r for r in rows if r["pattern"] == pattern]
        b = [r["batch"] for r in sel]
        ax.plot(b, [r["dense_ms"] for r in sel], "o-", label="torch dense (zeros kept)")
        ax.plot(b, [r["kernel_ms"] for r in sel], "s-", label="packed, as dispatched")
        direct = [(r["batch"], r["sparse_kernel_ms"]) for r in sel if r["sparse_kernel_ms"] is not None]
        ax.plot(*zip(*direct), "x:", label="sparse kernel forced")
        ax.set(xscale="log", yscale="log", xlabel="batch (rows of x)", title=f"{pattern}, bytes x{sel[0]['bytes_ratio']}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"ms per x @ W.T ({rows[0]['shape']} {rows[0]['dtype']}, {rows[0]['threads']} threads)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
