"""Recovery fine-tuning on the default model pruned 50% with Wanda (16 x 512 WikiText-2 calibration).

Prints the budget, the training time, WikiText-2 test perplexity (16 windows of 2048) before and after LoRA
on WikiText-2 valid, checks that the zero set is unchanged, and compares training throughput of our LoRA
(merged through the mask at the end) with plain PEFT LoRA on the same data.

    python bench/finetune.py [--steps 100] [--batch-size 4] [--seqlen 256] [--windows 16] [--squad]
"""
import argparse
import time

import torch
from _common import report, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--throughput-steps", type=int, default=10)
    ap.add_argument("--squad", action="store_true", help="also LoRA on SQuAD (fit half) and F1 on the eval half")
    ap.add_argument("--squad-limit", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()

    from hybridprune import PruneConfig, load_model, perplexity, prune
    from hybridprune.evaluate import wikitext2_test_ids
    from hybridprune.finetune import FinetuneConfig, capture_masks, finetune
    from hybridprune.models import prunable_matrices
    from hybridprune.tasks import evaluate_model

    torch.manual_seed(0)
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
    same = all(torch.equal(m.weight != 0, masks[n]) for n, m in prunable_matrices(model).items())
    rows.append({"run": "lora-wikitext2", "budget": f"{args.steps} steps x {args.batch_size} x {args.seqlen} tokens",
                 "train_s": round(train_s, 1), "ppl_before": round(before, 2), "ppl_after": round(after, 2),
                 "ppl_change": f"{100 * (after / before - 1):+.1f}%", "zero_set_unchanged": same,
                 "tokens_per_s": res["record"]["tokens_per_second"]})
    report(rows[-1])

    # Throughput: masked LoRA (ours) against plain PEFT LoRA, same data, same steps.
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from hybridprune.finetune import _Collator, _lora_targets, build_dataset
    data = build_dataset(cfg, tok)
    speeds = {}
    for name in ("hybridprune-lora", "plain-peft-lora"):
        model.load_state_dict(pruned_state)
        short = FinetuneConfig(data="wikitext2", steps=args.throughput_steps, batch_size=args.batch_size,
                               seqlen=args.seqlen, save_steps=10**9)
        t = time.perf_counter()
        if name == "hybridprune-lora":
            finetune(model, tok, short, "/tmp/hybridprune-bench-ft2")
        else:
            pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                  target_modules=_lora_targets(model), task_type="CAUSAL_LM"))
            Trainer(model=pm, train_dataset=data, data_collator=_Collator(tok.pad_token_id),
                    args=TrainingArguments("/tmp/hybridprune-bench-ft3", max_steps=args.throughput_steps,
                                           per_device_train_batch_size=args.batch_size, report_to=[],
                                           save_strategy="no", use_cpu=True, remove_unused_columns=False)).train()
            model = pm.merge_and_unload()
        speeds[name] = args.throughput_steps * args.batch_size * args.seqlen / (time.perf_counter() - t)
    rows.append({"run": "throughput", **{k: round(v, 1) for k, v in speeds.items()},
                 "ratio": round(speeds["hybridprune-lora"] / speeds["plain-peft-lora"], 3)})
    report(rows[-1])

    if args.squad:
        model.load_state_dict(pruned_state)
        f1_before = evaluate_model(model, tok, ["squad"], limit=args.squad_limit)["squad"]["f1"]
        res = finetune(model, tok, FinetuneConfig(data="squad", template="simple", steps=args.steps,
                                                  batch_size=args.batch_size, seqlen=512, lr=args.lr,
                                                  save_steps=10**9), "/tmp/hybridprune-bench-ft4")
        f1_after = evaluate_model(res["model"], tok, ["squad"], limit=args.squad_limit)["squad"]["f1"]
        rows.append({"run": "lora-squad", "f1_before": round(f1_before, 2), "f1_after": round(f1_after, 2)})
        report(rows[-1])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
