#!/usr/bin/env bash
# GPU end-to-end check on the default model in bf16 (issue: scale, part 1). One script, meant to finish in under
# 10 minutes on one H100/H200. Prints times, perplexities, zero-set checks and peak GPU memory; the CPU figures to
# compare with are in README (Measured results). NOT YET RUN ON A GPU: no accelerator was lent to the sessions so far.
#
#   bash bench/gpu_check.sh            # needs CUDA, the venv from `make setup`, and HYBRIDPRUNE_DATA (or ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
HP=${HP:-.venv/bin/hybridprune}
export HYBRIDPRUNE_DATA=${HYBRIDPRUNE_DATA:-$(cd .. && pwd)/shared/data}
OUT=${OUT:-$(mktemp -d)}
GPU="--device cuda --dtype bfloat16"
CAL="--nsamples 16 --seqlen 512"

$PY - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

step() {  # name, command...: time one step, print its peak GPU memory (nvidia-smi sampled every 200 ms)
  local name=$1; shift
  local log="$OUT/$name.log" peak="$OUT/$name.mem"
  (while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$peak" 2>/dev/null; sleep 0.2; done) &
  local mon=$! t0; t0=$(date +%s.%N)
  "$@" > "$log" 2>&1 || { kill $mon; echo "FAILED: $name (see $log)"; tail -20 "$log"; exit 1; }
  kill $mon
  printf "%-28s %7.1f s   peak GPU memory %6s MiB   %s\n" "$name" "$(echo "$(date +%s.%N) - $t0" | bc)" \
    "$(sort -n "$peak" | tail -1)" "$(grep -E 'perplexity|sparsity|pruned weights still zero' "$log" | tail -2 | tr '\n' ' ')"
}

step prune-wanda      $HP prune --model default --method wanda $CAL $GPU --compare-ppl --max-windows 16 --out "$OUT/wanda"
step prune-sparsegpt  $HP prune --model default --method sparsegpt $CAL $GPU --out "$OUT/sparsegpt"
step prune-three-tier $HP prune --model default --pattern three-tier $CAL $GPU --out "$OUT/tt"
step ppl-sparsegpt    $HP ppl "$OUT/sparsegpt" --max-windows 16 $GPU
step ppl-three-tier   $HP ppl "$OUT/tt" --max-windows 16 $GPU
step eval-boolq-squad $HP eval "$OUT/wanda" --tasks boolq,squad --limit 100 --batch-size 32 $GPU --out "$OUT/eval.json"
step lora-20          $HP finetune "$OUT/wanda" --data wikitext2 --method lora --steps 20 --batch-size 8 --seqlen 512 $GPU --out "$OUT/lora"
step full-20          $HP finetune "$OUT/wanda" --data wikitext2 --method full --steps 20 --batch-size 8 --seqlen 512 --lr 2e-5 $GPU --out "$OUT/full"
for m in wanda sparsegpt tt lora full; do $HP inspect "$OUT/$m" > /dev/null && echo "inspect $m: every rule holds"; done

# One three-tier-pruned matrix of a 7B layer (4096 x 11008, bf16) against dense at decode (batch 1) and prefill
# (2048 tokens), with PyTorch's semi-structured 2:4 kernels for the 2:4 tier where this build has them.
$PY - <<'EOF'
import torch
from torch.utils.benchmark import Timer
from hybridprune.pruning.patterns import TieredBlocks
torch.manual_seed(0)
W = torch.randn(11008, 4096, device="cuda", dtype=torch.bfloat16)
pattern = TieredBlocks()
keep, tiers = pattern.keep(W.abs().float())
Wp = W * keep
def t(fn):
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=1).median * 1e6
for name, n in (("decode (batch 1)", 1), ("prefill (2048 tokens)", 2048)):
    x = torch.randn(n, 4096, device="cuda", dtype=torch.bfloat16)
    dense = t(lambda: x @ W.t())
    masked = t(lambda: x @ Wp.t())
    line = f"{name}: dense {dense:.1f} us, three-tier as a dense matrix {masked:.1f} us"
    try:
        from torch.sparse import to_sparse_semi_structured
        from hybridprune.pruning.patterns import expand_tiers
        in_nm = expand_tiers(tiers, *W.shape, 16) == 1   # the 2:4 tier's blocks; zeros elsewhere are valid 2:4
        W24 = to_sparse_semi_structured(torch.where(in_nm, Wp, torch.zeros_like(Wp)))
        rest = torch.where(in_nm, torch.zeros_like(Wp), Wp)  # dense and top-k tiers
        hybrid = t(lambda: torch.mm(W24, x.t()).t() + x @ rest.t())
        line += f", 2:4 tier on semi-structured kernels + rest dense {hybrid:.1f} us"
    except Exception as e:  # not every build / GPU / shape has the kernels: say so plainly
        line += f"; semi-structured 2:4 not available here ({type(e).__name__}: {str(e)[:80]})"
    print(line)
EOF
echo "== packed GPU kernels (Triton) against cuBLAS"
$PY bench/triton_kernels.py
echo "outputs in $OUT"
