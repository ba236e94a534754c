"""Does a model need BOS at the start of every window? Per-window WikiText-2 test perplexity with and without it.

For windows 1..N (window 0 starts the text, where the papers' convention has a BOS anyway when the tokenizer adds
one) it prints perplexity under `--bos papers` (the text tokenized once, then cut) and `--bos always` (each window
BOS + seqlen - 1 text tokens), and what `--bos auto` picks for this model.

    python bench/bos_check.py --model default --windows 3
    python bench/bos_check.py --model /path/to/gemma-3-270m-q4_k_m.gguf --windows 3     # check only, not shipped
"""
import argparse

from _common import report, write_json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--json")
    args = ap.parse_args()

    from hybridprune import load_model
    from hybridprune.io.data import data_dir, resolve_bos, text_ids, wikitext2_text
    from hybridprune.evaluation.ppl import perplexity

    model, tok = load_model(args.model)
    text = wikitext2_text("test", data_dir())
    papers = text_ids(tok, text, "papers")    # as the tokenizer encodes the whole text
    plain = text_ids(tok, text, "always")     # without special tokens; each window gets its own BOS
    rows = []
    for i in range(1, args.windows + 1):
        n = args.seqlen
        without = perplexity(model, tok, ids=_t(papers[i * n:(i + 1) * n]), seqlen=n, bos="papers", progress=False)
        m = n - 1
        with_bos = perplexity(model, tok, ids=_t(plain[i * m:(i + 1) * m]), seqlen=n, bos="always", progress=False)
        rows.append({"window": i, "ppl_without_bos": round(without["ppl"], 2), "ppl_with_bos": round(with_bos["ppl"], 2)})
        report(rows[-1])
    summary = {"model": args.model, "tokenizer_adds_bos": resolve_bos(tok) == "always", "auto_picks": resolve_bos(tok)}
    report(summary)
    write_json({"summary": summary, "windows": rows}, args.json)


def _t(ids):
    import torch
    return torch.tensor(ids, dtype=torch.long)


if __name__ == "__main__":
    main()
