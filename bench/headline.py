"""The README's headline table: WikiText-2 perplexity of the default model, methods x patterns, through the API.

For each method and pattern: load the default model, prune it with 16 x 512 WikiText-2 calibration tokens
(seed 0), measure the sparsity and the WikiText-2 test perplexity on the first 16 windows of 2048 tokens, and the
prune time. One process, 2 threads; run it alone. Prints a Markdown table with the machine, date and commit, and
writes JSON with --json.

    python bench/headline.py [--json docs/results/headline.json] [--windows 16]
"""
import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

import hybridprune as hp

ROWS = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("sparsegpt", "unstructured"),
        ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4"),
        ("magnitude", "three-tier"), ("wanda", "three-tier"), ("sparsegpt", "three-tier")]


# Environment variables that hold a side to a narrower instruction set (bench/as_avx2.sh sets them all).
ISA_LIMITS = ("HYBRIDPRUNE_KERNELS", "ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA",
              "MKL_ENABLE_INSTRUCTIONS")


def machine() -> dict:
    """CPU model, the SIMD flags the kernels care about, cores and caches, from /proc/cpuinfo and lscpu."""
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_vnni",
                        "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8") if f in flags]
    caches = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("L1d cache", "L2 cache", "L3 cache"):
                caches[key.strip()] = value.strip()
    except OSError:
        pass
    limits = {k: os.environ[k] for k in ISA_LIMITS if os.environ.get(k)}
    return {"cpu": model, "simd": simd, "threads": torch.get_num_threads(), "caches": caches,
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), **({"isa_limits": limits} if limits else {})}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    header = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), **machine(),
              "command": "python bench/headline.py" + (f" --windows {args.windows}" if args.windows != 16 else "")}
    rows = []
    dense = hp.load("default")
    ppl = hp.evaluate(dense, ["wikitext2"], ppl_windows=args.windows, ppl_seqlen=2048)["wikitext2"]["ppl"]
    rows.append({"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": round(ppl, 2), "prune_s": None})
    print(json.dumps(rows[-1]), flush=True)
    del dense
    for method, pattern in ROWS:
        pm = hp.load("default")
        t = time.perf_counter()
        pm = hp.prune(pm, method=method, pattern=pattern, nsamples=args.nsamples, seqlen=args.seqlen, seed=0)
        seconds = time.perf_counter() - t
        ppl = hp.evaluate(pm, ["wikitext2"], ppl_windows=args.windows, ppl_seqlen=2048)["wikitext2"]["ppl"]
        rows.append({"method": method, "pattern": pattern, "sparsity": round(pm.sparsity, 4), "ppl": round(ppl, 2),
                     "prune_s": round(seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps(header))
    print("| method | pattern | sparsity | WikiText-2 ppl | prune time |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['ppl']:.2f} | "
              f"{'-' if r['prune_s'] is None else str(r['prune_s']) + ' s'} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": header, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
