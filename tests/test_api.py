"""The Python API (hybridprune.api): one verb per step on an in-memory PrunedModel; `save` writes the CLI's folder."""
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_model, tiny_tokenizer
from safetensors.torch import load_file

import hybridprune as hp
from hybridprune.cli import main


def _tiny(family="llama") -> hp.PrunedModel:
    return hp.PrunedModel(tiny_model(family), tiny_tokenizer(False), source="tiny")


def _same_folder(a: Path, b: Path):
    """Two saved folders hold the same files, the same tensors bit for bit, and the same record but its times."""
    names = sorted(f.name for f in a.iterdir())
    assert names == sorted(f.name for f in b.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            ta, tb = load_file(str(a / name)), load_file(str(b / name))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    ra, rb = (json.loads((f / "hybridprune.json").read_text()) for f in (a, b))
    for r in (ra, rb):
        r.pop("saved"), r.pop("prune_seconds", None), r.get("finetune", {}).pop("train_seconds", None)
    assert ra == rb


def test_prune_is_in_memory_and_records_what_it_did():
    pm = _tiny()
    out = hp.prune(pm, hp.PruneConfig(method="magnitude", pattern="three-tier"))
    assert out.model is pm.model  # pruned in place, nothing written
    assert out.record["prune"]["method"] == "magnitude" and out.tier_maps
    assert out.sparsity == pytest.approx(hp.PruneConfig(pattern="three-tier").build_pattern().expected_sparsity,
                                         abs=0.02)
    again = hp.prune(_tiny(), method="magnitude", pattern="2:4")  # options as keywords build the config
    assert again.record["prune"]["pattern_detail"]["pattern"] == "2:4" and again.sparsity == 0.5


@pytest.mark.kernels
def test_save_and_load_round_trip_dense_and_packed(tmp_path):
    pm = hp.prune(_tiny(), hp.PruneConfig(method="magnitude", pattern="three-tier"))
    dense = pm.save(tmp_path / "dense")
    packed = hp.save(pm, tmp_path / "packed", packed=True)
    assert (dense / "tiers.safetensors").is_file() and (packed / "packed.safetensors").is_file()
    back = hp.load(str(dense))
    assert back.record["prune"] == json.loads(json.dumps(pm.record["prune"], default=str)) and back.tier_maps.keys() == pm.tier_maps.keys()
    fast = hp.load(str(packed), kernels=True)
    assert sum(isinstance(m, hp.PackedLinear) for m in fast.model.modules()) == 14
    ids = torch.randint(0, 20, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fast.model(ids).logits, pm.model(ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(hp.HybridPruneError, match="exists"):
        pm.save(tmp_path / "dense")


@pytest.mark.kernels
def test_use_kernels_packs_in_memory():
    pm = hp.prune(_tiny(), method="magnitude", pattern="unstructured", sparsity=0.6)
    ids = torch.randint(0, 20, (1, 7))
    with torch.no_grad():
        want = pm.model(ids).logits
        hp.use_kernels(pm)
        got = pm.model(ids).logits
    assert any(isinstance(m, hp.PackedLinear) for m in pm.model.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bad_calls_name_the_parameter(tmp_path):
    pm = _tiny()
    with pytest.raises(hp.HybridPruneError, match="config must be a PruneConfig"):
        hp.prune(pm, hp.FinetuneConfig())
    with pytest.raises(hp.HybridPruneError, match="^sparsegpt_block must be"):
        hp.prune(pm, sparsegpt_block=0)
    with pytest.raises(hp.HybridPruneError, match="only a pruned model can be saved packed"):
        hp.save(pm, tmp_path / "x", packed=True)
    with pytest.raises(hp.HybridPruneError, match="must be a PrunedModel"):
        hp.evaluate(object())


def test_api_folder_equals_the_cli_folder(tmp_path, tiny_llama_dir, data_dir):
    """`hp.prune` then `save` writes what `hybridprune prune` writes: the same files, tensors and record."""
    opts = ["--method", "wanda", "--pattern", "three-tier", "--nsamples", "4", "--seqlen", "32", "--seed", "3"]
    assert main(["prune", "--model", str(tiny_llama_dir), *opts, "--out", str(tmp_path / "cli"),
                 "--stream", "off"]) == 0
    config = hp.PruneConfig(method="wanda", pattern="three-tier", nsamples=4, seqlen=32, seed=3)
    hp.prune(hp.load(str(tiny_llama_dir)), config).save(tmp_path / "api")
    _same_folder(tmp_path / "cli", tmp_path / "api")
    assert main(["prune", "--model", str(tiny_llama_dir), *opts, "--out", str(tmp_path / "cli-packed"),
                 "--stream", "off", "--save", "packed"]) == 0
    hp.prune(hp.load(str(tiny_llama_dir)), config).save(tmp_path / "api-packed", packed=True)
    _same_folder(tmp_path / "cli-packed", tmp_path / "api-packed")


def test_finetune_in_memory_keeps_zeros_and_saves_the_cli_folder(tmp_path, tiny_llama_dir, data_dir):
    pruned = hp.prune(hp.load(str(tiny_llama_dir)), method="magnitude", pattern="2:4")
    pruned.save(tmp_path / "pruned")
    zeros = {n: (p == 0) for n, p in pruned.model.named_parameters() if "proj" in n}
    ft = hp.FinetuneConfig(data="wikitext2", steps=2, batch_size=2, seqlen=32, max_examples=8, lr=1e-2, logging_steps=1)
    tuned = hp.finetune(pruned, ft)
    assert tuned.record["finetune"]["zeros_preserved"] > 0 and tuned.losses
    for n, p in tuned.model.named_parameters():
        if n in zeros:
            assert (p[zeros[n]] == 0).all(), n
    tuned.save(tmp_path / "api")
    assert main(["finetune", str(tmp_path / "pruned"), "--data", "wikitext2", "--steps", "2", "--batch-size", "2",
                 "--seqlen", "32", "--max-examples", "8", "--lr", "1e-2", "--logging-steps", "1", "--out", str(tmp_path / "cli")]) == 0
    names = sorted(f.name for f in (tmp_path / "cli").iterdir())
    assert names == sorted(f.name for f in (tmp_path / "api").iterdir()) and "loss.png" in names
    ra, rb = (json.loads((tmp_path / d / "hybridprune.json").read_text()) for d in ("api", "cli"))
    assert ra["prune"] == rb["prune"] and ra["finetune"]["steps"] == rb["finetune"]["steps"] == 2


def _quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md has no <!-- quickstart --> python block"
    return m.group(1)


def test_readme_quickstart_is_short():
    assert len(_quickstart().strip().splitlines()) <= 10


def test_readme_quickstart_runs(tmp_path, monkeypatch, default_model_dir, data_dir):
    """The README's Python quickstart, exactly as written, on the default model."""
    monkeypatch.chdir(tmp_path)
    exec(compile(_quickstart(), "README.md quickstart", "exec"), {})
    assert (tmp_path / "out").is_dir()
