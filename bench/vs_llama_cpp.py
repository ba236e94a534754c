"""The user's alternative, side by side: llama.cpp on the default model's own GGUF against hybridprune's kernels.

The default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF (token embedding and tied output Q8_0);
hybridprune loads it dequantized to fp32, so both sides start from the same weights. In one process, same
prompts (bench/decode.py's), batch 1, greedy, --new-tokens each, the same thread count:
- llama.cpp (llama-cpp-python) on the GGUF as shipped, Q4_1;
- the dense fp32 model through transformers;
- the model pruned to --pattern (Wanda, WikiText-2) and packed with int8 values and the int8 LM head.
Each rate is the median of --repeats passes of (new tokens / seconds of the whole call, prompt included), the
definition bench/decode.py uses; both sides get the same prompt token ids (transformers' tokenizer) and stop at
EOS. Also printed: the megabytes of weights each side reads a token, and, for llama.cpp, how many prompts' outputs
equal the dense fp32 model's and how many tokens each shares with it before the first difference (Q4_1 against
its own dequantized weights: llama.cpp also rounds the activations to 8 bits in its dot products). The pruned
model's text differs from the dense model's by design (bench/decode.py compares it with the fp32 packed model).

llama-cpp-python is not a dependency of hybridprune. Build it for this bench alone, beside the project's venv:

    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install --no-deps --target .bench/llama-site llama-cpp-python==0.3.36 diskcache
    PYTHONPATH=.bench/llama-site .venv/bin/python bench/vs_llama_cpp.py [--pattern three-tier] [--json out.json]

Run it alone.
"""
import json
import statistics
import time

import torch
from _common import report, write_json
from decode import PATTERNS, PROMPTS, arguments, decode
from headline import commit, machine


def gguf_bytes(path) -> dict:
    """Bytes of the GGUF's matrices a token reads: the decoder's and the output head's (the tied embedding)."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    return {"decoder": sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2),
            "head": sizes.get("output.weight", sizes.get("token_embd.weight", 0)),  # untied, else tied
            "types": sorted({t.tensor_type.name for t in reader.tensors})}


def llama_decode(llm, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[list[list[int]], float]:
    """(each prompt's generated token ids, tokens/s): the same prompt ids as transformers gets, greedy, up to
    new_tokens or EOS, the KV cache reset before each prompt; the seconds include the prompt's own pass."""
    eos = llm.token_eos()

    def one_pass():
        outs, tokens, seconds = [], 0, 0.0
        for ids in prompts:
            llm.reset()
            out = []
            t = time.perf_counter()
            for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                if token == eos:
                    break
                out.append(token)
                if len(out) == new_tokens:
                    break
            seconds += time.perf_counter() - t
            tokens += len(out)
            outs.append(out)
        return outs, tokens, seconds
    one_pass()
    rates, outs = [], None
    for _ in range(repeats):
        outs, tokens, seconds = one_pass()
        rates.append(tokens / seconds)
    return outs, statistics.median(rates)


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def packed_model_bytes(model) -> dict:
    """Bytes of the packed decoder matrices and of the output head a token reads."""
    from hybridprune.sparse.kernels import PackedLinear
    from hybridprune.sparse.packing import packed_bytes
    head = model.get_output_embeddings()
    out = {"decoder": 0, "head": 0}
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            out["head" if mod is head else "decoder"] += packed_bytes(mod._buffers)
    return out


def main():
    args = arguments(__doc__).parse_args()
    from llama_cpp import Llama, __version__ as llama_version

    import hybridprune as hp
    from hybridprune.io.models import default_gguf_path
    threads = torch.get_num_threads()
    print(json.dumps({"date": time.strftime("%Y-%m-%d"), "commit": commit(), **machine(),
                      "llama_cpp_python": llama_version}), flush=True)
    path = default_gguf_path()
    dense = hp.load("default")
    tok = dense.tokenizer
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=256, seed=0, verbose=False)
    llama_out, llama_tps = llama_decode(llm, prompt_ids, args.new_tokens, args.repeats)
    del llm

    dense_out, dense_tps = decode(dense.model, tok, args.new_tokens, args.repeats)
    dense_ids = [g[0, len(ids):].tolist() for g, ids in zip(dense_out, prompt_ids)]
    pm = hp.prune(hp.load("default"), method="wanda", calib="wikitext2", nsamples=args.nsamples, seqlen=512, seed=0,
                  **PATTERNS[args.pattern])
    hp.use_kernels(pm, values="int8", lm_head="int8")
    packed_out, packed_tps = decode(pm.model, tok, args.new_tokens, args.repeats)

    llama_bytes = gguf_bytes(path)
    ours = packed_model_bytes(pm.model)
    dense_bytes = {"decoder": sum(m.weight.numel() * 4 for n, m in dense.model.named_modules()
                                  if isinstance(m, torch.nn.Linear) and ".layers." in n),
                   "head": dense.model.get_output_embeddings().weight.numel() * 4}
    rows = [
        dict(side=f"llama.cpp {'+'.join(llama_bytes['types'])}", tok_s=round(llama_tps, 1),
             vs_dense=round(llama_tps / dense_tps, 2), weight_mb_per_token=round(
                 (llama_bytes["decoder"] + llama_bytes["head"]) / 1e6, 1),
             same_as_dense=sum(a == b for a, b in zip(llama_out, dense_ids)),
             tokens_shared_with_dense=[shared_prefix(a, b) for a, b in zip(llama_out, dense_ids)]),
        dict(side="hybridprune dense fp32", tok_s=round(dense_tps, 1), vs_dense=1.0,
             weight_mb_per_token=round((dense_bytes["decoder"] + dense_bytes["head"]) / 1e6, 1),
             same_as_dense=len(PROMPTS)),
        dict(side=f"hybridprune {args.pattern} int8 + LM head int8", tok_s=round(packed_tps, 1),
             vs_dense=round(packed_tps / dense_tps, 2),
             weight_mb_per_token=round((ours["decoder"] + ours["head"]) / 1e6, 1)),
    ]
    for row in rows:
        report(row)
    print(f"hybridprune {args.pattern} int8 / llama.cpp: {packed_tps / llama_tps:.2f}x "
          f"({threads} threads, {args.new_tokens} new tokens a prompt, {len(PROMPTS)} prompts)")
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
