"""int8 packed values against fp32 dense, torch's own int8 dense path and the fp32 packed kernels, in one process.

Part 1, per pattern on an N x K matrix (default 11008 x 4096, a 7B MLP matrix), weights from DRAM as in decoding
(every timing cycles through copies of the matrix: fp32 ones worth twice the L3, as bench/kernels.py does, int8
ones worth --cold-l3 (8) L3s):
    bytes        packed int8 bytes over fp32 dense bytes (targets: three-tier <= 0.18, 2:4 and unstructured <= 0.17)
    batch 1      ms of torch's F.linear on the fp32 matrix, of torch's quantize_dynamic int8 Linear (int8 weights,
                 activations quantized per call, fbgemm), of the fp32 packed kernel and of the int8 packed kernel
                 (targets: int8 packed >= 4x fp32 dense and faster than quantize_dynamic); also the int8 packed
                 kernel with int8 activations (PackedLinear.use_int8_activations: x rounded
                 to int8 per row, AVX-512 VNNI sums), which is what quantize_dynamic does to x, and with int8x2
                 activations (x and its rounding error each rounded to int8, both summed in one pass)
Part 2, quality: the default model pruned (Wanda; three-tier, 2:4, unstructured 50%), its matrices packed in
memory with fp32 and with int8 values, WikiText-2 perplexity through the kernels (target: int8 within 1%); also
int8 values with int8 and with int8x2 activations (one prune per pattern, packed each way).

    python bench/int8.py [--shape 11008x4096] [--reps 20] [--windows 20 --seqlen 512] [--no-quality | --no-speed] [--json out.json]
Run it alone: with two cores anything else running changes the timings.
"""
import argparse
import copy
import json
import time
import warnings

import torch
import torch.nn.functional as F
from _common import report, write_json
from headline import commit, machine
from kernels import cold_copies, copies_for, l3_bytes, pruned_matrix, rotating, timed

PATTERNS = {"three-tier": dict(pattern="three-tier"), "2:4": dict(pattern="2:4"),
            "unstructured": dict(pattern="unstructured", sparsity=0.5)}


