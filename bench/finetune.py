"""Recovery fine-tuning on the default model pruned 50% with Wanda (16 x 512 WikiText-2 calibration).

Prints the budget, the training time, WikiText-2 test perplexity (16 windows of 2048) before and after LoRA
on WikiText-2 valid, checks that the zero set is unchanged, and times what differs from plain PEFT LoRA: the
merge through the mask against PEFT's merge_and_unload (training itself is the same PEFT code).

    python bench/finetune.py [--model out/smollm2-wanda50] [--steps 100] [--batch-size 4] [--seqlen 256]
                             [--windows 16] [--squad [--squad-before results.json]]

--model takes a folder written by `hybridprune prune` (e.g. `make run`'s); without it the bench prunes the
default model itself. --squad-before reads the un-tuned model's SQuAD F1 from a `hybridprune eval --out` file
made on the same model and --squad-limit instead of evaluating it again.
"""
import argparse
import math
import time

import torch
from _common import report, write_json


def zero_set_unchanged(model, masks) -> bool:
    from hybridprune.models import prunable_matrices
    return all(torch.equal(m.weight != 0, masks[n]) for n, m in prunable_matrices(model).items())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a pruned model folder (default: prune the default model 50%% with Wanda here)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--merge-reps", type=int, default=3, help="alternating timings of each merge")
    ap.add_argument("--merge-only", action="store_true", help="only time the merges (no WikiText-2 training run)")
    ap.add_argument("--squad", action="store_true", help="also LoRA on SQuAD (fit half) and F1 on the eval half")
    ap.add_argument("--squad-limit", type=int, default=200)
    ap.add_argument("--squad-steps", type=int, default=None, help="LoRA steps on SQuAD (default: --steps)")
    ap.add_argument("--squad-before", help="results JSON of the un-tuned model (hybridprune eval --out)")
    ap.add_argument("--json")
    args = ap.parse_args()

    from hybridprune import PruneConfig, load_model, prune
    from hybridprune.evaluate import wikitext2_test_ids
    from hybridprune.finetune import capture_masks

    torch.manual_seed(0)
    if args.model:
        model, tok = load_model(args.model)
    else:
        model, tok = load_model("default")
        prune(model, PruneConfig(method="wanda", nsamples=16, seqlen=512, device="cpu"), tokenizer=tok)
    pruned_state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = capture_masks(model)
    ids = wikitext2_test_ids(tok)
    rows = []
    if not args.merge_only:
        wikitext2_recovery(args, model, tok, ids, masks, rows)
        model.load_state_dict(pruned_state)
    merge_timing(args, model, pruned_state, masks, rows)
    if args.squad:
        squad_recovery(args, model, tok, pruned_state, masks, rows)
    write_json(rows, args.json)


def wikitext2_recovery(args, model, tok, ids, masks, rows):
    from hybridprune import perplexity
    from hybridprune.finetune import FinetuneConfig, finetune
    before = perplexity(model, ids=ids, seqlen=2048, max_windows=args.windows)["ppl"]
    cfg = FinetuneConfig(data="wikitext2", method="lora", steps=args.steps, batch_size=args.batch_size,
                         seqlen=args.seqlen, lr=args.lr, save_steps=10**9)
    t = time.perf_counter()
    res = finetune(model, tok, cfg, "/tmp/hybridprune-bench-ft")
    train_s = time.perf_counter() - t
    model = res["model"]
    after = perplexity(model, ids=ids, seqlen=2048, max_windows=args.windows)["ppl"]
    same = zero_set_unchanged(model, masks)
    rows.append({"run": "lora-wikitext2", "budget": f"{args.steps} steps x {args.batch_size} x {args.seqlen} tokens",
                 "train_s": round(train_s, 1), "ppl_before": round(before, 2), "ppl_after": round(after, 2),
                 "ppl_change": f"{100 * (after / before - 1):+.1f}%", "zero_set_unchanged": same,
                 "tokens_per_s": res["record"]["tokens_per_second"]})
    report(rows[-1])


def merge_timing(args, model, pruned_state, masks, rows):
    # What differs from plain PEFT LoRA is the merge alone: training runs the same PEFT modules through the same
    # Trainer, so a training-throughput ratio would be 1 by construction. Time the merge through the mask against
    # PEFT's merge_and_unload on the same adapters (non-zero B, as after training), best of --merge-reps.
    from peft import LoraConfig, get_peft_model

    from hybridprune.finetune import _lora_targets, merge_lora_through_mask
    times = {"merge-through-mask": math.inf, "peft-merge_and_unload": math.inf}
    for _ in range(args.merge_reps):
        for name in times:
            model.load_state_dict(pruned_state)
            torch.manual_seed(0)
            pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=_lora_targets(model),
                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
            t = time.perf_counter()
            model = merge_lora_through_mask(pm, masks) if name == "merge-through-mask" else pm.merge_and_unload()
            times[name] = min(times[name], time.perf_counter() - t)
    rows.append({"run": "merge", "seconds": {k: round(v, 3) for k, v in times.items()},
                 "ratio": round(times["merge-through-mask"] / times["peft-merge_and_unload"], 2)})
    report(rows[-1])


def squad_recovery(args, model, tok, pruned_state, masks, rows):
    import json

    from hybridprune.finetune import FinetuneConfig, finetune
    from hybridprune.tasks import evaluate_model
    model.load_state_dict(pruned_state)
    if not args.squad_before:
        f1_before = evaluate_model(model, tok, ["squad"], limit=args.squad_limit)["squad"]["f1"]
    t = time.perf_counter()
    res = finetune(model, tok, FinetuneConfig(data="squad", template="simple", steps=args.squad_steps or args.steps,
                                              batch_size=args.batch_size, seqlen=512, lr=args.lr,
                                              save_steps=10**9), "/tmp/hybridprune-bench-ft4")
    train_s = time.perf_counter() - t
    f1_after = evaluate_model(res["model"], tok, ["squad"], limit=args.squad_limit)["squad"]["f1"]
    if args.squad_before:  # read last: that evaluation may be running beside this bench
        saved = json.loads(open(args.squad_before).read())
        assert saved["limit"] == args.squad_limit, "--squad-before was evaluated on another --limit"
        f1_before = saved["tasks"]["squad"]["f1"]
    same = zero_set_unchanged(res["model"], masks)
    rows.append({"run": "lora-squad", "budget": f"{args.squad_steps or args.steps} steps x {args.batch_size} "
                 f"examples (simple template, fitting half)", "train_s": round(train_s, 1),
                 "f1_before": round(f1_before, 2), "f1_after": round(f1_after, 2),
                 "zero_set_unchanged": same, "eval_limit": args.squad_limit})
    report(rows[-1])


if __name__ == "__main__":
    main()
