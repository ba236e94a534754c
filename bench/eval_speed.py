"""Evaluation speed on the default model: examples/s and tokens/s per task, against a plain batched forward.

Tokens per task are counted from the logged samples: each request's prompt (BoolQ scores two continuations, so
its passage counts twice) plus the generated tokens; padding is not counted, so the ratio shows useful work.

    python bench/eval_speed.py [--limit 16] [--batch-size 8] [--tasks boolq,squad,gsm8k]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import report, write_json


def _tokens(sample: dict, tok) -> int:
    prompt = len(tok(sample["prompt"] or "").input_ids)
    outputs = [o[0] if isinstance(o, list) else o for o in sample["output"] or []]
    if sample["task"] == "boolq":
        return prompt * len(outputs)  # one log-likelihood request per answer choice
    return prompt + sum(len(tok(o).input_ids) for o in outputs if isinstance(o, str))


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
        with tempfile.TemporaryDirectory() as tmp:
            samples = Path(tmp) / "samples.jsonl"
            t = time.perf_counter()
            res = evaluate_model(model, tok, [task], limit=args.limit, batch_size=args.batch_size,
                                 samples_path=samples)
            dt = time.perf_counter() - t
            tokens = sum(_tokens(json.loads(line), tok) for line in samples.read_text().splitlines())
        rows.append({"task": task, "examples": res[task]["n"], "seconds": round(dt, 1),
                     "examples_per_s": round(res[task]["n"] / dt, 3), "tokens_per_s": round(tokens / dt, 1),
                     "vs_plain_forward": round(tokens / dt / fwd, 2)})
        report(rows[-1])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
