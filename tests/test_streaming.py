"""Layer-streamed pruning (models larger than memory): bit-identical to in-memory pruning, one layer at a time."""
import json

import pytest
import torch
from conftest import safetensors_tensors as _tensors
from conftest import tiny_model

from hybridprune import PruneConfig, load_model
from hybridprune.io.folder import load_tier_maps
from hybridprune.pruning.engine import prune, save_pruned
from hybridprune.pruning.streaming import LayerStream, prune_streamed


@pytest.fixture(scope="module")
def sharded_models(tmp_path_factory, default_tokenizer):
    """Tiny models with the real tokenizer, saved in several shards: a Llama with tied embeddings, an OPT
    and a GPT-2 (whose checkpoints name tensors with and without the base-model prefix)."""
    root = tmp_path_factory.mktemp("sharded")
    out = {}
    for family, kw in (("llama", {}), ("opt", {}), ("gpt2", {})):
        model = tiny_model(family, vocab=len(default_tokenizer), hidden=32, inter=64)
        if family == "llama":
            model.config.tie_word_embeddings = True
            model.tie_weights()
        path = root / family
        model.save_pretrained(path, max_shard_size="200KB")
        default_tokenizer.save_pretrained(path)
        out[family] = path
    return out


CONFIGS = {
    "wanda": dict(method="wanda", pattern="unstructured", sparsity=0.5),
    "sparsegpt": dict(method="sparsegpt", pattern="2:4"),
    "three-tier": dict(method="wanda", pattern="three-tier", block_size=16),
    "three-tier-model-scope": dict(method="sparsegpt", pattern="three-tier", block_size=16, scope="model"),
}


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_streamed_equals_in_memory_bit_for_bit(sharded_models, tmp_path, data_dir, family, name):
    if family != "llama" and name.startswith("three-tier"):
        pytest.skip("three-tier on Llama only (block sizes)")
    src = sharded_models[family]
    config = PruneConfig(**CONFIGS[name], nsamples=4, seqlen=32, device="cpu")
    model, tok = load_model(str(src))
    result = prune(model, config, tokenizer=tok)
    save_pruned(model, tok, tmp_path / "memory", config, result, source=str(src))
    streamed, out = prune_streamed(str(src), config, tmp_path / "streamed")

    a, b = _tensors(tmp_path / "memory"), _tensors(out)
    for key, t in a.items():
        assert torch.equal(t, b[key]), key
    assert set(b) >= set(a)  # the streamed folder keeps the source's names (a tied head stays tied, unsaved)
    tiers_a, tiers_b = load_tier_maps(tmp_path / "memory"), load_tier_maps(out)
    assert tiers_a.keys() == tiers_b.keys() and all(torch.equal(tiers_a[k], tiers_b[k]) for k in tiers_a)
    rec_a = json.loads((tmp_path / "memory" / "sparsity.json").read_text())
    rec_b = json.loads((out / "sparsity.json").read_text())
    assert rec_a == rec_b and rec_b["overall"] > 0.3
    assert json.loads((out / "hybridprune.json").read_text())["loading"] == "streamed"
    # the output is an ordinary model folder: from_pretrained gives the same model
    again, _ = load_model(str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_one_decoder_layer_in_memory_at_a_time(sharded_models, tmp_path, data_dir, monkeypatch):
    """Whenever a layer is read, every other layer (and the embeddings, after capture) is on the meta device."""
    seen = []
    plain = LayerStream.load_layer

    def spy(self, i, layer, device):
        materialised = [j for j, other in enumerate(self.layers)
                        if any(p.device.type != "meta" for p in other.parameters())]
        outside = [n for n, p in self.model.named_parameters()
                   if not n.startswith(self.prefix + ".") and p.device.type != "meta"]
        seen.append((i, materialised, outside))
        return plain(self, i, layer, device)
    monkeypatch.setattr(LayerStream, "load_layer", spy)
    prune_streamed(str(sharded_models["llama"]), PruneConfig(nsamples=2, seqlen=16, device="cpu"), tmp_path / "o")
    assert [s[0] for s in seen] == [0, 1]
    assert all(s[1] == [] and s[2] == [] for s in seen), seen


def test_cli_streams_a_safetensors_folder_by_default(sharded_models, tmp_path, data_dir, capsys):
    from hybridprune.cli import main
    src = str(sharded_models["llama"])
    common = ["--model", src, "--nsamples", "2", "--seqlen", "16", "--device", "cpu"]
    assert main(["prune", *common, "--out", str(tmp_path / "auto")]) == 0
    assert "layer-streamed" in capsys.readouterr().out
    assert main(["prune", *common, "--out", str(tmp_path / "off"), "--stream", "off"]) == 0
    records = [json.loads((tmp_path / d / "hybridprune.json").read_text()) for d in ("auto", "off")]
    assert [r["loading"] for r in records] == ["streamed", "in memory"]
    a, b = _tensors(tmp_path / "auto"), _tensors(tmp_path / "off")
    assert all(torch.equal(t, a[k]) for k, t in b.items())


@pytest.mark.parametrize("args,words", [
    (["--stream", "on", "--compare-ppl"], "--compare-ppl needs the whole model"),
    (["--stream", "sometimes"], "unknown --stream"),
])
def test_cli_stream_refusals(sharded_models, tmp_path, capsys, args, words):
    from hybridprune.cli import main
    out = tmp_path / "o"
    assert main(["prune", "--model", str(sharded_models["llama"]), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and not out.exists()


def test_stream_on_needs_a_local_safetensors_folder(sharded_models, tmp_path, capsys):
    import shutil

    from hybridprune.cli import main
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(sharded_models["llama"] / "config.json", bare / "config.json")  # a config, no safetensors
    assert main(["prune", "--model", str(bare), "--out", str(tmp_path / "o"), "--stream", "on"]) == 2
    assert "needs a local folder of safetensors" in capsys.readouterr().err


def test_ppl_and_eval_through_device_map_offloading(sharded_models, tmp_path, data_dir, capsys):
    """A streamed output evaluates with accelerate placing its layers, most of them on disk past --max-memory."""
    from hybridprune.cli import main
    out = tmp_path / "pruned"
    _, out = prune_streamed(str(sharded_models["llama"]), PruneConfig(nsamples=2, seqlen=16, device="cpu"), out)
    plain = ["--seqlen", "64", "--max-windows", "2"]
    assert main(["ppl", str(out), *plain, "--out", str(tmp_path / "a.json")]) == 0
    offload = ["--device-map", "auto", "--max-memory", "cpu=60KB", "--offload-folder", str(tmp_path / "off")]
    assert main(["ppl", str(out), *plain, *offload, "--out", str(tmp_path / "b.json")]) == 0
    placed, _ = load_model(str(out), device_map="auto", max_memory={"cpu": "60KB"}, offload_folder=tmp_path / "off")
    assert "disk" in set(placed.hf_device_map.values())  # the same settings really put layers on disk
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert b["ppl"] == pytest.approx(a["ppl"], rel=1e-5)
    assert main(["eval", str(out), "--tasks", "boolq", "--limit", "2", *offload, "--out",
                 str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["tasks"]["boolq"]["n"] == 2
