"""One prefill against two: a generating task's evaluation with the gold answer scored on the generation's own KV
cache (tasks._lm_class, `_prefill_scoring_golds`) and with it switched off (generate() prefills, the gold answer
gets its own pass over the prompt), one after the other in one process on the same model. Prints each run's
seconds and headline metrics, then per metric the largest relative per-example difference.

    python bench/eval_prefill.py MODEL [--task squad|gsm8k] [--sample 96] [--generate-batch-size 32]
"""
import argparse
import time

from hybridprune.core.heap import cap_heap_growth


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a model folder or 'default'")
    ap.add_argument("--task", default="squad", choices=["squad", "gsm8k"])
    ap.add_argument("--sample", type=int, default=None, help="default: 96 for squad, 10 for gsm8k (the study's)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--generate-batch-size", type=int, default=32)
    args = ap.parse_args()
    cap_heap_growth()
    from hybridprune.sparse.load import load_model
    from hybridprune.evaluation import tasks
    model, tok = load_model(args.model)
    cls = tasks._lm_class()
    shared = cls._prefill_scoring_golds
    sample = args.sample or (96 if args.task == "squad" else 10)
    results = {}
    for mode in ("one prefill", "two passes"):
        cls._prefill_scoring_golds = shared if mode == "one prefill" else (lambda self, *a: None)
        start = time.perf_counter()
        res = tasks.evaluate_model(model, tok, [args.task], sample=sample, batch_size=args.batch_size,
                                   generate_batch_size=args.generate_batch_size)[args.task]
        results[mode] = res["per_example"]
        print(f"{mode}: {time.perf_counter() - start:.1f} s",
              {k: round(float(v), 6) for k, v in res.items() if isinstance(v, float) and not k.endswith("stderr")},
              flush=True)
    cls._prefill_scoring_golds = shared
    for metric, new in results["one prefill"].items():
        old = results["two passes"][metric]
        worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(new, old))
        print(f"{metric}: n {len(new)}, largest relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
