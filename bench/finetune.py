"""Recovery fine-tuning on the default model pruned 50% with Wanda (16 x 512 WikiText-2 calibration).

Prints the budget, the training time, WikiText-2 test perplexity (16 windows of 2048) before and after LoRA
on WikiText-2 valid, checks that the zero set is unchanged, and compares training throughput of our LoRA
(merged through the mask at the end) with plain PEFT LoRA on the same data.

    python bench/finetune.py [--model out/smollm2-wanda50] [--steps 100] [--batch-size 4] [--seqlen 256]
                             [--windows 16] [--squad [--squad-before results.json]]

--model takes a folder written by `hybridprune prune` (e.g. `make run`'s); without it the bench prunes the
default model itself. --squad-before reads the un-tuned model's SQuAD F1 from a `hybridprune eval --out` file
made on the same model and --squad-limit instead of evaluating it again.
"""
import argparse
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
    ap.add_argument("--throughput-steps", type=int, default=10)
    ap.add_argument("--throughput-reps", type=int, default=2, help="alternating trials of each LoRA variant")
    ap.add_argument("--squad", action="store_true", help="also LoRA on SQuAD (fit half) and F1 on the eval half")
    ap.add_argument("--squad-limit", type=int, default=200)
    ap.add_argument("--squad-steps", type=int, default=None, help="LoRA steps on SQuAD (default: --steps)")
    ap.add_argument("--squad-before", help="results JSON of the un-tuned model (hybridprune eval --out)")
    ap.add_argument("--json")
    args = ap.parse_args()

    from hybridprune import PruneConfig, load_model, perplexity, prune
    from hybridprune.evaluate import wikitext2_test_ids
    from hybridprune.finetune import FinetuneConfig, capture_masks, finetune
    from hybridprune.tasks import evaluate_model

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

    # Throughput: masked LoRA (ours) against plain PEFT LoRA, same data, same steps, same Trainer; the two
    # alternate so that a busy machine slows both alike, and each keeps its best trial (Trainer's train_runtime).
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from hybridprune.finetune import _Collator, _lora_targets, build_dataset
    short = FinetuneConfig(data="wikitext2", steps=args.throughput_steps, batch_size=args.batch_size,
                           seqlen=args.seqlen, save_steps=10**9)
    data = build_dataset(short, tok)
    tokens = args.throughput_steps * args.batch_size * args.seqlen
    speeds = {"hybridprune-lora": 0.0, "plain-peft-lora": 0.0}
    for _ in range(args.throughput_reps):
        for name in speeds:
            model.load_state_dict(pruned_state)
            if name == "hybridprune-lora":
                seconds = finetune(model, tok, short, "/tmp/hybridprune-bench-ft2")["record"]["train_seconds"]
            else:
                pm = get_peft_model(model, LoraConfig(r=short.lora_r, lora_alpha=short.lora_alpha,
                                                      lora_dropout=short.lora_dropout,
                                                      target_modules=_lora_targets(model), task_type="CAUSAL_LM"))
                out = Trainer(model=pm, train_dataset=data, data_collator=_Collator(tok.pad_token_id),
                              args=TrainingArguments("/tmp/hybridprune-bench-ft3", max_steps=args.throughput_steps,
                                                     per_device_train_batch_size=args.batch_size, report_to=[],
                                                     learning_rate=short.lr, save_strategy="no", use_cpu=True,
                                                     remove_unused_columns=False)).train()
                seconds = out.metrics["train_runtime"]
                model = pm.merge_and_unload()
            speeds[name] = max(speeds[name], tokens / seconds)
    rows.append({"run": "throughput", "tokens_per_s": {k: round(v, 1) for k, v in speeds.items()},
                 "ratio": round(speeds["hybridprune-lora"] / speeds["plain-peft-lora"], 3)})
    report(rows[-1])

    if args.squad:
        import json
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
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
