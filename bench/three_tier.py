"""Three-tier hybrid sparsity against unstructured and 2:4 pruning on the default model.

Three-tier variants run with the default least-squares refit (10 steps) unless named -norefit; unstructured and
2:4 run as published (no refit) unless named -refit.

One process, one set of 16 x 512 WikiText-2 calibration samples, the dense weights restored between runs.
For each variant: pruning time (and its ratio to unstructured Wanda), measured sparsity, and WikiText-2 test
perplexity on 16 windows of 2048 tokens.

    python bench/three_tier.py [--windows 16] [--only three-tier-wanda-matrix,wanda-unstructured]
"""
import argparse
import time

import torch
from _common import report, write_json

VARIANTS = {
    # name: PruneConfig overrides
    "dense": None,
    "magnitude-unstructured": dict(method="magnitude", pattern="unstructured", sparsity=0.41328125),
    # the magnitude baseline of the Wanda and SparseGPT code: one threshold per matrix
    "magnitude-unstructured-matrix": dict(method="magnitude", pattern="unstructured", sparsity=0.41328125,
                                          group="matrix"),
    "wanda-unstructured": dict(method="wanda", pattern="unstructured", sparsity=0.41328125),
    "wanda-unstructured-refit": dict(method="wanda", pattern="unstructured", sparsity=0.41328125, refit=10),
    "wanda-2:4": dict(method="wanda", pattern="2:4"),
    "three-tier-wanda-layer-norefit": dict(method="wanda", pattern="three-tier", scope="layer", refit=0),
    "three-tier-wanda-matrix": dict(method="wanda", pattern="three-tier", tier_metric="wanda", scope="matrix"),
    "three-tier-magnitude-matrix": dict(method="wanda", pattern="three-tier", tier_metric="magnitude", scope="matrix"),
    "three-tier-wanda-layer": dict(method="wanda", pattern="three-tier", tier_metric="wanda", scope="layer"),
    "three-tier-wanda-model": dict(method="wanda", pattern="three-tier", tier_metric="wanda", scope="model"),
    "three-tier-magnitude-layer": dict(method="wanda", pattern="three-tier", tier_metric="magnitude", scope="layer"),
    "three-tier-sparsegpt-layer": dict(method="sparsegpt", pattern="three-tier", scope="layer"),
    "three-tier-wanda-layer-rowscore": dict(method="wanda", pattern="three-tier", scope="layer", block_score="row"),
    "three-tier-wanda-matrix-rowscore": dict(method="wanda", pattern="three-tier", scope="matrix", block_score="row"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="calibration sample seed")
    ap.add_argument("--only", help="comma-separated variant names")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--timing-reps", type=int, default=0,
                    help="instead: time Wanda unstructured and three-tier (layer, matrix) interleaved N times each")
    args = ap.parse_args()
    if args.timing_reps:
        return timing(args)

    from hybridprune import PruneConfig, load_model, perplexity, sparsity_report
    from hybridprune.pruning.engine import prune
    from hybridprune.io.data import calibration_samples
    from hybridprune.evaluation.ppl import wikitext2_test_ids

    model, tok = load_model(args.model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    samples = calibration_samples(tok, "wikitext2", args.nsamples, args.seqlen, seed=args.seed)
    ids = wikitext2_test_ids(tok)
    names = args.only.split(",") if args.only else list(VARIANTS)
    rows, wanda_s = [], None
    for name in names:
        model.load_state_dict(dense_state)
        row = {"variant": name}
        if VARIANTS[name] is not None:
            cfg = PruneConfig(nsamples=args.nsamples, seqlen=args.seqlen, device="cpu", **VARIANTS[name])
            t = time.perf_counter()
            prune(model, cfg, samples=samples)
            row["prune_s"] = round(time.perf_counter() - t, 2)
            if name == "wanda-unstructured":
                wanda_s = row["prune_s"]
        row["sparsity"] = round(sparsity_report(model)["overall"], 4)
        row["ppl"] = round(perplexity(model, ids=ids, seqlen=2048, max_windows=args.windows)["ppl"], 2)
        if wanda_s and "prune_s" in row:
            row["time_vs_wanda"] = round(row["prune_s"] / wanda_s, 2)
        rows.append(row)
        report(row)
    write_json(rows, args.json)


def timing(args):
    """Pruning time only, variants interleaved so that machine noise hits them alike; reports the best of N."""
    from hybridprune import PruneConfig, load_model
    from hybridprune.pruning.engine import prune
    from hybridprune.io.data import calibration_samples

    model, tok = load_model(args.model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    samples = calibration_samples(tok, "wikitext2", args.nsamples, args.seqlen, seed=args.seed)
    variants = {"wanda-unstructured": dict(sparsity=0.41328125),
                "three-tier-layer": dict(pattern="three-tier"),
                "three-tier-layer-norefit": dict(pattern="three-tier", refit=0),
                "three-tier-matrix-norefit": dict(pattern="three-tier", scope="matrix", refit=0),
                "wanda-unstructured-refit": dict(sparsity=0.41328125, refit=10)}
    times = {name: [] for name in variants}
    for _ in range(args.timing_reps):
        for name, kw in variants.items():
            model.load_state_dict(dense_state)
            t = time.perf_counter()
            prune(model, PruneConfig(nsamples=args.nsamples, seqlen=args.seqlen, device="cpu", **kw), samples=samples)
            times[name].append(time.perf_counter() - t)
    base = min(times["wanda-unstructured"])
    rows = [{"variant": n, "best_s": round(min(v), 2), "ratio_vs_wanda": round(min(v) / base, 3)}
            for n, v in times.items()]
    for row in rows:
        report(row)
    write_json(rows, args.json)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
