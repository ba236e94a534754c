"""What self-calibration costs: the time to generate the text against the time of the prune itself.

For each setting (nsamples x seqlen) on the default model: a Wanda prune (unstructured 50%) calibrated on WikiText-2,
then the same prune calibrated on `self` and on `self:wikitext2`, each on a freshly loaded model; the generation's
seconds come from the record (calibration.generation_seconds), the prune's from the rest. Prints one line per prune,
the ratio generation / prune, and the machine. One process, 2 threads; run it alone.

    python bench/self_calibration.py [--settings 16x256,32x512] [--self-batch 32] [--json out.json]
"""
import argparse
import json
import time

import hybridprune as hp
from _common import report, write_json
from headline import commit, machine


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="16x256,32x512", help="nsamples x seqlen, comma-separated")
    ap.add_argument("--self-batch", type=int, default=None, help="sequences generated together (default: the config's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "commit": commit(), **machine()}), flush=True)
    rows = []
    for setting in args.settings.split(","):
        nsamples, seqlen = (int(x) for x in setting.split("x"))
        base = None
        for calib in ("wikitext2", "self", "self:wikitext2"):
            options = {"self_batch": args.self_batch} if args.self_batch else {}
            pm = hp.prune(hp.load("default"), method="wanda", pattern="unstructured", sparsity=0.5, calib=calib,
                          nsamples=nsamples, seqlen=seqlen, seed=0, **options)
            total = pm.record["prune_seconds"]
            generated = (pm.record.get("calibration") or {}).get("generation_seconds", 0.0)
            prune_only = total - generated
            base = prune_only if base is None else base
            row = {"nsamples": nsamples, "seqlen": seqlen, "calib": calib, "prune_s": round(prune_only, 1),
                   "generation_s": round(generated, 1), "generation_vs_prune": round(generated / base, 2)}
            report(row)
            rows.append(row)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
