"""Evaluation speed on the default model: examples/s and tokens/s per task, against a plain batched forward.

Two ratios per task, both counting useful tokens only (padding is not counted):
- `generation_vs_forward`: lm-eval's greedy generation requests alone, prompt plus generated tokens over the time
  spent in generate_until (the issue's target: >= 0.7);
- `task_vs_forward`: the whole task, every token the model reads: the generation requests plus the gold-answer
  pass (prompt + gold answer) for gold_nll; BoolQ scores two continuations, so its passage counts twice.

    python bench/eval_speed.py [--limit 64] [--batch-size 16] [--generate-batch-size 64] [--tasks boolq,squad,gsm8k]
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _common import report, write_json


def _tokens(sample: dict, tok) -> tuple[int, int]:
    """(generation tokens, other tokens read) of one logged sample."""
    prompt = len(tok(sample["prompt"] or "").input_ids)
    outputs = [o[0] if isinstance(o, list) else o for o in sample["output"] or []]
    if sample["task"] == "boolq":
        return 0, prompt * len(outputs)  # one log-likelihood request per answer choice
    gold = len(tok(" " + str(sample["target"])).input_ids)
    return prompt + sum(len(tok(o).input_ids) for o in outputs if isinstance(o, str)), prompt + gold


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tasks", default="boolq,squad,gsm8k")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--generate-batch-size", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()

    from hybridprune import load_model
    from hybridprune.evaluation.tasks import _lm_class, evaluate_model

    lm_class, generation = _lm_class(), {"seconds": 0.0}
    plain_generate_until = lm_class.generate_until

    def timed_generate_until(self, requests, disable_tqdm=False):
        t = time.perf_counter()
        try:
            return plain_generate_until(self, requests, disable_tqdm)
        finally:
            generation["seconds"] += time.perf_counter() - t
    lm_class.generate_until = timed_generate_until

    model, tok = load_model(args.model)
    ids = torch.randint(0, len(tok), (8, 256), generator=torch.Generator().manual_seed(0))
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
            generation["seconds"] = 0.0
            t = time.perf_counter()
            res = evaluate_model(model, tok, [task], limit=args.limit, batch_size=args.batch_size,
                                 generate_batch_size=args.generate_batch_size, samples_path=samples)
            dt = time.perf_counter() - t
            logged = {}  # GSM8K logs each document once per answer filter: count it once
            for line in samples.read_text().splitlines():
                sample = json.loads(line)
                logged.setdefault(sample["doc_id"], sample)
            counts = [_tokens(sample, tok) for sample in logged.values()]
        gen_tokens, other = sum(c[0] for c in counts), sum(c[1] for c in counts)
        row = {"task": task, "examples": res[task]["n"], "seconds": round(dt, 1),
               "examples_per_s": round(res[task]["n"] / dt, 3),
               "task_vs_forward": round((gen_tokens + other) / dt / fwd, 2)}
        if generation["seconds"]:
            row.update(generation_seconds=round(generation["seconds"], 1),
                       generation_tokens_per_s=round(gen_tokens / generation["seconds"], 1),
                       generation_vs_forward=round(gen_tokens / generation["seconds"] / fwd, 2))
        rows.append(row)
        report(rows[-1])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
