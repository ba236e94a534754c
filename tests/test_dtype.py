"""bf16 end to end on CPU (issue: scale, part 1): exact sparsity and zero sets in half precision, statistics
accumulated in fp32, the loaded dtype reaching training and the saved files."""
import json

import pytest
import torch
from conftest import safetensors_tensors, tiny_model

from hybridprune import PruneConfig
from hybridprune.cli import main
from hybridprune.io.models import prunable_matrices, weight_matrix
from hybridprune.pruning.engine import prune


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"),
                                            ("wanda", "three-tier")])
def test_bf16_pruning_is_exact_and_stays_bf16(method, pattern, samples, monkeypatch):
    from hybridprune.pruning import scoring
    seen = []
    real_add = scoring.InputStats.add

    def spy(self, x):  # statistics are accumulated in fp32 whatever the model dtype
        seen.append((x.dtype, self.sq.dtype, None if self.H is None else self.H.dtype))
        real_add(self, x)
    monkeypatch.setattr(scoring.InputStats, "add", spy)
    model = tiny_model("llama").to(torch.bfloat16)
    prune(model, PruneConfig(method=method, pattern=pattern, nsamples=6, seqlen=24, batch_size=2, device="cpu"),
          samples=samples)
    assert seen and all(x == torch.bfloat16 and sq == torch.float32 and h in (None, torch.float32)
                        for x, sq, h in seen)
    for name, mod in prunable_matrices(model).items():
        W = weight_matrix(mod)
        assert W.dtype == torch.bfloat16, name
        if pattern == "unstructured":
            assert ((W == 0).sum(1) == W.shape[1] // 2).all(), name
        elif pattern == "2:4":
            assert ((W != 0).reshape(W.shape[0], -1, 4).sum(-1) <= 2).all(), name


@pytest.mark.parametrize("ft", ["lora", "full"])
def test_bf16_fine_tuning_keeps_the_zero_set_and_dtype(ft, tmp_path, tiny_llama_dir, data_dir):
    pruned, out = tmp_path / "p", tmp_path / "ft"
    assert main(["prune", "--model", str(tiny_llama_dir), "--nsamples", "2", "--seqlen", "16", "--dtype", "bfloat16",
                 "--out", str(pruned)]) == 0
    before = safetensors_tensors(pruned)
    assert before["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16  # saved as loaded
    assert main(["finetune", str(pruned), "--data", "wikitext2", "--method", ft, "--steps", "2", "--batch-size", "2",
                 "--seqlen", "32", "--max-examples", "4", "--lr", "1e-2", "--dtype", "bfloat16", "--device", "cpu",
                 "--out", str(out)]) == 0
    after = safetensors_tensors(out)
    rec = json.loads((out / "hybridprune.json").read_text())["finetune"]
    assert rec["dtype"] == "torch.bfloat16" and rec["device"] == "cpu"
    moved = 0
    for k, w in before.items():
        if ".layers." in k and k.endswith("proj.weight"):
            # every pruned weight is still zero (a kept one may land on 0.0 in bf16: that is no regrowth)
            assert after[k].dtype == torch.bfloat16 and not ((after[k] != 0) & (w == 0)).any(), k
            moved += int(not torch.equal(after[k], w))
    assert moved > 0


def test_experiment_takes_dtype_and_device(monkeypatch, tmp_path):
    from hybridprune.experiments import experiment
    seen = {}

    def fake(recipe, out, quick=False, only=None, device=None, dtype=None, kernels=False, isolate=None, log=print):
        seen.update(device=device, dtype=dtype, isolate=isolate)
        return {}
    monkeypatch.setattr(experiment, "run_experiment", fake)
    assert main(["experiment", "r.yaml", "--out", str(tmp_path / "o"), "--device", "cpu", "--dtype", "bfloat16"]) == 0
    assert seen == {"device": "cpu", "dtype": "bfloat16", "isolate": None}  # None: processes where the OS can
    assert main(["experiment", "r.yaml", "--out", str(tmp_path / "o"), "--in-process"]) == 0
    assert seen["isolate"] is False
