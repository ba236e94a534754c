"""Pruning methods side by side on the default model (issue: the methods practitioners compare against).

Every variant prunes a fresh copy of the model from the same calibration tokens (16 x 512 WikiText-2 by default)
in this one process, one after another, and is scored on the same WikiText-2 test windows (16 x 2048). A variant
is `method[+owl][+dsnot|+dsnot-sign][+cycles=N][+skip=none][+realloc|+lsa][+refit]@pattern` (dsnot-sign:
`--dsnot-same-sign`; cycles=N: `--dsnot-cycles N`; skip=none: `--dsnot-skip none`; realloc, lsa:
`--channel-permutation reallocation` or `lsa`, N:M only; refit: `--refit 10`), the pattern `unstructured:S`, `2:4`
or `three-tier`. Prints one line per variant (perplexity, sparsity, pruning time and its ratio to Wanda's of the
same pattern) and writes JSON. --c4-windows N also scores every variant on N windows of the C4 sample, text that
neither calibration nor the WikiText-2 test touches: a second opinion to choose settings on, so that the test
perplexity is not also the selection score.

    python bench/methods.py                                   # the default grid (see --variants)
    python bench/methods.py --variants wanda@unstructured:0.7,wanda+owl@unstructured:0.7 --json out.json
    python bench/methods.py --variants wanda@three-tier,wanda+owl@three-tier --repeat 3   # times: median of 3

--repeat N prunes the whole list N times, variant after variant (so that a slow spell of the machine hits every
variant alike), scores perplexity once, and reports each variant's median time and its ratio to Wanda's median.
"""
import argparse
import time

import torch
from _common import report, write_json

DEFAULT = ",".join([
    "magnitude@unstructured:0.5", "wanda@unstructured:0.5", "ria@unstructured:0.5", "sparsegpt@unstructured:0.5",
    "wanda@unstructured:0.6", "wanda+dsnot@unstructured:0.6",
    "wanda@unstructured:0.7", "wanda+owl@unstructured:0.7", "ria@unstructured:0.7", "wanda+dsnot@unstructured:0.7",
    "wanda@2:4", "ria@2:4", "ria+lsa@2:4", "wanda+dsnot@2:4",
    "wanda@three-tier", "ria@three-tier", "wanda+owl@three-tier",
])


def config(variant: str, args):
    from hybridprune import PruneConfig
    from hybridprune.pruning.dsnot import DSNOT_CYCLES, DSNOT_SKIP
    what, pattern = variant.split("@")
    method, *extras = what.split("+")
    options = dict(x.split("=", 1) for x in extras if "=" in x)
    sparsity = 0.5
    if pattern.startswith("unstructured:"):
        pattern, sparsity = "unstructured", float(pattern.split(":")[1])
    return PruneConfig(method=method, pattern=pattern, sparsity=sparsity, nsamples=args.nsamples,
                       seqlen=args.seqlen, device="cpu", layer_sparsity="owl" if "owl" in extras else "uniform",
                       dsnot="dsnot" in extras or "dsnot-sign" in extras, dsnot_same_sign="dsnot-sign" in extras,
                       dsnot_cycles=int(options.get("cycles", DSNOT_CYCLES)),
                       dsnot_skip=() if options.get("skip") == "none" else DSNOT_SKIP,
                       channel_permutation="lsa" if "lsa" in extras else "reallocation" if "realloc" in extras
                       else "none", refit=10 if "refit" in extras else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--variants", default=DEFAULT)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16, help="perplexity windows of 2048 tokens")
    ap.add_argument("--c4-windows", type=int, default=0, help="also perplexity on this many C4-sample windows")
    ap.add_argument("--seed", type=int, default=0, help="calibration sample seed (0)")
    ap.add_argument("--repeat", type=int, default=1, help="prune the list this many times; median times")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    from hybridprune import load_model, perplexity, sparsity_report
    from hybridprune.pruning.engine import prune
    from hybridprune.io.data import calibration_samples
    from hybridprune.evaluation.ppl import wikitext2_test_ids

    variants = args.variants.split(",")
    configs = {v: config(v, args) for v in variants}  # every name checked before any work
    dense, tok = load_model(args.model)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    samples = calibration_samples(tok, "wikitext2", args.nsamples, args.seqlen, seed=args.seed)
    ids = wikitext2_test_ids(tok)
    c4_ids = None
    if args.c4_windows:
        from hybridprune.io.data import c4_texts, data_dir, text_ids
        c4_ids = torch.tensor(text_ids(tok, "\n\n".join(c4_texts(data_dir())), "papers"), dtype=torch.long)
    rows, wanda_s, times = [], {}, {v: [] for v in variants}
    for rep in range(args.repeat - 1):  # the earlier repetitions time the prunes only
        for v in variants:
            dense.load_state_dict(state)
            t = time.perf_counter()
            prune(dense, configs[v], samples=samples)
            times[v].append(time.perf_counter() - t)
    for v in variants:
        dense.load_state_dict(state)
        t = time.perf_counter()
        result = prune(dense, configs[v], samples=samples)
        times[v].append(time.perf_counter() - t)
        seconds = sorted(times[v])[len(times[v]) // 2]
        pattern = v.split("@")[1]
        if v.startswith("wanda@"):
            wanda_s[pattern] = seconds
        row = {"variant": v, "ppl": round(perplexity(dense, ids=ids, seqlen=2048, max_windows=args.windows,
                                                     progress=False)["ppl"], 2),
               "sparsity": round(sparsity_report(dense)["overall"], 4), "prune_s": round(seconds, 1),
               **({"c4_ppl": round(perplexity(dense, ids=c4_ids, seqlen=2048, max_windows=args.c4_windows,
                                               progress=False)["ppl"], 2)} if c4_ids is not None else {}),
               "vs_wanda_time": round(seconds / wanda_s[pattern], 2) if pattern in wanda_s else None}
        if args.repeat > 1:
            row["prune_s_all"] = [round(x, 1) for x in times[v]]
        if result.layer_sparsity:
            s = list(result.layer_sparsity.values())
            row["layer_sparsity"] = f"{min(s):.3f}-{max(s):.3f}"
        rows.append(row)
        report(row)
    write_json(rows, args.json)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
