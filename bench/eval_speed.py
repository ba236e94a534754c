"""Evaluation speed on the default model: examples/s per task, and the tokens/s of a plain batched forward.

    python bench/eval_speed.py [--limit 16] [--batch-size 8] [--tasks boolq,squad,gsm8k]
"""
import argparse
import time

import torch
from _common import report, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tasks", default="boolq,squad,gsm8k")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()

    from hybridprune import load_model
    from hybridprune.tasks import evaluate_model

    model, tok = load_model(args.model)
    ids = torch.randint(0, len(tok), (args.batch_size, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids)
        t = time.perf_counter()
        model(input_ids=ids)
        fwd = ids.numel() / (time.perf_counter() - t)
    rows = [{"task": "plain batched forward", "tokens_per_s": round(fwd, 1)}]
    report(rows[0])
    for task in args.tasks.split(","):
        t = time.perf_counter()
        res = evaluate_model(model, tok, [task], limit=args.limit, batch_size=args.batch_size)
        dt = time.perf_counter() - t
        rows.append({"task": task, "examples": res[task]["n"], "seconds": round(dt, 1),
                     "examples_per_s": round(res[task]["n"] / dt, 3)})
        report(rows[-1])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
