"""Pruning speed, memory and quality on the default model (issue: foundation targets).

For each method, in a fresh process: load the default model, draw 16 x 512 WikiText-2 calibration tokens,
time one dense forward pass over them, time pruning to 50% unstructured, read the peak RSS, and measure
WikiText-2 test perplexity on 16 windows of 2048 tokens. Prints one line per method and a JSON summary.

    python bench/prune_speed.py [--methods wanda,sparsegpt] [--nsamples 16] [--seqlen 512] [--windows 16]
"""
import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from _common import report, write_json


def worker(args):
    from hybridprune import PruneConfig, load_model, perplexity, sparsity_report
    from hybridprune.pruning.engine import prune
    from hybridprune.io.data import calibration_samples

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    samples = calibration_samples(tok, "wikitext2", args.nsamples, args.seqlen, seed=0)
    with torch.no_grad():
        t = time.perf_counter()
        for batch in samples.split(args.batch_size):
            model(input_ids=batch, use_cache=False)
        dense_s = time.perf_counter() - t
    out = {"method": args.worker, "pattern": args.pattern, "dense_forward_s": round(dense_s, 2)}
    if args.worker != "dense":  # the comparison group actually used (SparseGPT: matrix, its paper's rule)
        out["group"] = PruneConfig(method=args.worker, group=args.group).comparison_group()
    if args.worker != "dense":
        cfg = PruneConfig(method=args.worker, pattern=args.pattern, sparsity=args.sparsity, nsamples=args.nsamples,
                          seqlen=args.seqlen, batch_size=args.batch_size, device="cpu", group=args.group)
        t = time.perf_counter()
        prune(model, cfg, samples=samples)
        out["prune_s"] = round(time.perf_counter() - t, 2)
        out["ratio"] = round(out["prune_s"] / dense_s, 2)
        out["sparsity"] = round(sparsity_report(model)["overall"], 4)
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    if args.windows:
        out["ppl"] = round(perplexity(model, tok, seqlen=2048, max_windows=args.windows)["ppl"], 2)
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--methods", default="dense,magnitude,wanda,sparsegpt")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--group", default=None, help="unstructured comparison group (default: each method's paper)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--windows", type=int, default=16, help="perplexity windows of 2048 tokens (0: skip)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method] + [a for a in sys.argv[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        if res.returncode or not line:
            print(res.stderr[-2000:], file=sys.stderr)
            sys.exit(f"worker {method} failed")
        row = json.loads(line[-1][7:])
        rows.append(row)
        report(row)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
