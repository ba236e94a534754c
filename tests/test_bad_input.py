"""Bad input is refused before any work: exit 2, one line on stderr, no traceback, nothing written."""
import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import edit_tensor, tiny_model
from safetensors.torch import load_file

from hybridprune.cli import main
from hybridprune.core.errors import HybridPruneError
from hybridprune.pruning.patterns import pattern_of


def _refused(argv, capsys, match, tmp_path=None, usage_error=False):
    """Run the CLI; assert exit 2 with one stderr line containing `match` (argparse: its usage, then the error),
    no traceback, and nothing new in tmp_path."""
    before = set(os.listdir(tmp_path)) if tmp_path else None
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2, code
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    if usage_error:
        assert match in err[-1], err
    else:  # progress bars of the libraries may come before it; the error itself is one line, the last
        errors = [line for line in err if line.startswith("hybridprune: error:")]
        assert len(errors) == 1 and errors[0] == err[-1] and match in errors[0], err
    if tmp_path is not None:
        assert set(os.listdir(tmp_path)) == before, "something was written"


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model would be loaded: these options must be refused before that."""
    def boom(*a, **kw):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr("hybridprune.io.models.load_dense", boom)


@pytest.mark.parametrize("extra,match", [
    (["--percdamp", "-1"], "--percdamp"),
    (["--percdamp", "nan"], "--percdamp"),
    (["--nsamples", "0"], "--nsamples"),
    (["--calib", "bogus"], "unknown calibration source"),
    (["--calib", "self:nosuch"], "unknown source in 'self:nosuch'; self:SOURCE continues text of one of"),
    (["--calib", "mixed:wikitext2=0.5,self:nosuch=0.5"], "unknown source in 'self:nosuch'"),
    (["--calib", "self:wikitext2", "--self-filter", "1"], "--self-filter is the share of generations dropped"),
    (["--calib", "self:wikitext2", "--self-filter", "-0.1"], "it must be in [0, 1), got -0.1"),
    (["--calib", "self:wikitext2", "--self-filter", "nan"], "--self-filter"),
    (["--calib-select", "diversity", "--calib-pool", "8", "--nsamples", "16"],
     "--calib-pool 8 is smaller than --nsamples 16"),
    (["--calib-pool", "64"], "add --calib-select diversity"),
    (["--calib-select", "diversity", "--calib", "self"], "not from generated text"),
    (["--calib", "self:c4", "--seqlen", "16", "--self-prefix", "16"], "leaves nothing to generate"),
    (["--device", "cuda"], "no CUDA device"),
    (["--tiers", "nan,0.5,0.5", "--pattern", "three-tier"], "finite"),
    (["--method", "sparsegpt", "--sparsegpt-block", "-16"], "--sparsegpt-block"),
    (["--method", "sparsegpt", "--sparsegpt-block", "0"], "--sparsegpt-block"),
    (["--method", "sparsegpt", "--pattern", "2:4", "--sparsegpt-block", "6"], "multiple of M=4"),
    (["--bos", "sometimes"], "--bos"),
    (["--method", "magnitude", "--pattern", "three-tier", "--tier-metric", "wanda"], "needs calibration"),
    (["--channel-permutation", "lsa"], "needs an N:M --pattern"),
    (["--pattern", "2:4", "--channel-permutation", "yes"], "unknown --channel-permutation"),
])
def test_prune_options_refused_before_loading(extra, match, tmp_path, capsys, no_load):
    _refused(["prune", "--model", "m", "--out", str(tmp_path / "o"), *extra], capsys, match, tmp_path)


@pytest.mark.parametrize("flag", ["--blocksize", "--block"])
def test_old_and_abbreviated_block_flags_are_not_accepted(flag, tmp_path, capsys, no_load):
    """--blocksize (SparseGPT) and --block-size (tiers) were one hyphen apart; neither guess is made now."""
    _refused(["prune", "--pattern", "three-tier", flag, "7", "--out", str(tmp_path / "o")], capsys,
             "unrecognized arguments", tmp_path, usage_error=True)


def test_seqlen_beyond_the_context_is_refused_before_loading(tiny_llama_dir, tmp_path, capsys, no_load):
    _refused(["prune", "--model", str(tiny_llama_dir), "--seqlen", "100000", "--out", str(tmp_path / "o")], capsys,
             "exceeds the model's context of 2048 tokens", tmp_path)
    _refused(["ppl", str(tiny_llama_dir), "--seqlen", "4096"], capsys, "context of 2048", tmp_path)


@pytest.mark.parametrize("cmd", ["ppl", "eval"])
def test_cuda_without_cuda_is_refused(cmd, tiny_llama_dir, capsys, no_load, tmp_path):
    _refused([cmd, str(tiny_llama_dir), "--device", "cuda"], capsys, "no CUDA device", tmp_path)


def _nan_model(tmp_path, tiny_llama_dir):
    folder = tmp_path / "nan-model"
    model = tiny_model("llama", vocab=49152, hidden=48, inter=96)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[3] = float("nan")
    model.save_pretrained(folder)
    for f in tiny_llama_dir.iterdir():
        if "token" in f.name:
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.mark.parametrize("method,stream", [("wanda", "on"), ("sparsegpt", "on"), ("wanda", "off")])
def test_non_finite_weights_are_refused(method, stream, tmp_path, tiny_llama_dir, capsys):
    """Before any calibration data is read, layer-streamed or in memory."""
    folder = _nan_model(tmp_path, tiny_llama_dir)
    (tmp_path / "empty").mkdir()  # a data folder without files: reading calibration text would fail first
    _refused(["prune", "--model", str(folder), "--method", method, "--nsamples", "2", "--seqlen", "16",
              "--stream", stream, "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
             capsys, "model.layers.0.self_attn.q_proj holds 48 non-finite", tmp_path)


def test_non_finite_activations_name_the_layer(samples):
    from hybridprune import PruneConfig
    from hybridprune.pruning.engine import prune
    model = tiny_model("llama")
    # what an overflow in a low-precision dtype looks like: layer 0's MLP output becomes infinite
    model.model.layers[0].mlp.register_forward_hook(lambda m, a, out: out * float("inf"))
    with pytest.raises(HybridPruneError, match="non-finite at the output of decoder layer model.layers.0"):
        prune(model, PruneConfig(nsamples=6, seqlen=24, device="cpu"), samples=samples)


def test_truncated_safetensors_is_one_line(tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "cut"
    folder.mkdir()
    for f in tiny_llama_dir.iterdir():
        data = f.read_bytes()
        (folder / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    _refused(["ppl", str(folder)], capsys, f"could not load model '{folder}'", tmp_path)


def test_offline_hub_id_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("hybridprune.io.data.hub_offline_reason", lambda timeout=3.0: "huggingface.co is not reachable")
    _refused(["ppl", "some-org/some-model"], capsys, "huggingface.co is not reachable", tmp_path)


def test_hub_errors_other_than_io_are_not_swallowed(monkeypatch):
    """data.py turns network / missing-dataset errors (OSError) into one line, but lets real bugs through."""
    import datasets

    from hybridprune.io import data
    monkeypatch.setattr(data, "hub_offline_reason", lambda timeout=3.0: None)

    def broken(*a, **kw):
        raise KeyError("a bug, not a network problem")
    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(KeyError):
        data.gsm8k_examples("train", None)

    def offline(*a, **kw):
        raise ConnectionError("no route")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HybridPruneError, match="could not load openai/gsm8k"):
        data.gsm8k_examples("train", None)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from hybridprune.io.data import gsm8k_examples
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "train.jsonl").write_text('{"question": "a", "answer": "#### 1"}\n{"question": oops\n')
    with pytest.raises(HybridPruneError, match=r"gsm8k/train.jsonl line 2 is not valid JSON"):
        gsm8k_examples("train", tmp_path)


def test_bad_schedule_value(tmp_path, tiny_llama_dir, capsys):
    sched = tmp_path / "s.yaml"
    sched.write_text("rounds:\n  - [abc, 0.45, 0.20]\n")
    _refused(["progressive", "--model", str(tiny_llama_dir), "--schedule", str(sched), "--out",
              str(tmp_path / "o")], capsys, "bad tier ratios", tmp_path)


def test_progressive_refuses_no_merge(tmp_path, tiny_llama_dir, capsys, no_load):
    sched = tmp_path / "s.yaml"
    sched.write_text("rounds:\n  - [0.6, 0.4, 0.0]\n")
    _refused(["progressive", "--model", "m", "--schedule", str(sched), "--out", str(tmp_path / "o"),
              "--finetune-between", "wikitext2", "--no-merge"], capsys, "--no-merge cannot be used", tmp_path)


def test_progressive_resume_refuses_changed_settings(tmp_path, tiny_llama_dir, data_dir, capsys, monkeypatch):
    sched = tmp_path / "s.yaml"
    sched.write_text("rounds:\n  - [0.6, 0.4, 0.0]\n  - [0.35, 0.45, 0.20]\n")
    out = tmp_path / "prog"
    common = ["progressive", "--model", str(tiny_llama_dir), "--schedule", str(sched), "--nsamples", "2",
              "--seqlen", "16", "--out", str(out)]
    import hybridprune.pruning.progressive as prog
    real, calls = prog.prune, []

    def die_in_second_round(*a, **kw):  # the run stops after round 1 was saved
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(prog, "prune", die_in_second_round)
    assert main(common) == 130
    monkeypatch.setattr(prog, "prune", real)
    capsys.readouterr()
    _refused([*common, "--resume", "--sparsity", "0.5", "--topk", "8"], capsys, "the prune differ", None)
    sched.write_text("rounds:\n  - [0.5, 0.5, 0.0]\n  - [0.35, 0.45, 0.20]\n")
    _refused([*common, "--resume"], capsys, "the schedule differ", None)
    sched.write_text("rounds:\n  - [0.6, 0.4, 0.0]\n  - [0.35, 0.45, 0.20]\n")
    assert main([*common, "--resume"]) == 0 and "resuming after round 1" in capsys.readouterr().out


@pytest.mark.parametrize("extra,match", [
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--lora-dropout", "1.5"], "--lora-dropout"),
    (["--max-examples", "0"], "--max-examples"),
    (["--device", "cuda"], "no CUDA device"),
])
def test_finetune_options_refused_before_loading(extra, match, tmp_path, capsys, no_load):
    _refused(["finetune", "m", "--data", "wikitext2", "--out", str(tmp_path / "o"), *extra], capsys, match, tmp_path)


def test_compare_refuses_results_with_other_settings(tmp_path, capsys):
    base = {"model": "a", "limit": 5, "tasks": {"gsm8k": {"exact_match[strict-match]": 0.1, "n": 5,
                                                          "num_fewshot": 5, "fewshot_seed": 1234, "split": "test"}}}
    other = json.loads(json.dumps(base))
    other["model"], other["tasks"]["gsm8k"]["fewshot_seed"] = "b", 0
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps(other))
    _refused(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--tasks", "gsm8k", "--limit", "5",
              "--out", str(tmp_path / "cmp")], capsys, "gsm8k fewshot_seed differs", tmp_path)
    other["tasks"]["gsm8k"]["fewshot_seed"] = 1234
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--tasks", "gsm8k", "--limit", "5",
                 "--out", str(tmp_path / "cmp")]) == 0
    assert sorted(os.listdir(tmp_path / "cmp")) == ["compare.json", "compare.md", "compare.png"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".cmp")]  # written through a temporary, renamed


def test_eval_creates_the_parent_of_out_before_the_run(tiny_llama_dir, tmp_path, monkeypatch, data_dir):
    seen = {}
    import hybridprune.cli as cli
    real = cli._eval_one

    def spy(args, spec):
        seen["parent_exists"] = (tmp_path / "new" / "dir").is_dir()
        return real(args, spec)
    monkeypatch.setattr(cli, "_eval_one", spy)
    out = tmp_path / "new" / "dir" / "r.json"
    assert main(["eval", str(tiny_llama_dir), "--tasks", "wikitext2", "--ppl-seqlen", "32", "--ppl-windows", "1",
                 "--out", str(out), "--log-samples"]) == 0
    assert seen["parent_exists"] and json.loads(out.read_text())["tasks"]["wikitext2"]["n"] == 1
    ppl_out = tmp_path / "other" / "p.json"
    assert main(["ppl", str(tiny_llama_dir), "--seqlen", "32", "--max-windows", "1", "--out", str(ppl_out)]) == 0
    assert json.loads(ppl_out.read_text())["windows"] == 1


def test_inspect_fails_on_a_broken_block(tmp_path, tiny_llama_dir, data_dir, capsys):  # prunes: WikiText-2
    out = tmp_path / "tt"
    assert main(["prune", "--model", str(tiny_llama_dir), "--pattern", "three-tier", "--nsamples", "2",
                 "--seqlen", "16", "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    tiers = load_file(str(out / "tiers.safetensors"))
    name = "model.layers.1.mlp.up_proj"
    r, c = (tiers[name] == 1).nonzero()[0].tolist()  # an N:M block
    edit_tensor(out, name + ".weight", lambda w: w[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].fill_(1.0))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"{name}: 1 block(s) break their tier's rule, e.g. block (row,col) ({r},{c})" in captured.err
    assert "tier rules hold: NO" in captured.out and captured.err.count("hybridprune: error:") == 1


def test_inspect_fails_when_sparsity_is_short(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "u"
    assert main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--out", str(out)]) == 0
    edit_tensor(out, "model.layers.0.mlp.down_proj.weight", lambda w: w[0, :].fill_(1.0))  # one row regrown
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 2
    assert "model.layers.0.mlp.down_proj: sparsity" in capsys.readouterr().err


def test_stale_temporaries_are_removed_and_folders_get_normal_permissions(tmp_path, tiny_llama_dir):
    stale = tmp_path / ".o.tmp-999999999-abc"  # left by a killed run (no such process)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".o.tmp-{os.getpid()}-xyz"  # a save in progress in a running process: kept
    live.mkdir()
    assert main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--out", str(tmp_path / "o")]) == 0
    assert not stale.exists() and live.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "o").stat().st_mode & 0o777 == 0o777 & ~umask


def test_magnitude_three_tier_model_scope_works(samples):
    from hybridprune import PruneConfig
    from hybridprune.io.models import prunable_matrices
    from hybridprune.pruning.engine import prune
    model = tiny_model("llama")
    res = prune(model, PruneConfig(method="magnitude", pattern="three-tier", scope="model", device="cpu"))
    assert res.tier_maps and len(res.tier_maps) == len(prunable_matrices(model))


class _ToyMoE(torch.nn.Module):
    """Two decoder layers, each with two expert matrices; the router sends every token to expert 0, so expert 1
    never sees a calibration token (what happens to rarely routed experts of real MoE models)."""

    class Layer(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.experts = torch.nn.ModuleList([torch.nn.Linear(d, d, bias=False) for _ in range(2)])
            self.out = torch.nn.Linear(d, d, bias=False)

        def forward(self, x, **kw):
            return (self.out(torch.relu(self.experts[0](x))) + x,)

    def __init__(self, vocab=256, d=32):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.layers = torch.nn.ModuleList([self.Layer(d) for _ in range(2)])

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, **kw):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)[0]
        return x


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_experts_without_calibration_tokens_are_reported(method, samples):
    from hybridprune import PruneConfig
    from hybridprune.pruning.engine import prune
    torch.manual_seed(0)
    model = _ToyMoE()
    W0 = model.layers[0].experts[1].weight.detach().clone()
    config = PruneConfig(method=method, nsamples=6, seqlen=24, device="cpu")
    with pytest.warns(UserWarning, match=r"1 matrices of layer 0 received no calibration tokens \(experts.1\)"):
        res = prune(model, config, samples=samples)
    assert res.uncalibrated == ["layers.0.experts.1", "layers.1.experts.1"]
    keep = pattern_of(config).keep(W0.abs())[0]  # magnitude in the method's comparison group
    assert torch.equal(model.layers[0].experts[1].weight, W0 * keep)  # and no reconstruction moved a weight


def test_output_cut_short_by_its_reader_is_not_a_traceback(tmp_path):
    """`hybridprune inspect out | head`: when the reader closes the pipe, the CLI stops quietly (no traceback),
    with a non-zero status."""
    import subprocess
    import sys
    code = ("import sys\nfrom hybridprune import cli\n"
            "def long_report(args):\n    for i in range(200000): print('line', i)\n"
            "cli.cmd_inspect = long_report\nsys.exit(cli.main(['inspect', sys.argv[1]]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "line 0\n"
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1
    assert "Traceback" not in err and "Exception ignored" not in err, err


def _schedule(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,match", [
    ("rounds: [[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]]", "round 2 [0.6, 0.2, 0.2] moves blocks up the tiers"),
    ("rounds: [[0.5, 0.3, 0.2], [0.5, 0.4, 0.1]]", "round 2 [0.5, 0.4, 0.1] moves blocks up"),
    ("rounds: 5", "`rounds:` must be a list of [dense, nm, topk] triples"),
    ("rounds: [5]", "`rounds:` must be a list of [dense, nm, topk] triples"),
])
def test_progressive_schedules_refused_up_front(text, match, tmp_path, tiny_llama_dir, capsys, no_load):
    path = _schedule(tmp_path, text)
    _refused(["progressive", "--model", str(tiny_llama_dir), "--schedule", str(path), "--refit", "0",
              "--out", str(tmp_path / "o")], capsys, match, tmp_path)


@pytest.mark.parametrize("cmd", [["ppl", "M"], ["prune", "--model", "M", "--out", "OUT"], ["eval", "M"]])
def test_unknown_device_refused_before_loading(cmd, tmp_path, tiny_llama_dir, capsys, no_load):
    argv = [str(tiny_llama_dir) if a == "M" else str(tmp_path / "o") if a == "OUT" else a for a in cmd]
    _refused([*argv, "--device", "gpu"], capsys, "unknown --device 'gpu'; use cpu, cuda or cuda:N", tmp_path)


@pytest.mark.parametrize("calib,match", [("mixed:wikitext2=nan", "bad mixture item 'wikitext2=nan'"),
                                         ("mixed:wikitext2=inf,squad=0", "bad mixture item 'wikitext2=inf'")])
def test_non_finite_mixture_weights(calib, match, tmp_path, capsys, no_load):
    _refused(["prune", "--model", "m", "--calib", calib, "--out", str(tmp_path / "o")], capsys, match, tmp_path)


def test_magnitude_still_checks_the_calibration_name(tmp_path, capsys, no_load):
    _refused(["prune", "--model", "m", "--method", "magnitude", "--calib", "nosuch", "--out", str(tmp_path / "o")],
             capsys, "unknown calibration source 'nosuch'", tmp_path)


def test_out_naming_the_current_folder(tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in (".", "..", str(tmp_path)):
        _refused(["prune", "--model", "m", "--overwrite", "--out", out], capsys, "is the current folder", tmp_path)


def test_experiment_out_naming_a_file(tmp_path, capsys):
    recipe = Path(__file__).parents[1] / "recipes" / "calibration-study.yaml"
    (tmp_path / "f").write_text("x")
    _refused(["experiment", str(recipe), "--out", str(tmp_path / "f")], capsys, "is a file; give a folder", tmp_path)


def test_recipe_with_a_missing_model_writes_nothing(tmp_path, capsys):
    text = (Path(__file__).parents[1] / "recipes" / "calibration-study.yaml").read_text()
    (tmp_path / "r.yaml").write_text(text.replace("model: default", "model: ./no/such/model"))
    _refused(["experiment", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")], capsys,
             "model not found: ./no/such/model", tmp_path)


def test_ppl_refusals_come_before_loading_and_name_the_flag(tmp_path, tiny_llama_dir, capsys, no_load):
    _refused(["ppl", str(tiny_llama_dir), "--max-windows", "0"], capsys, "--max-windows must be >= 1", tmp_path)
    _refused(["eval", str(tiny_llama_dir), "--tasks", "wikitext2", "--ppl-windows", "0"], capsys,
             "--ppl-windows must be a whole number >= 1", tmp_path)
    _refused(["eval", str(tiny_llama_dir), "--limit", "4", "--sample", "8"], capsys, "exclude each other", tmp_path)
    _refused(["ppl", str(tmp_path / "missing"), "--out", str(tmp_path / "new" / "dir" / "ppl.json")], capsys,
             "model not found", tmp_path)  # and new/dir was not created


def test_compare_needs_two(tmp_path, capsys, no_load):
    (tmp_path / "one.json").write_text(json.dumps({"model": "m", "tasks": {}}))
    _refused(["compare", str(tmp_path / "one.json")], capsys, "compare needs two or more", tmp_path)


def test_inspect_plot_naming_a_file(tmp_path, tiny_llama_dir, capsys):
    (tmp_path / "p.png").write_text("x")
    _refused(["inspect", str(tiny_llama_dir), "--plot", str(tmp_path / "p.png")], capsys, "is a file", tmp_path)


def test_skip_pattern_matching_nothing(tmp_path, tiny_llama_dir, data_dir, capsys):
    _refused(["prune", "--model", str(tiny_llama_dir), "--skip", "down_prj", "--nsamples", "2", "--seqlen", "16",
              "--out", str(tmp_path / "o")], capsys, "--skip 'down_prj' matches no prunable matrix; closest names: "
              "down_proj", tmp_path)


def test_calibration_memory_estimated_before_loading(tmp_path, tiny_llama_dir, capsys, no_load, monkeypatch):
    monkeypatch.setattr("hybridprune.io.models.available_memory", lambda: 2**30)
    _refused(["prune", "--model", str(tiny_llama_dir), "--nsamples", "100000", "--seqlen", "2048",
              "--out", str(tmp_path / "o")], capsys, "GiB of layer activations (hidden size 48)", tmp_path)


def test_truncated_shard_streamed(tmp_path, tiny_llama_dir, capsys):
    import shutil
    folder = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused(["prune", "--model", str(folder), "--stream", "on", "--out", str(tmp_path / "o")], capsys,
             f"cannot read the safetensors weights of {folder}", tmp_path)


def test_overwriting_a_file_leaves_no_old_copy(tmp_path, tiny_llama_dir, data_dir, capsys):
    (tmp_path / "o").write_text("an old file")
    assert main(["prune", "--model", str(tiny_llama_dir), "--nsamples", "2", "--seqlen", "16", "--overwrite",
                 "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "config.json").is_file() and sorted(os.listdir(tmp_path)) == ["o"]


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_llama_dir, data_dir, capsys, monkeypatch):
    from hybridprune.io import models

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full)
    _refused(["ppl", str(tiny_llama_dir), "--seqlen", "16", "--max-windows", "1", "--out", str(tmp_path / "p.json")],
             capsys, f"no space left on the device while writing {tmp_path / 'p.json'}", tmp_path)
    monkeypatch.undo()
    real = models.write_record

    def record_then_full(*a, **k):
        real(*a, **k)
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                           "message: \"No space left on device\" })")  # what safetensors raises
    monkeypatch.setattr(models, "write_record", record_then_full)
    _refused(["prune", "--model", str(tiny_llama_dir), "--nsamples", "2", "--seqlen", "16", "--stream", "off",
              "--out", str(tmp_path / "o")], capsys, "no space left on the device while writing", tmp_path)


def test_sigterm_during_the_save_leaves_nothing(tmp_path, tiny_llama_dir, data_dir, capsys, monkeypatch):
    """SIGTERM arrives while the output is being written (the moment that left `.o.tmp-PID-*` behind): handled
    as Ctrl-C, the temporary is removed, exit 130."""
    from hybridprune.io import models
    real = models.write_record

    def write_then_terminated(*a, **k):
        real(*a, **k)
        assert any(p.name.startswith(".o.tmp-") for p in tmp_path.iterdir())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM was not handled")
    monkeypatch.setattr(models, "write_record", write_then_terminated)
    code = main(["prune", "--model", str(tiny_llama_dir), "--nsamples", "2", "--seqlen", "16", "--stream", "off",
                 "--out", str(tmp_path / "o")])
    assert code == 130 and "interrupted; nothing was written" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command


def test_inspect_fails_when_the_measured_sparsity_disagrees(tmp_path, tiny_llama_dir, data_dir, capsys):
    """The progressive bug's signature: tiers recorded as [0.6, 0.2, 0.2] (expected 0.2883) on a model that
    really has the 50/30/20 tiers; and a record whose overall sparsity is not what the weights hold."""
    out = tmp_path / "tt"
    assert main(["prune", "--model", str(tiny_llama_dir), "--pattern", "three-tier", "--tiers", "0.5,0.3,0.2",
                 "--refit", "0", "--nsamples", "2", "--seqlen", "16", "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    record = json.loads((out / "hybridprune.json").read_text())
    good = json.dumps(record)
    record["prune"]["pattern_detail"].update(tiers=[0.6, 0.2, 0.2], sparsity=0.2883)
    (out / "hybridprune.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 2
    assert "the recorded pattern ([0.6, 0.2, 0.2]) gives 0.2883" in capsys.readouterr().err
    record = json.loads(good)
    record["sparsity"] += 0.01
    (out / "hybridprune.json").write_text(json.dumps(record))
    assert main(["inspect", str(out)]) == 2
    assert "differs from the" in capsys.readouterr().err


# ----------------------------------------------------------------------------- models that are not causal LMs

@pytest.mark.parametrize("family", ["bert", "t5", "vit"])
def test_a_model_that_is_not_a_causal_lm_is_refused_from_its_config(family, tmp_path, capsys, no_load):
    """Only config.json is there: the refusal comes from the config, before any weight or tokenizer is read."""
    from transformers import BertConfig, T5Config, ViTConfig
    cfg = {"bert": BertConfig(architectures=["BertForMaskedLM"]), "t5": T5Config(),
           "vit": ViTConfig()}[family]
    folder = tmp_path / "m"
    cfg.save_pretrained(folder)
    for argv in (["ppl", str(folder), "--seqlen", "64"],
                 ["prune", "--model", str(folder), "--method", "magnitude", "--out", str(tmp_path / "o")],
                 ["eval", str(folder), "--tasks", "wikitext2", "--ppl-seqlen", "64"]):
        _refused(argv, capsys, "hybridprune prunes decoder-only causal LMs")
    assert not (tmp_path / "o").exists()


def test_the_python_loaders_refuse_a_model_that_is_not_a_causal_lm(tmp_path):
    import hybridprune as hp
    from transformers import BertConfig
    folder = tmp_path / "bert"
    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(folder)  # no weights: refused from the config
    with pytest.raises(HybridPruneError, match=r"BertForMaskedLM \(bert\), an encoder"):
        hp.load(str(folder))


# ----------------------------------------------------------------------------- what the record promises is there

def test_inspect_fails_when_a_three_tier_folder_lacks_its_tier_maps(tmp_path, tiny_llama_dir, capsys):
    out = tmp_path / "tt"
    assert main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--pattern", "three-tier",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    (out / "tiers.safetensors").unlink()
    assert main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tiers.safetensors is missing" in err and "incomplete" in err


# ----------------------------------------------------------------------------- corrupt metadata files

def _pruned(tmp_path, tiny_llama_dir, pattern="three-tier"):
    out = tmp_path / "p"
    assert main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--pattern", pattern,
                 "--out", str(out)]) == 0
    return out


def test_a_truncated_record_fails_before_the_work(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    out = _pruned(tmp_path, tiny_llama_dir, "2:4")
    rec = out / "hybridprune.json"
    rec.write_text(rec.read_text()[: len(rec.read_text()) // 2])
    computed = []
    monkeypatch.setattr("hybridprune.evaluation.ppl.perplexity", lambda *a, **k: computed.append(1) or {})
    _refused(["ppl", str(out), "--seqlen", "64", "--max-windows", "1"], capsys, f"{rec} is corrupt or truncated")
    _refused(["eval", str(out), "--tasks", "wikitext2", "--ppl-seqlen", "64"], capsys, "is corrupt or truncated")
    assert not computed, "the perplexity was computed, then lost"


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_a_damaged_tier_map_file_is_one_line(damage, tmp_path, tiny_llama_dir, capsys):
    out = _pruned(tmp_path, tiny_llama_dir)
    f = out / "tiers.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else raw[:8] + b"\xfe" * 12 + raw[20:])
    for argv in (["inspect", str(out)], ["pack", str(out), "--out", str(tmp_path / "packed")]):
        _refused(argv, capsys, str(f))


@pytest.mark.parametrize("content,match", [(b"GGUF\x03\x00", "is truncated"), (b"not a model at all" * 4,
                                                                                "is not a GGUF file")])
def test_a_bad_gguf_file_is_one_line(content, match, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HYBRIDPRUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(content)
    _refused(["ppl", str(f), "--seqlen", "64"], capsys, match)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


# ----------------------------------------------------------------------------- bad data files

def _data(tmp_path, data_dir, **replace):
    """A copy of the data directory (links to the real files) with some files replaced by the given bytes."""
    root = tmp_path / "data"
    for f in Path(data_dir).rglob("*"):
        if f.is_file():
            dest = root / f.relative_to(data_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(f)
    for rel, content in replace.items():
        dest = root / rel.replace("__", "/")
        dest.unlink()
        dest.write_bytes(content)
    return root


@pytest.mark.parametrize("rel,content,argv,match", [
    ("gsm8k__train.jsonl", b'{"question": "q", "answer": "1"}\n{"answer": "2"}\n',
     ["prune", "--calib", "gsm8k"], "train.jsonl line 2 has no text field 'question'"),
    ("c4__c4_sample.jsonl", b'{"text": "fine"}\n{"txt": "typo"}\n', ["prune", "--calib", "c4"],
     "c4_sample.jsonl line 2 has no text field 'text'"),
    ("boolq__train.jsonl", b'{"question": "q", "answer": true}\n', ["prune", "--calib", "boolq"],
     "has no text field 'passage'"),
    ("c4__c4_sample.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ["prune", "--calib", "c4"],
     "c4_sample.jsonl line 2 is not UTF-8"),
    ("wikitext2__wiki.valid.raw", b" = T = \n\n ok \n \xff\xfe \n", ["prune", "--calib", "wikitext2"],
     "wiki.valid.raw line 4 is not UTF-8"),
    ("squad__dev-v1.1.json", b'{"data": [], "version": "1.1"}', ["prune", "--calib", "squad"], "holds no articles"),
    ("squad__dev-v1.1.json", b'{"data": [{"title": "t", "paragraphs": [{"context": "\xe9"}]}]}',
     ["prune", "--calib", "squad"], "is not UTF-8"),
])
def test_bad_data_files_name_the_file_and_line(rel, content, argv, match, tmp_path, tiny_llama_dir, data_dir,
                                              capsys):
    root = _data(tmp_path, data_dir, **{rel: content})
    _refused([*argv, "--model", str(tiny_llama_dir), "--nsamples", "2", "--seqlen", "16", "--data-dir", str(root),
              "--out", str(tmp_path / "o")], capsys, match)
    assert not (tmp_path / "o").exists()


def test_fewshot_beyond_the_pool_or_from_an_empty_split_is_one_line(tmp_path, data_dir):
    from hybridprune.evaluation.tasks import task_config
    small = _data(tmp_path / "a", data_dir, **{"gsm8k__train.jsonl": b'{"question": "q", "answer": "#### 1"}\n'})
    with pytest.raises(HybridPruneError, match="--num-fewshot 3 is more than the 1 examples of gsm8k"):
        task_config("gsm8k", small, num_fewshot=3)
    empty = _data(tmp_path / "b", data_dir, **{"boolq__train.jsonl": b"\n"})
    with pytest.raises(HybridPruneError, match="train.jsonl holds no examples"):
        task_config("boolq", empty, num_fewshot=2)
    one = _data(tmp_path / "c", data_dir, **{"squad__dev-v1.1.json": json.dumps({"data": [json.loads(
        (Path(data_dir) / "squad/dev-v1.1.json").read_text())["data"][0]]}).encode()})
    with pytest.raises(HybridPruneError, match="evaluation split .* holds no questions"):
        task_config("squad", one)


# ----------------------------------------------------------------------------- unwritable outputs, found first

def test_a_read_only_output_place_is_refused_before_the_work(tmp_path, tiny_llama_dir, capsys, no_load,
                                                             monkeypatch):
    import os as os_module
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os_module.access
    monkeypatch.setattr("hybridprune.core.files.os.access",
                        lambda p, mode: False if Path(p) == ro and mode & os_module.W_OK else real(p, mode))
    _refused(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--out", str(ro / "o")], capsys,
             f"{ro} is read-only")
    _refused(["ppl", str(tiny_llama_dir), "--seqlen", "64", "--out", str(ro / "r.json")], capsys, "is read-only")
    _refused(["pack", str(tiny_llama_dir), "--out", str(ro / "p")], capsys, "is read-only")


def test_a_dangling_symlink_as_out_is_refused_before_the_work(tmp_path, tiny_llama_dir, capsys, no_load):
    link = tmp_path / "o"
    link.symlink_to(tmp_path / "nowhere")
    _refused(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--out", str(link)], capsys,
             "which does not exist")


def test_a_cache_that_is_a_file_is_refused_before_converting(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    monkeypatch.setenv("HYBRIDPRUNE_CACHE", str(cache))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    converted = []
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        lambda *a, **k: converted.append(1))
    _refused(["ppl", str(gguf), "--seqlen", "64"], capsys, "is not a folder")
    assert not converted


def test_a_truncated_cached_default_model_is_rebuilt(tmp_path, monkeypatch):
    from hybridprune.io import models
    monkeypatch.setenv("HYBRIDPRUNE_CACHE", str(tmp_path))
    dest = tmp_path / "models" / models.DEFAULT_NAME
    tiny_model("llama").save_pretrained(dest)
    f = dest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # a copy cut short by a full disk
    calls = []

    def convert(src, to):
        calls.append(to)
        tiny_model("llama").save_pretrained(to)
        return to
    monkeypatch.setattr(models, "default_gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(models, "convert_gguf", convert)
    assert models.default_model_path() == dest and calls == [dest]
    assert models.default_model_path() == dest and calls == [dest]  # intact now: not converted again


# ----------------------------------------------------------------------------- flags checked before loading

def test_save_packed_outside_the_format_is_refused_before_pruning(tmp_path, tiny_llama_dir, capsys, no_load,
                                                                 monkeypatch):
    def boom(*a, **k):
        raise AssertionError("pruned before the flags were checked")
    monkeypatch.setattr("hybridprune.pruning.engine.prune", boom)  # the in-memory and the layer-streamed path
    _refused(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--pattern", "three-tier",
              "--block-size", "32", "--save", "packed", "--out", str(tmp_path / "o")], capsys,
             "the packed format covers blocks up to 16x16", tmp_path)


@pytest.mark.parametrize("value,flags,match", [
    ("bogus", None, "HYBRIDPRUNE_KERNELS='bogus' is not a kernel path"),
    ("avx512", {"avx2", "fma", "popcnt"}, "HYBRIDPRUNE_KERNELS=avx512 needs avx512f"),
    ("avx2", {"sse2"}, "HYBRIDPRUNE_KERNELS=avx2 needs avx2"),
])
def test_kernel_environment_is_checked_before_loading(value, flags, match, tmp_path, tiny_llama_dir, capsys,
                                                      no_load, monkeypatch):
    monkeypatch.setenv("HYBRIDPRUNE_KERNELS", value)
    if flags is not None:
        monkeypatch.setattr("hybridprune.core.specs.cpu_flags", lambda: flags)
    _refused(["ppl", str(tiny_llama_dir), "--seqlen", "64", "--kernels"], capsys, match)


def test_no_compiler_is_one_line_saying_what_to_install(tmp_path, tiny_llama_dir, capsys, no_load, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    _refused(["ppl", str(tiny_llama_dir), "--seqlen", "64", "--kernels"], capsys,
             "no C++ compiler (" + str(tmp_path / "no-such-c++") + ") is installed: install g++")


# ----------------------------------------------------------------------------- YAML keys given twice

def test_a_recipe_or_schedule_with_a_key_given_twice_is_refused(tmp_path, capsys, no_load):
    from hybridprune.experiments.recipe import load_recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: default\nprune: {method: wanda}\ncalibration: {wiki: wikitext2}\n"
                      "prune: {method: magnitude}\nruns: [{name: a, calibration: wiki}]\ntasks: {wikitext2: {}}\n")
    with pytest.raises(HybridPruneError, match=r"line 4: key 'prune' is given twice \(lines 2 and 4\)"):
        load_recipe(recipe)
    nested = tmp_path / "n.yaml"
    nested.write_text("model: default\nprune:\n  method: wanda\n  sparsity: 0.5\n  method: ria\n")
    with pytest.raises(HybridPruneError, match="key 'method' is given twice"):
        load_recipe(nested)
    schedule = tmp_path / "s.yaml"
    schedule.write_text("rounds: [[0.9, 0.1, 0.0]]\nrounds: [[0.35, 0.45, 0.2]]\n")
    _refused(["progressive", "--schedule", str(schedule), "--out", str(tmp_path / "o")], capsys,
             "key 'rounds' is given twice (lines 1 and 2)")
