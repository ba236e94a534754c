"""End-to-end decoding on the default model, batch 1, greedy: where a token's time goes, dense against packed.

Models: the dense fp32 model; the same model pruned (Wanda, WikiText-2 calibration) to --pattern, through the
kernels with fp32 values, with int8 values, with int8 values plus the LM head packed int8 too
(use_kernels(lm_head="int8"): a scale per vocabulary row; the tied embedding stays fp32), and that with int8
activations (use_kernels(activations="int8"): x rounded to int8 per row, AVX-512 VNNI sums) and with int8x2
activations (x and its rounding error as two int8 terms). For each: tokens per second (median of --repeats passes over
the prompts, --new-tokens each), the outputs against the fp32-packed model's (where they differ, the fp32-packed
model's gap between its two best logits at the first differing token: a near tie, or not), and a breakdown of
one pass: seconds in the packed (or dense) decoder matmuls, the LM head, attention and the rest (Python, norms,
generate's own work), from forward hooks (which add a little time of their own).

    python bench/decode.py [--pattern three-tier] [--new-tokens 48] [--repeats 3] [--variants fp32,int8,...]
                           [--json out.json]
Run it alone.
"""
import argparse
import json
import statistics
import time

import torch
from _common import report, write_json
from headline import commit, machine

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics"]
VARIANTS = ("fp32", "int8", "int8 + LM head int8", "int8 + LM head int8 + int8 activations",
            "int8 + LM head int8 + int8x2 activations")
PATTERNS = {"three-tier": dict(pattern="three-tier"), "2:4": dict(pattern="2:4"),
            "unstructured": dict(pattern="unstructured", sparsity=0.5)}


def one_pass(model, tok, new_tokens: int, prompts=PROMPTS) -> tuple[list, int, float]:
    """Greedy decoding of each prompt, batch 1: (outputs, new tokens, seconds in generate)."""
    outs, tokens, seconds = [], 0, 0.0
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt")
            t = time.perf_counter()
            g = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            seconds += time.perf_counter() - t
            tokens += g.shape[1] - ids["input_ids"].shape[1]
            outs.append(g)
    return outs, tokens, seconds


def decode(model, tok, new_tokens: int, repeats: int, prompts=PROMPTS):
    """(outputs, tokens/s): one short warm-up, then the prompts `repeats` times (median rate)."""
    model.config.use_cache = True
    one_pass(model, tok, 4, prompts[:1])
    rates = []
    for _ in range(repeats):
        outs, tokens, seconds = one_pass(model, tok, new_tokens, prompts)
        rates.append(tokens / seconds)
    return outs, statistics.median(rates)


def breakdown(model, tok, args) -> dict:
    """Seconds of one pass over the prompts by part, from forward pre/post hooks."""
    from hybridprune.sparse.kernels import PackedLinear
    spent = {"decoder matmuls": 0.0, "LM head": 0.0, "attention core": 0.0}
    start = {}

    def timer(part):
        def pre(mod, inp):
            start[id(mod)] = time.perf_counter()

        def post(mod, inp, out):
            spent[part] += time.perf_counter() - start.pop(id(mod))
        return pre, post
    handles = []
    head = model.get_output_embeddings()
    for name, mod in model.named_modules():
        part = None
        if mod is head:
            part = "LM head"
        elif isinstance(mod, PackedLinear) or (isinstance(mod, torch.nn.Linear) and ".layers." in name) or \
                type(mod).__name__ == "DynamicQuantizedLinear" and ".layers." in name:
            part = "decoder matmuls"
        if part:
            pre, post = timer(part)
            handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    from transformers.integrations import sdpa_attention
    original = sdpa_attention.sdpa_attention_forward

    def timed_attention(*a, **k):
        t = time.perf_counter()
        out = original(*a, **k)
        spent["attention core"] += time.perf_counter() - t
        return out
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    ALL_ATTENTION_FUNCTIONS["sdpa"] = timed_attention
    try:
        _, tokens, total = one_pass(model, tok, args.new_tokens)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
        for h in handles:
            h.remove()
    per = {k: round(v / tokens * 1e3, 2) for k, v in spent.items()}
    per["rest (Python, norms, generate)"] = round((total - sum(spent.values())) / tokens * 1e3, 2)
    per["total"] = round(total / tokens * 1e3, 2)
    return per


def first_gap(ref_model, a, b) -> float | None:
    """Where outputs a and b first differ, the reference model's gap between its two best logits there."""
    if torch.equal(a, b):
        return None
    i = int((a[0][:min(a.shape[1], b.shape[1])] != b[0][:min(a.shape[1], b.shape[1])]).nonzero()[0])
    with torch.no_grad():
        top = torch.topk(ref_model(a[:, :i]).logits[0, -1].float(), 2).values
    return round(float(top[0] - top[1]), 4)


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options of an end-to-end decoding bench (this one and vs_llama_cpp.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pattern", default="three-tier", choices=list(PATTERNS))
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=16, help="calibration sequences of the prune")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, the first the reference the "
                    "others' outputs are compared with (default: all of them)")
    ap.add_argument("--json", default=None)
    return ap


def main():
    args = arguments(__doc__).parse_args()
    import hybridprune as hp
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "commit": commit(), **machine()}), flush=True)
    rows = []
    dense = hp.load("default")
    tok = dense.tokenizer
    dense_out, dense_tps = decode(dense.model, tok, args.new_tokens, args.repeats)
    row = dict(model="dense fp32", tok_s=round(dense_tps, 1), vs_dense=1.0, **breakdown(dense.model, tok, args))
    report(row)
    rows.append(row)
    ref_model, ref_out = None, None
    for variant in args.variants.split(","):
        pm = hp.prune(hp.load("default"), method="wanda", calib="wikitext2", nsamples=args.nsamples, seqlen=512,
                      seed=0, **PATTERNS[args.pattern])
        hp.use_kernels(pm, values="float" if variant == "fp32" else "int8",
                       lm_head="int8" if "LM head int8" in variant else "float",
                       activations=variant.split()[-2] if variant.endswith("activations") else "float")
        out, tps = decode(pm.model, tok, args.new_tokens, args.repeats)
        if ref_model is None:
            ref_model, ref_out = pm.model, out
        gaps = [first_gap(ref_model, a, b) for a, b in zip(ref_out, out)]
        row = dict(model=f"{args.pattern} packed {variant}", tok_s=round(tps, 1), vs_dense=round(tps / dense_tps, 2),
                   same_as_fp32_packed=sum(g is None for g in gaps), prompts=len(gaps),
                   gaps_at_first_difference=[g for g in gaps if g is not None],
                   **breakdown(pm.model, tok, args))
        report(row)
        rows.append(row)
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
