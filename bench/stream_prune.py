"""Layer-streamed against in-memory pruning of a model of >= 1.5B parameters: peak RSS and time.

A randomly initialised Llama-architecture model (default 26 layers, hidden 2048, MLP 5632, the default model's
tokenizer: 1.54B parameters, 6.2 GB of fp32 safetensors) is written once, layer by layer, into a scratch folder
(never into the repo). Each path then prunes it with Wanda 50% in its own process (`hybridprune prune
--stream on|off`), whose peak RSS is read from the kernel (ru_maxrss of the child). The script checks that the
streamed output loads with from_pretrained and equals the in-memory output tensor for tensor.

    python bench/stream_prune.py [--scratch /tmp/hybridprune-bench] [--layers 26] [--nsamples 4 --seqlen 256]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _common import report, write_json


def make_model(folder: Path, layers: int, hidden: int, inter: int) -> int:
    """Write a random Llama shard by shard (one layer in memory at a time); returns its size in bytes."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from hybridprune.io.models import default_model_path

    if (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        return index["metadata"]["total_size"]
    tok = AutoTokenizer.from_pretrained(default_model_path())
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=4096, tie_word_embeddings=False, dtype="float32",
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    weight_map, total, n = {}, 0, layers + 1
    for i in range(n):
        if i < layers:
            p = f"model.layers.{i}."
            t = {p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden)}
            for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
                t[f"{p}self_attn.{m}.weight"] = rand(hidden, hidden)
            t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = rand(inter, hidden), rand(inter, hidden)
            t[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        else:
            t = {"model.embed_tokens.weight": rand(len(tok), hidden), "model.norm.weight": torch.ones(hidden),
                 "lm_head.weight": rand(len(tok), hidden)}
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        total += sum(v.numel() * 4 for v in t.values())
        print(f"  wrote {name}", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)
    return total


def prune_in_child(model: Path, out: Path, stream: str, args) -> dict:
    """Run `hybridprune prune` alone in a child process; its wall time and peak RSS."""
    cmd = [sys.executable, "-m", "hybridprune.cli", "prune", "--model", str(model), "--method", "wanda",
           "--sparsity", "0.5", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--stream", stream,
           "--device", "cpu", "--out", str(out), "--overwrite"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:
        raise SystemExit("run the in-memory path after the streamed one: ru_maxrss of children only grows")
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(peak_kb / 2**20, 2)}


def same_outputs(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    from hybridprune.pruning.streaming import ShardReader
    ra, rb = ShardReader(a), ShardReader(b)
    if set(ra.where) != set(rb.where):
        return False
    for file in sorted(set(ra.where.values())):
        with safe_open(file, "pt") as f:
            for k in f.keys():
                if not torch.equal(f.get_tensor(k), rb.get([k])[k]):
                    return False
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", default="/tmp/hybridprune-bench")
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()

    scratch = Path(args.scratch)
    model = scratch / f"llama-random-{args.layers}x{args.hidden}x{args.inter}"
    size = make_model(model, args.layers, args.hidden, args.inter)
    rows = [{"model_gb": round(size / 2**30, 2), "params_b": round(size / 4 / 1e9, 3)}]
    report(rows[0])
    # the streamed child first: ru_maxrss of children is the largest over all children so far
    streamed = prune_in_child(model, scratch / "pruned-streamed", "on", args)
    rows.append({"path": "streamed", **streamed, "rss_vs_model": round(streamed["peak_rss_gb"] * 2**30 / size, 3)})
    report(rows[-1])
    memory = prune_in_child(model, scratch / "pruned-in-memory", "off", args)
    rows.append({"path": "in memory", **memory, "rss_vs_model": round(memory["peak_rss_gb"] * 2**30 / size, 3)})
    report(rows[-1])
    check = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModelForCausalLM; "
                            "AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('loads')",
                            str(scratch / "pruned-streamed")], capture_output=True, text=True)
    rows.append({"streamed_vs_in_memory_time": round(streamed["seconds"] / memory["seconds"], 2),
                 "streamed_output_loads": check.stdout.strip() == "loads",
                 "outputs_identical": same_outputs(scratch / "pruned-streamed", scratch / "pruned-in-memory")})
    report(rows[-1])
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
