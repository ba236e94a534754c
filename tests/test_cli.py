import json
import subprocess
import sys

import pytest
from conftest import safetensors_tensors

from hybridprune.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "hybridprune.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args,words", [
    (["--sparsity", "1.2"], "outside [0, 1)"),
    (["--pattern", "4:2"], "0 < N < M"),
    (["--method", "obs"], "unknown method"),
    (["--pattern", "diagonal"], "unknown pattern"),
    (["--calib", "pile"], "unknown calibration source"),
    (["--model", "./no/such/model"], "model not found"),
    (["--data-dir", "/no/such/dir"], "does not exist"),
    (["--pattern", "three-tier", "--tiers", "0.5,0.5,0.5"], "add up to 1"),
    (["--pattern", "three-tier", "--block-size", "18"], "multiple of M"),
    (["--pattern", "three-tier", "--topk", "999"], "within [0, 256]"),
    (["--pattern", "three-tier", "--block-score", "max"], "unknown block score"),
    (["--pattern", "three-tier", "--refit", "-1"], ">= 0"),
    (["--method", "magnitude", "--pattern", "three-tier", "--refit", "5"], "calibration statistics"),
    (["--calib", "mixed:wikitext2=0.7,squad=0.7"], "add up to"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, words):
    out = tmp_path / "out"
    res = run_cli("prune", "--out", str(out), "--nsamples", "2", "--seqlen", "16", *args)
    assert res.returncode == 2, res.stderr
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and words in lines[0], res.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_folder_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["prune", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_gguf_without_gguf_package(tmp_path, monkeypatch, capsys):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["ppl", str(f)]) == 2
    assert "needs the `gguf` package" in capsys.readouterr().err


def test_prune_ppl_inspect_end_to_end(tmp_path, tiny_llama_dir, data_dir, capsys):
    out = tmp_path / "pruned"
    rc = main(["prune", "--model", str(tiny_llama_dir), "--method", "wanda", "--pattern", "three-tier",
               "--nsamples", "4", "--seqlen", "32", "--block-score", "row", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    record = json.loads((out / "hybridprune.json").read_text())
    assert record["prune"]["method"] == "wanda" and record["prune"]["calib"] == "wikitext2"
    assert record["prune"]["block_score"] == "row" and record["prune"]["refit"] == 10  # the block-pattern default
    assert "torch" in record["versions"] and (out / "tiers.safetensors").is_file()
    assert (out / "model.safetensors.index.json").is_file() and not list(out.glob("*.bin"))  # streamed shards
    assert main(["ppl", str(out), "--seqlen", "64", "--max-windows", "2", "--out", str(tmp_path / "p.json")]) == 0
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["windows"] == 2 and res["ppl"] > 1 and res["hybridprune"]["prune"]["pattern"] == "three-tier"
    capsys.readouterr()
    assert main(["inspect", str(out), "--plot", str(tmp_path / "plots")]) == 0
    text = capsys.readouterr().out
    assert "tier rules hold: yes" in text
    assert (tmp_path / "plots" / "tier_maps.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "sparsity_by_layer.png").stat().st_size > 1000


def test_nm_inspect_reports_valid_groups(tmp_path, tiny_llama_dir, data_dir, capsys):
    out = tmp_path / "nm"
    assert main(["prune", "--model", str(tiny_llama_dir), "--pattern", "2:4", "--method", "sparsegpt",
                 "--nsamples", "2", "--seqlen", "32", "--out", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["nm_valid"] is True and abs(rep["overall"] - 0.5) < 1e-9


def test_progressive_cli_and_resume(tmp_path, tiny_llama_dir, data_dir, capsys):
    sched = tmp_path / "s.yaml"
    sched.write_text("rounds:\n  - [0.9, 0.1, 0.0]\n  - [0.35, 0.45, 0.20]\n")
    out = tmp_path / "prog"
    assert main(["progressive", "--model", str(tiny_llama_dir), "--schedule", str(sched), "--nsamples", "2",
                 "--seqlen", "32", "--out", str(out), "--device", "cpu"]) == 0
    rec = json.loads((out / "hybridprune.json").read_text())
    assert [r["round"] for r in rec["progressive"]["rounds"]] == [1, 2]
    assert rec["progressive"]["rounds"][0]["sparsity"] < rec["progressive"]["rounds"][1]["sparsity"]
    assert not (tmp_path / "prog.partial").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds:\n  - [0.9, 0.2, 0.0]\n")
    assert main(["progressive", "--model", str(tiny_llama_dir), "--schedule", str(bad), "--out",
                 str(tmp_path / "x")]) == 2


def test_help_lists_commands():
    res = run_cli("--help")
    assert res.returncode == 0 and all(c in res.stdout for c in ("prune", "ppl", "inspect", "progressive"))


def test_progressive_resumes_after_interruption(tmp_path, tiny_llama_dir, data_dir):
    from hybridprune import PruneConfig, load_model
    from hybridprune.pruning.progressive import run_progressive

    schedule = [(0.9, 0.1, 0.0), (0.6, 0.2, 0.2), (0.35, 0.45, 0.2)]
    config = PruneConfig(pattern="three-tier", nsamples=2, seqlen=32, device="cpu")
    out = tmp_path / "p"
    calls = []

    def recover_then_crash(model, tok, r):
        calls.append(r)
        if r == 1:
            raise KeyboardInterrupt

    model, tok = load_model(str(tiny_llama_dir))
    with pytest.raises(KeyboardInterrupt):
        run_progressive(model, tok, config, schedule, out, recover=recover_then_crash)
    assert not out.exists() and (tmp_path / "p.partial" / "state.json").is_file()
    model, tok = load_model(str(tiny_llama_dir))
    run_progressive(model, tok, config, schedule, out, resume=True, recover=lambda m, t, r: calls.append(r))
    assert calls == [0, 1, 1, 2]  # round 2 (index 1) was not saved, so it ran again; round 1 did not
    rec = json.loads((out / "hybridprune.json").read_text())
    assert [r["round"] for r in rec["progressive"]["rounds"]] == [1, 2, 3]


def test_compare_writes_table_json_and_chart(tmp_path, tiny_llama_dir, data_dir, capsys):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.9",
                 "--out", str(pruned)]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_llama_dir), str(pruned), "--tasks", "wikitext2,boolq", "--limit", "3",
                 "--ppl-seqlen", "64", "--ppl-windows", "2", "--out", str(out)]) == 0
    table = (out / "compare.md").read_text().splitlines()
    assert table[0] == "| task | metric | tiny-llama | pruned |"
    ppl_row = next(r for r in table if r.startswith("| wikitext2 | ppl"))
    assert "(+" in ppl_row or "(-" in ppl_row  # the difference to the first model
    runs = json.loads((out / "compare.json").read_text())
    # the measured sparsity of the saved weights, not the requested one: int(0.9 * 48) / 48 and int(0.9 * 96) / 96
    weights = safetensors_tensors(pruned)
    mats = [w for k, w in weights.items() if ".layers." in k and k.endswith("proj.weight")]
    zeros = sum(int((w == 0).sum()) for w in mats) / sum(w.numel() for w in mats)
    assert runs[1]["hybridprune"]["sparsity"] == pytest.approx(zeros) and zeros == pytest.approx(43 / 48)
    assert runs[0]["tasks"]["boolq"]["n"] == 3
    assert (out / "compare.png").stat().st_size > 1000


def test_compare_tabulates_saved_results(tmp_path, tiny_llama_dir, data_dir, capsys):
    common = ["--tasks", "wikitext2", "--limit", "2", "--ppl-seqlen", "64", "--ppl-windows", "2"]
    saved = tmp_path / "dense.json"
    assert main(["eval", str(tiny_llama_dir), "--out", str(saved), *common]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(saved), str(tiny_llama_dir), *common, "--out", str(out)]) == 0
    runs = json.loads((out / "compare.json").read_text())
    assert runs[0] == json.loads(saved.read_text())  # taken as saved, not re-run
    assert runs[0]["tasks"]["wikitext2"]["ppl"] == runs[1]["tasks"]["wikitext2"]["ppl"]  # same model, same windows
    assert "(+0)" in next(r for r in (out / "compare.md").read_text().splitlines() if "| ppl |" in r)
    # A saved run made on other examples is refused, as is a JSON file that is not a results file.
    assert main(["compare", str(saved), str(tiny_llama_dir), *common[:2], "--limit", "3", "--out", str(out)]) == 2
    (tmp_path / "x.json").write_text("[]")
    assert main(["compare", str(tmp_path / "x.json"), str(tiny_llama_dir), *common, "--out", str(out)]) == 2


def test_eval_bad_input(tmp_path, capsys):
    assert main(["eval", "default", "--tasks", "mmlu"]) == 2
    assert main(["eval", "default", "--limit", "0"]) == 2
    assert main(["eval", "default", "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("hybridprune: error:") for e in err)


def test_finetune_cli_keeps_sparsity_and_writes_record(tmp_path, tiny_llama_dir, data_dir):
    import torch
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_llama_dir), "--pattern", "three-tier", "--nsamples", "2",
                 "--seqlen", "32", "--out", str(pruned)]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", str(pruned), "--data", "squad", "--template", "simple", "--steps", "3",
                 "--batch-size", "2", "--seqlen", "256", "--max-examples", "6", "--lr", "1e-3",
                 "--out", str(out)]) == 0
    rec = json.loads((out / "hybridprune.json").read_text())
    assert rec["prune"]["pattern"] == "three-tier" and rec["finetune"]["steps"] == 3
    assert (out / "loss.png").is_file() and (out / "tiers.safetensors").is_file()
    a, b = safetensors_tensors(pruned), safetensors_tensors(out)
    for k in a:
        if k.endswith("proj.weight"):
            assert torch.equal(a[k] != 0, b[k] != 0), k
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("proj.weight"))
    assert not (tmp_path / "ft.checkpoints").exists()
    assert main(["finetune", str(pruned), "--data", "squad", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["finetune", str(pruned), "--data", "gsm8k", "--template", "alpaca",
                 "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_finetune_no_merge_saves_plain_model_and_adapter(tmp_path, tiny_llama_dir, data_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.5",
                 "--out", str(pruned)]) == 0
    out = tmp_path / "ft"
    assert main(["finetune", str(pruned), "--data", "wikitext2", "--steps", "2", "--batch-size", "2",
                 "--seqlen", "32", "--max-examples", "4", "--lr", "1e-2", "--no-merge", "--out", str(out)]) == 0
    a, b = safetensors_tensors(pruned), safetensors_tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the base, untouched and loadable
    base = AutoModelForCausalLM.from_pretrained(out)
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in tuned.named_parameters())


def test_progressive_with_finetune_between(tmp_path, tiny_llama_dir, data_dir):
    sched = tmp_path / "s.yaml"
    sched.write_text("rounds:\n  - [0.6, 0.4, 0.0]\n  - [0.35, 0.45, 0.20]\n")
    out = tmp_path / "prog"
    assert main(["progressive", "--model", str(tiny_llama_dir), "--schedule", str(sched), "--nsamples", "2",
                 "--seqlen", "32", "--out", str(out), "--finetune-between", "wikitext2", "--steps", "2",
                 "--ft-batch-size", "2", "--ft-seqlen", "64", "--max-examples", "8", "--ft-method", "full"]) == 0
    assert main(["inspect", str(out)]) == 0
