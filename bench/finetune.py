"""Recovery fine-tuning on the default model pruned 50% with Wanda (16 x 512 WikiText-2 calibration).

Prints the budget, the training time, WikiText-2 test perplexity (16 windows of 2048) before and after LoRA
on WikiText-2 valid, checks that the zero set is unchanged, and times what differs from plain PEFT LoRA: the
merge through the mask against PEFT's merge_and_unload (training itself is the same PEFT code).

    python bench/finetune.py [--model out/smollm2-wanda50] [--steps 100] [--batch-size 4] [--seqlen 256]
                             [--windows 16] [--squad [--squad-before results.json]]
    python bench/finetune.py --step-time 6        # one SQuAD LoRA step: logits at answer positions vs all
    python bench/finetune.py --step-time 4 --ways answer [--no-checkpointing]   # time and peak RSS of finetune's way
    python bench/finetune.py --step-time 8 --ways answer --lora-dropout 0.05 --heap-cap   # as the study trains
    python bench/finetune.py --step-time 8 --ways answer --lora-dropout 0.05 --heap-cap --dropout-rng hash

--step-time N times N SQuAD LoRA training steps (forward, backward, batches of --batch-size examples from the
fitting half at 512 tokens, the study's setting) computed the way `finetune` does (the output layer only where a
label follows) and with full logits and the model's own loss, alternating, on the dense default model (the time
does not depend on the zeros); it checks that both give the same loss. Activation checkpointing is on, as in
`finetune` (--no-checkpointing keeps every layer's activations); the process's peak RSS is printed, so run one
--ways per process to compare memory.

--model takes a folder written by `hybridprune prune` (e.g. `make run`'s); without it the bench prunes the
default model itself. --squad-before reads the un-tuned model's SQuAD F1 from a `hybridprune eval --out` file
made on the same model and --squad-limit instead of evaluating it again.
"""
import argparse
import math
import resource
import time

import torch
from _common import report, write_json


def zero_set_unchanged(model, masks) -> bool:
    from hybridprune.io.models import prunable_matrices
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
    ap.add_argument("--step-time", type=int, default=0, metavar="N", help="only time N SQuAD LoRA steps both ways")
    ap.add_argument("--ways", default="answer,full", help="with --step-time: answer (logits where a label follows, "
                    "as finetune) and/or full (all logits, the model's own loss)")
    ap.add_argument("--no-checkpointing", action="store_true", help="with --step-time: keep all activations")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="with --step-time (one way): LoRA dropout "
                    "(finetune's default and the study's: 0.05; 0 keeps both ways' losses equal)")
    ap.add_argument("--dropout-rng", default="torch", choices=("torch", "hash"), help="with --step-time: LoRA "
                    "dropout's masks from torch's nn.Dropout or from finetune's HashDropout")
    ap.add_argument("--heap-cap", action="store_true", help="with --step-time: glibc's mmap threshold at 4 MB, "
                    "as every hybridprune command sets it (heap.cap_heap_growth)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.step_time:
        if args.lora_dropout and "," in args.ways:
            ap.error("--lora-dropout needs a single --ways (each way would draw its own dropout masks)")
        return write_json([step_time(args)], args.json)

    from hybridprune import PruneConfig, load_model
    from hybridprune.pruning.engine import prune
    from hybridprune.evaluation.ppl import wikitext2_test_ids
    from hybridprune.finetuning.finetune import capture_masks

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
    from hybridprune.finetuning.finetune import FinetuneConfig, finetune
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

    from hybridprune.finetuning.finetune import _lora_targets, merge_lora_through_mask
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

    from hybridprune.finetuning.finetune import FinetuneConfig, finetune
    from hybridprune.evaluation.tasks import evaluate_model
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


def step_time(args):
    from peft import LoraConfig, get_peft_model

    from hybridprune import load_model
    from hybridprune.finetuning.finetune import FinetuneConfig, _Collator, _lora_targets, answer_loss, build_dataset
    if args.heap_cap:
        from hybridprune.core.heap import cap_heap_growth
        cap_heap_growth()
    model, tok = load_model("default")
    data = build_dataset(FinetuneConfig(data="squad", template="simple", seqlen=512), tok)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=args.lora_dropout,
                                             target_modules=_lora_targets(model), task_type="CAUSAL_LM"))
    if args.dropout_rng == "hash":
        from hybridprune.finetuning.finetune import use_hash_dropout
        use_hash_dropout(model)
    if not args.no_checkpointing:  # as the Trainer does for finetune
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    collate = _Collator(tok.pad_token_id or tok.eos_token_id, logits_to_keep=True)
    ways = [f"{w}-logits" for w in args.ways.split(",")]
    times, losses = {w: [] for w in ways}, {w: [] for w in ways}
    g = torch.Generator().manual_seed(0)
    for _ in range(args.step_time):
        batch = collate([data[int(i)] for i in torch.randint(len(data), (args.batch_size,), generator=g)])
        labels = batch.pop("labels")
        for name in times:
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            if name == "answer-logits":
                loss = answer_loss(model(**batch), labels)
            else:
                loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
            loss.backward()
            times[name].append(time.perf_counter() - t)
            losses[name].append(loss.item())
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    row = {"run": "squad-lora-step", "batch": f"{args.batch_size} examples, 512-token cap, fp32, "
           f"{torch.get_num_threads()} threads", "checkpointing": not args.no_checkpointing,
           "lora_dropout": args.lora_dropout, "dropout_rng": args.dropout_rng, "heap_cap": args.heap_cap,
           "sum_s": {k: round(sum(v), 2) for k, v in times.items()},
           "median_s": {k: round(v, 3) for k, v in med.items()},
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if len(ways) == 2:
        row["speedup"] = round(med["full-logits"] / med["answer-logits"], 2)
        row["same_loss"] = all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(*losses.values()))
    report(row)
    return row


if __name__ == "__main__":
    main()
