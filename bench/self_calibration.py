"""What self-calibration costs: the time to generate the text against the time of the prune itself.

For each setting (nsamples x seqlen) on the default model: a Wanda prune (unstructured 50%) calibrated on WikiText-2,
then the same prune calibrated on `self` and on `self:wikitext2`, each on a freshly loaded model; the generation's
seconds come from the record (calibration.generation_seconds), the prune's from the rest. Prints one line per prune,
the ratio generation / prune, and the machine. With --self-dtype float32,bfloat16 each generated source runs once per
dtype of its matmuls (the default: the config's, auto), and --ppl-windows N adds each pruned model's WikiText-2 test
perplexity on N windows of the setting's seqlen, to weigh a faster generation against what it prunes with. One
process, 2 threads; run it alone.

    python bench/self_calibration.py [--settings 16x256,32x512] [--self-batch 32] [--self-dtype auto]
                                     [--ppl-windows 0] [--json out.json]
"""
import argparse
import json
import time

import hybridprune as hp
from hybridprune.evaluation.ppl import perplexity
from _common import report, write_json
from headline import commit, machine


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="16x256,32x512", help="nsamples x seqlen, comma-separated")
    ap.add_argument("--self-batch", type=int, default=None, help="sequences generated together (default: the config's)")
    ap.add_argument("--self-dtype", default="auto", help="comma-separated: auto | float32 | bfloat16")
    ap.add_argument("--ppl-windows", type=int, default=0, help="WikiText-2 test windows per pruned model (0: none)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "commit": commit(), **machine()}), flush=True)
    rows = []
    for setting in args.settings.split(","):
        nsamples, seqlen = (int(x) for x in setting.split("x"))
        base = None
        runs = [("wikitext2", None)] + [(calib, dtype) for calib in ("self", "self:wikitext2")
                                        for dtype in args.self_dtype.split(",")]
        for calib, dtype in runs:
            options = {"self_batch": args.self_batch} if args.self_batch else {}
            if dtype:
                options["self_dtype"] = dtype
            pm = hp.prune(hp.load("default"), method="wanda", pattern="unstructured", sparsity=0.5, calib=calib,
                          nsamples=nsamples, seqlen=seqlen, seed=0, **options)
            total = pm.record["prune_seconds"]
            calibration = pm.record.get("calibration") or {}
            generated = calibration.get("generation_seconds", 0.0)
            prune_only = total - generated
            base = prune_only if base is None else base
            parts = calibration.get("generated") or [{}]
            row = {"nsamples": nsamples, "seqlen": seqlen, "calib": calib,
                   "matmul_dtype": parts[0].get("matmul_dtype"), "prune_s": round(prune_only, 1),
                   "generation_s": round(generated, 1), "generation_vs_prune": round(generated / base, 2)}
            if args.ppl_windows:
                row["wikitext2_ppl"] = round(perplexity(pm.model, pm.tokenizer, seqlen=seqlen,
                                                        max_windows=args.ppl_windows)["ppl"], 3)
            report(row)
            rows.append(row)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
