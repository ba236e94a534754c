"""The wheel as a user installs it: build it, install it with its dependencies into a fresh venv that already holds
torch and transformers, and check that pip left both alone; then run the core install (no extras) through a prune,
a save, a load and a perplexity. Exits non-zero on any failure.

    python tools/wheel_check.py            (make wheel-check; CI runs it)
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("torch", "transformers")  # what a user's environment already has and pip must not replace

SMOKE = r"""
import json, sys, tempfile
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers
import hybridprune as hp
from hybridprune.evaluation.ppl import perplexity

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate("the of and a to in is was it on".split())}}
tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>")); tk.pre_tokenizer = pre_tokenizers.Whitespace()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="</s>")
pm = hp.prune(hp.PrunedModel(model, tok), hp.PruneConfig(method="magnitude", pattern="2:4"))
out = Path(tempfile.mkdtemp()) / "m"
pm.save(out)
back = hp.load(str(out))
assert back.sparsity == 0.5, back.sparsity
data = Path(tempfile.mkdtemp()) / "wikitext2"; data.mkdir()
(data / "wiki.test.raw").write_text(" = T = \n\n" + "the cat of the dog is on a mat and it was in the sun . " * 60)
res = perplexity(back.model, back.tokenizer, seqlen=32, max_windows=2, data_dir_path=str(data.parent))
print(json.dumps({"sparsity": back.sparsity, "ppl": res["ppl"], "version": hp.__version__}))
"""


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(map(str, cmd)), flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="hybridprune-wheel-") as tmp:
        tmp = Path(tmp)
        run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp / "dist", ROOT)
        wheel = next((tmp / "dist").glob("hybridprune-*.whl"))
        names = subprocess.run([sys.executable, "-m", "zipfile", "-l", wheel], capture_output=True, text=True,
                               check=True).stdout
        for needed in ("hybridprune/py.typed", "hybridprune/sparse/csrc/packed.cpp", "LICENSE"):
            if needed not in names:
                print(f"FAIL: the wheel lacks {needed}")
                return 1
        venv.create(tmp / "venv", with_pip=True)
        py = tmp / "venv" / "bin" / "python"
        pip = [py, "-m", "pip", "install", "-q"]
        run(*pip, "-c", ROOT / "constraints.txt", *KEEP)  # the user's stack, before hybridprune arrives
        before = _versions(py)
        run(*pip, "--dry-run", "--report", tmp / "report.json", wheel)
        report = json.loads((tmp / "report.json").read_text())
        replaced = [i["metadata"]["name"] for i in report["install"] if i["metadata"]["name"].lower() in KEEP]
        if replaced:
            print(f"FAIL: installing the wheel would replace {', '.join(replaced)} ({before})")
            return 1
        run(*pip, wheel)
        after = _versions(py)
        if after != before:
            print(f"FAIL: the install changed {before} into {after}")
            return 1
        smoke = run(py, "-c", SMOKE, capture_output=True, text=True, cwd=tmp)
        print(f"ok: {wheel.name} left {before} alone; the core install (no extras) pruned, saved, loaded and "
              f"measured perplexity: {smoke.stdout.strip().splitlines()[-1]}")
    return 0


def _versions(py) -> dict:
    code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in %r}))" % (KEEP,)
    return json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)


if __name__ == "__main__":
    sys.exit(main())
