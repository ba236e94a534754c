"""The second sweep of bad input and faults (issue 19): each case keeps the README's promise, one line on stderr,
exit 2, no traceback, nothing half-written, options refused before a model is loaded."""
import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest

from hybridprune.cli import main
from test_bad_input import _refused


@pytest.fixture
def no_load(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("a model was loaded before the options were checked")
    monkeypatch.setattr("hybridprune.io.models.load_dense", boom)


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