def cold(nbytes: int, args) -> int:
    """Copies of an nbytes matrix to cycle through so that the int8 ones come from DRAM: --cold-l3 times the L3 in
    all (2 x L3, bench/kernels.py's rule, left torch's 45 MB int8 matrix partly cached here: 0.94 ms with 2
    copies, 1.25-1.28 ms with 6)."""
    return max(copies_for(nbytes), -(-args.cold_l3 * l3_bytes() // nbytes))


def speed_rows(args) -> list:
    from hybridprune.sparse import kernels, packing
    from torch.ao.quantization import quantize_dynamic
    N, K = map(int, args.shape.split("x"))
    rows = []
    for pattern in PATTERNS:
        W, layout, tiers = pruned_matrix(pattern, N, K, torch.float32)
        fp32 = packing.pack_matrix(W, layout, pattern, tiers)
        qlayout, q = packing.quantize(fp32, layout)
        Ws, fp32_modules = cold_copies(W, layout, fp32)

        def int8_copies(activations: str) -> list:
            """Cold copies of the int8 matrix, each multiplying x as `activations` says."""
            mods = [kernels.PackedLinear(qlayout, {k: v.clone() for k, v in q.items()})
                    for _ in range(cold(packing.packed_bytes(q), args))]
            return [m for m in mods if m.use_int8_activations(activations) or activations == "float"]

        int8_modules, act_modules, act2_modules = (int8_copies(a) for a in ("float", "int8", "int8x2"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao's deprecation notices
            dyn = []
            for _ in range(cold(N * K, args)):  # int8 weights: a quarter of fp32's bytes
                lin = torch.nn.Linear(K, N, bias=False)
                lin.weight.data = W.clone()
                dyn.append(quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8))
        x = torch.randn(1, K)
        with torch.no_grad():
            t = {"dense_fp32": timed(rotating([lambda w=w: F.linear(x, w) for w in Ws]), args.reps),
                 "torch_int8_dynamic": timed(rotating([lambda m=m: m(x) for m in dyn]), args.reps),
                 "packed_fp32": timed(rotating([lambda m=m: m(x) for m in fp32_modules]), args.reps),
                 "packed_int8": timed(rotating([lambda m=m: m(x) for m in int8_modules]), args.reps)}
            if act_modules:
                t["packed_int8_act"] = timed(rotating([lambda m=m: m(x) for m in act_modules]), args.reps)
                t["packed_int8x2_act"] = timed(rotating([lambda m=m: m(x) for m in act2_modules]), args.reps)
        dense_bytes = N * K * 4
        row = dict(pattern=pattern, shape=args.shape, batch=1, threads=torch.get_num_threads(),
                   int8_bytes_ratio=round(packing.packed_bytes(q) / dense_bytes, 4),
                   fp32_packed_bytes_ratio=round(packing.packed_bytes(fp32) / dense_bytes, 4),
                   **{f"{k}_ms": round(v * 1e3, 3) for k, v in t.items()},
                   int8_vs_dense=round(t["dense_fp32"] / t["packed_int8"], 2),
                   int8_vs_torch_int8=round(t["torch_int8_dynamic"] / t["packed_int8"], 2),
                   int8_vs_fp32_packed=round(t["packed_fp32"] / t["packed_int8"], 2),
                   int8_GBps=round(packing.packed_bytes(q) / t["packed_int8"] / 1e9, 1))
        if act_modules:
            row["int8_act_vs_torch_int8"] = round(t["torch_int8_dynamic"] / t["packed_int8_act"], 2)
            row["int8x2_act_vs_torch_int8"] = round(t["torch_int8_dynamic"] / t["packed_int8x2_act"], 2)
            row["int8x2_act_vs_dense"] = round(t["dense_fp32"] / t["packed_int8x2_act"], 2)
        report(row)
        rows.append(row)
        del Ws, fp32_modules, int8_modules, act_modules, act2_modules, dyn
    return rows


def quality_rows(args) -> list:
    import hybridprune as hp
    from hybridprune.evaluation.ppl import perplexity
    from hybridprune.sparse import kernels
    rows = []
    for pattern, options in PATTERNS.items():
        ppl = {}
        pruned = hp.prune(hp.load("default"), method="wanda", calib="wikitext2", nsamples=args.nsamples,
                          seqlen=args.calib_seqlen, seed=0, **options)
        for values in ("float", "int8", "int8 act", "int8x2 act"):
            pm = copy.deepcopy(pruned)  # one prune per pattern, packed four ways
            n = kernels.sparsify_(pm.model, record=pm.record, tier_maps=pm.tier_maps, perms=pm.permutations,
                                  values="float" if values == "float" else "int8")
            if values.endswith(" act"):
                kernels.int8_activations_(pm.model, values.split()[0])
            start = time.perf_counter()
            res = perplexity(pm.model, pm.tokenizer, seqlen=args.seqlen, max_windows=args.windows)
            ppl[values] = res["ppl"]
            report(dict(pattern=pattern, values=values, packed_matrices=n, ppl=round(res["ppl"], 4),
                        windows=res["windows"], seqlen=res["seqlen"], seconds=round(time.perf_counter() - start, 1)))
            del pm
        row = dict(pattern=pattern, ppl_fp32_packed=round(ppl["float"], 4), ppl_int8_packed=round(ppl["int8"], 4),
                   int8_change_pct=round(100 * (ppl["int8"] / ppl["float"] - 1), 3))
        for name in ("int8 act", "int8x2 act"):
            key = name.replace(" ", "_")
            row.update({f"ppl_{key}": round(ppl[name], 4),
                        f"{key}_change_pct": round(100 * (ppl[name] / ppl["float"] - 1), 3)})
        report(row)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="11008x4096")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--cold-l3", type=int, default=8, help="int8 matrices: cycle through this many L3s of copies")
    ap.add_argument("--no-quality", action="store_true", help="only part 1 (bytes and speed)")
    ap.add_argument("--no-speed", action="store_true", help="only part 2 (quality)")
    ap.add_argument("--windows", type=int, default=20, help="WikiText-2 test windows for the perplexity")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per perplexity window")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows of the prunes")
    ap.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "commit": commit(), **machine(),
                      "l3_bytes": l3_bytes()}), flush=True)
    rows = [] if args.no_speed else speed_rows(args)
    if not args.no_quality:
        rows += quality_rows(args)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
