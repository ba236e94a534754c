"""Fine-tuning across processes: `accelerate launch` with two CPU processes (gloo), DDP.

Each masked method must keep every pruned weight at zero, lower the loss, and give the weights of a
single-process run with the same global batch (4 = 2 processes x 2). Tolerance: 1e-4 absolute, against weight
moves of more than 1e-3 (measured differences: 1.2e-7 full, 7.4e-6 LoRA, from reduction order).
LoRA dropout is 0 here: each process draws its own dropout masks, which no single process can reproduce.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import safetensors_tensors, tiny_model

from hybridprune.cli import main

STEPS = ["--data", "wikitext2", "--steps", "6", "--seqlen", "32", "--max-examples", "16", "--lora-dropout", "0"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, default_tokenizer):
    from hybridprune import PruneConfig
    from hybridprune.pruning.engine import prune, save_pruned
    model = tiny_model("llama", vocab=len(default_tokenizer), hidden=48, inter=96)
    config = PruneConfig(method="magnitude", sparsity=0.5)
    out = tmp_path_factory.mktemp("dist") / "pruned"
    save_pruned(model, default_tokenizer, out, config, prune(model, config), source="tiny")
    return out


def _launch(*args, processes=2, fsdp=False):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["TQDM_DISABLE"] = "1"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                *(["--use_fsdp"] if fsdp else ["--multi_gpu"])]  # --multi_gpu: torchrun; gloo where no GPU
    return subprocess.run([*launcher, "-m", "hybridprune.cli", "finetune", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def _train_loss(folder, data_dir) -> float:
    from hybridprune import load_model
    from hybridprune.finetuning.finetune import FinetuneConfig, build_dataset
    model, tok = load_model(str(folder))
    rows = build_dataset(FinetuneConfig(data="wikitext2", seqlen=32, max_examples=16, data_dir=str(data_dir)), tok)
    ids = torch.tensor([r["input_ids"] for r in rows])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("method,lr", [("full", "1e-3"), ("lora", "1e-2")])
def test_ddp_two_processes_equal_one_process_and_keep_zeros(pruned, tmp_path, data_dir, method, lr):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["finetune", str(pruned), *STEPS, "--method", method, "--lr", lr, "--batch-size", "4",
                 "--device", "cpu", "--out", str(single)]) == 0
    res = _launch(str(pruned), *STEPS, "--method", method, "--lr", lr, "--batch-size", "2", "--out", str(ddp))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("fine-tuned") == 1  # the main process reports and saves; the other waits

    record = json.loads((ddp / "hybridprune.json").read_text())["finetune"]
    assert record["processes"] == 2 and record["parallel"] == "DDP"
    before, one, two = (safetensors_tensors(f) for f in (pruned, single, ddp))
    matrices = [k for k in before if k.endswith("proj.weight")]
    for k in matrices:
        zero = before[k] == 0
        assert zero.any() and torch.equal(two[k][zero], torch.zeros_like(two[k][zero])), k
    moved = max(float((two[k] - before[k]).abs().max()) for k in matrices)
    apart = max(float((two[k] - one[k]).abs().max()) for k in before)
    assert moved > 1e-3 and apart < 1e-4, (moved, apart)
    assert _train_loss(ddp, data_dir) < _train_loss(pruned, data_dir)


def test_fsdp_is_refused_before_any_work(pruned, tmp_path, monkeypatch, capsys):
    """FSDP shards the weights the mask logic needs whole: refused in one line, nothing written."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    out = tmp_path / "ft"
    for method in ("full", "lora"):
        assert main(["finetune", str(pruned), *STEPS, "--method", method, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "under FSDP is refused" in err[0]
    assert not list(tmp_path.iterdir())


def test_only_the_main_process_writes(pruned, tmp_path, monkeypatch, data_dir):
    """A process that is not rank 0 trains but leaves the output to the main process (no racing renames)."""
    from hybridprune.finetuning.finetune import FinetuneConfig, finetune_and_save
    monkeypatch.setenv("RANK", "1")
    config = FinetuneConfig(data="wikitext2", steps=1, batch_size=2, seqlen=32, max_examples=4, device="cpu")
    res = finetune_and_save(str(pruned), config, tmp_path / "ft")
    assert res["record"]["steps"] == 1 and not (tmp_path / "ft").exists()
