"""The experiment command on a tiny random model: the stage graph, caching, resume, statistics, bad recipes."""
import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from hybridprune.core.errors import HybridPruneError
from hybridprune.experiments import experiment, report
from hybridprune.experiments import recipe as recipe_mod
from hybridprune.experiments.stats import (
    jaccard,
    mcnemar,
    paired_bootstrap,
)

RECIPE = """\
model: {model}
prune: {{method: wanda, pattern: unstructured, sparsity: 0.5, nsamples: 2, seqlen: 32, seed: 0}}
calibration:
  wiki: wikitext2
  squad: squad
finetune:
  wiki: {{data: wikitext2, method: lora, steps: 2, batch_size: 2, seqlen: 32, lr: 1.0e-2, max_examples: 4}}
  squad: {{data: squad, method: lora, steps: 2, batch_size: 2, seqlen: 256, lr: 1.0e-2, max_examples: 4}}
runs:
  - {{name: dense}}
  - {{name: pruned-wiki, calibration: wiki}}
  - {{name: exp1, calibration: wiki, finetune: wiki}}
  - {{name: exp2, calibration: squad, finetune: squad}}
tasks:
  wikitext2: {{windows: 3, seqlen: 32}}
  boolq: {{limit: {boolq_limit}}}
eval: {{batch_size: 4}}
claims:
  - exp1 < dense on wikitext2.ppl
  - exp2 > exp1 on boolq.margin
"""


SMALL = """\
model: {model}
prune: {{method: wanda, pattern: unstructured, sparsity: 0.5, nsamples: 2, seqlen: 32, seed: 0}}
calibration: {{wiki: wikitext2}}
runs: [{{name: dense}}, {{name: pruned-wiki, calibration: wiki}}]
tasks: {{wikitext2: {{windows: 3, seqlen: 32}}}}
"""


def _recipe(path, model, boolq_limit=4):
    path.write_text(RECIPE.format(model=model, boolq_limit=boolq_limit))
    return path


class _Counter:
    """Wraps experiment._run_stage: counts executed stages by kind, can fail at the n-th one."""

    def __init__(self, monkeypatch, fail_at=None):
        self.kinds, self.real, self.fail_at = [], experiment._run_stage, fail_at
        monkeypatch.setattr(experiment, "_run_stage", self)

    def __call__(self, stage, recipe, device, loaded):
        if self.fail_at is not None and len(self.kinds) + 1 == self.fail_at:
            raise RuntimeError("injected failure")
        self.real(stage, recipe, device, loaded)
        self.kinds.append(stage.kind)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama_dir, data_dir):
    """One complete run of the tiny recipe (shared by the tests below)."""
    from hybridprune.sparse import load as loader
    root = tmp_path_factory.mktemp("exp")
    recipe = _recipe(root / "r.yaml", tiny_llama_dir)
    loads, plain = [], loader.load_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader, "load_model", lambda spec, *a, **k: loads.append(str(spec)) or plain(spec, *a, **k))
        results = experiment.run_experiment(recipe, root / "run", isolate=False, log=lambda *a: None)
    (root / "loads.json").write_text(json.dumps({"loads": loads, "dense": str(tiny_llama_dir)}))
    return root, recipe, results


def _metrics(results):
    return {name: {t: {k: v for k, v in e.items() if k != "per_example"} for t, e in row["tasks"].items()}
            for name, row in results["runs"].items()}


def test_whole_graph_runs_and_reports(finished):
    root, _, results = finished
    out = root / "run"
    assert {p.name for p in out.iterdir()} >= {"report.md", "results.json", "results.csv", "plots", "stages"}
    # 3 prune stages (wiki, squad, magnitude reference), 2 fine-tunes, 4 runs x 2 tasks of eval: shared stages once
    names = [p.name for p in (out / "stages").iterdir()]
    assert sum(n.startswith("prune-") for n in names) == 3 and sum(n.startswith("finetune-") for n in names) == 2
    assert sum(n.startswith("eval-") for n in names) == 8
    runs = results["runs"]
    assert runs["dense"]["sparsity"] is None and runs["exp1"]["sparsity"] == pytest.approx(0.5)
    # a model's eval stages read it once (the dense model: only for eval), and each run is scored on its own model
    seen = json.loads((root / "loads.json").read_text())
    loads = collections.Counter(seen["loads"])  # eval reads dense once; the wiki-pruned model: fine-tuning + eval
    assert loads[seen["dense"]] == 1 and max(loads.values()) == 2 and len(loads) == 5, loads
    ppl = {name: row["tasks"]["wikitext2"]["ppl"] for name, row in runs.items()}
    assert len(set(ppl.values())) == 4, ppl
    assert {"acc", "gold_nll", "margin"} <= set(runs["exp2"]["tasks"]["boolq"])
    assert len(runs["exp1"]["tasks"]["wikitext2"]["per_example"]["nll"]) == 3
    pair = next(p for p in results["pairs"] if p["task"] == "boolq" and p["metric"] == "acc")
    assert "mcnemar_p" in pair and pair["n"] == 4
    claim = results["claims"][0]["results"][0]  # 3 windows: an interval, but no verdict from so few units
    assert claim["status"] == "too few to judge" and claim["a"] == "exp1" and claim["units"] == 3
    assert "wiki vs squad" in results["overlap"]["unstructured"]["pairs"]
    report = (out / "report.md").read_text()
    assert "## Paired differences" in report and "## Claims" in report and "## Mask overlap" in report
    assert (out / "plots" / "overlap-unstructured.png").stat().st_size > 1000
    assert (out / "plots" / "boolq-acc.png").is_file()
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "run,task,metric,seed,value,stderr,sd,n" and any(r.startswith("exp2,boolq,margin,0,")
                                                                           for r in rows)


def test_rerun_does_no_work(finished, monkeypatch):
    root, recipe, results = finished
    counter = _Counter(monkeypatch)
    again = experiment.run_experiment(recipe, root / "run", isolate=False, log=lambda *a: None)
    assert counter.kinds == [] and _metrics(again) == _metrics(results)


def test_failure_mid_run_then_rerun_matches_uninterrupted(finished, tmp_path, monkeypatch):
    _, recipe, results = finished
    counter = _Counter(monkeypatch, fail_at=5)
    with pytest.raises(RuntimeError, match="injected"):
        experiment.run_experiment(recipe, tmp_path / "run", isolate=False, log=lambda *a: None)
    assert len(counter.kinds) == 4 and not (tmp_path / "run" / "results.json").exists()
    assert not [p for p in (tmp_path / "run" / "stages").iterdir() if p.name.startswith(".")]  # nothing half-made
    counter.fail_at = None
    resumed = experiment.run_experiment(recipe, tmp_path / "run", isolate=False, log=lambda *a: None)
    assert len(counter.kinds) == 13  # 3 prune + 2 finetune + 8 eval, each exactly once over both attempts
    assert _metrics(resumed) == _metrics(results)


def test_isolated_stages_run_in_processes_of_their_own_with_the_same_results(finished, tmp_path, monkeypatch):
    """Each stage (a model's evaluations together) runs in a child of the fork server: nothing runs in this process,
    each job reports its peak, and the results equal the in-process run's."""
    from hybridprune.sparse import load as loader
    _, recipe, results = finished

    def here(*a, **k):
        raise AssertionError("a stage ran in the parent process")
    monkeypatch.setattr(experiment, "_run_stage", here)
    monkeypatch.setattr(loader, "load_model", here)
    logs = []
    res = experiment.run_experiment(recipe, tmp_path / "run", isolate=True, log=logs.append)
    assert sum("[stage " in line for line in logs) == 13
    assert sum("its process peaked at" in line for line in logs) == 9  # 3 prunes, 2 fine-tunes, 4 models' evals
    assert _metrics(res) == _metrics(results)
    times = json.loads((tmp_path / "run" / "stages" / "times.json").read_text())
    assert len(times) == 13 and all(v >= 0 for v in times.values())
    peaks = json.loads((tmp_path / "run" / "stages" / "peak_rss.json").read_text())
    assert set(peaks) == set(times) and res["peak_rss"]["kib"] == max(peaks.values()) > 100_000  # KiB: >100 MB
    assert f"{res['peak_rss']['kib'] / 1024:,.0f} MiB" in (tmp_path / "run" / "report.md").read_text()


def test_an_isolated_stage_that_fails_or_is_killed_is_one_line(finished, tmp_path, monkeypatch):
    """An error in a child comes back as it was raised (with the parent's environment, which the fork server does
    not have); a child killed mid-stage is one line naming the stage, leaves no temporaries, and a rerun resumes."""
    import multiprocessing
    import signal
    _, recipe, results = finished
    empty = tmp_path / "empty"
    empty.mkdir()
    with monkeypatch.context() as mp:
        mp.setenv("HYBRIDPRUNE_DATA", str(empty))
        with pytest.raises(HybridPruneError, match="missing data file"):
            experiment.run_experiment(recipe, tmp_path / "run", isolate=True, log=lambda *a: None)

    def kill_at_fourth(line):
        if line.startswith("[stage 4/"):  # the first fine-tuning: its child is running it
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
    with pytest.raises(HybridPruneError, match=r"finetune .*: its process was killed by signal 9"):
        experiment.run_experiment(recipe, tmp_path / "run", isolate=True, log=kill_at_fourth)
    stages = tmp_path / "run" / "stages"
    assert not [p for p in stages.iterdir() if p.name.startswith(".")]  # nothing half-made
    assert sum(p.name.startswith("prune-") for p in stages.iterdir()) == 3
    assert not any(p.name.startswith("finetune-") for p in stages.iterdir())
    resumed = experiment.run_experiment(recipe, tmp_path / "run", isolate=True, log=lambda *a: None)
    assert _metrics(resumed) == _metrics(results)


def test_the_command_waiting_on_isolated_stages_holds_no_torch(tiny_llama_dir, data_dir, tmp_path):
    """`hybridprune experiment` in a fresh interpreter: the recipe is checked and every stage runs in children, so
    the command's own process has not imported torch (~150 MB) while any stage runs, and stays small; a bad
    --data-dir is still one line and exit 2."""
    (tmp_path / "r.yaml").write_text(SMALL.format(model=tiny_llama_dir))
    spy = r"""
import builtins, json, re, sys
seen, plain = [], builtins.print
def peak():  # KiB; VmHWM is this image's own (ru_maxrss would carry over pytest's, which vfork'ed and exec'ed it)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
def print(*a, **k):  # the command logs through print: note, at each line, what this process holds
    seen.append(["torch" in sys.modules, peak(), str(a[0]) if a else ""])
    plain(*a, **k)
builtins.print = print
from hybridprune.cli import main
rc = main(sys.argv[1:])
plain(json.dumps(seen))
sys.exit(rc)
"""
    run = [sys.executable, "-c", spy, "experiment", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k != "HYBRIDPRUNE_DATA"}
    done = subprocess.run(run + ["--data-dir", str(data_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    stages = [(torch, kib) for torch, kib, line in seen if line.startswith("[stage ")]
    assert len(stages) == 4  # two prunes (wiki and the magnitude reference), the two models' evaluations
    assert not any(torch for torch, _ in stages) and max(kib for _, kib in stages) < 80_000  # KiB
    assert (tmp_path / "run" / "report.md").is_file()
    bad = subprocess.run(run + ["--data-dir", str(tmp_path / "nowhere")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nowhere does not exist" in bad.stderr


def test_what_a_killed_stage_process_left_is_removed(tmp_path):
    """A child killed mid-save leaves temporary siblings named by its pid, and a fine-tuning work folder; the parent
    removes them, but keeps a work folder with a checkpoint to resume from."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    job = [experiment.Stage(kind, kind + "-k", kind, {}, tmp_path / name)
           for kind, name in (("prune", "prune-a"), ("finetune", "finetune-b"), ("finetune", "finetune-c"),
                              ("eval", "eval-d.json"))]
    made = [tmp_path / f".prune-a.tmp-{dead.pid}-x1", tmp_path / "finetune-b.checkpoints",
            tmp_path / f".eval-d.json.tmp-{dead.pid}"]
    made[0].mkdir()
    made[1].mkdir()
    made[2].write_text("{")
    (tmp_path / "finetune-c.checkpoints" / "checkpoint-5").mkdir(parents=True)
    experiment._clean_after(job, dead.pid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finetune-c.checkpoints"]


def test_changing_an_eval_limit_reruns_only_eval_stages(finished, tmp_path, monkeypatch, tiny_llama_dir):
    root, _, _ = finished
    shutil.copytree(root / "run", tmp_path / "run")
    recipe = _recipe(tmp_path / "r.yaml", tiny_llama_dir, boolq_limit=3)
    counter = _Counter(monkeypatch)
    res = experiment.run_experiment(recipe, tmp_path / "run", isolate=False, log=lambda *a: None)
    assert counter.kinds == ["eval"] * 4  # boolq of the four runs; no prune, fine-tune or wikitext2 stage
    assert res["runs"]["exp1"]["tasks"]["boolq"]["n"] == 3


def test_mask_overlap_equals_a_direct_count(finished):
    from conftest import safetensors_tensors as _tensors
    root, _, results = finished
    pair = results["overlap"]["unstructured"]["pairs"]["wiki vs squad"]
    stages = {p.name: p for p in (root / "run" / "stages").iterdir() if p.name.startswith("prune-")}
    by_calib = {}
    for p in stages.values():
        rec = json.loads((p / "hybridprune.json").read_text())["prune"]
        by_calib[rec["calib"] if rec["method"] != "magnitude" else "magnitude"] = _tensors(p)
    a, b = by_calib["wikitext2"], by_calib["squad"]
    keys = [k for k in a if ".layers." in k and k.endswith("proj.weight")]
    za = torch.cat([(a[k] == 0).reshape(-1) for k in keys])
    zb = torch.cat([(b[k] == 0).reshape(-1) for k in keys])
    assert pair["overall"] == pytest.approx(float((za & zb).sum() / (za | zb).sum()))
    assert 0 < pair["overall"] < 1 and set(pair["by_type"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"}


def test_paired_statistics_hand_computed():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5]  # constant difference: every resample gives 0.5
    r = paired_bootstrap(a, b)
    assert r["diff"] == r["lo"] == r["hi"] == 0.5 and r["n"] == 4
    r = paired_bootstrap([0, 0, 1, 1, 1, 0, 1, 1], [0, 1, 0, 1, 0, 0, 0, 1], n_boot=4000, seed=3)
    assert r["diff"] == pytest.approx(0.25) and r["lo"] < 0.25 < r["hi"]
    assert paired_bootstrap([0, 0, 1, 1, 1, 0, 1, 1], [0, 1, 0, 1, 0, 0, 0, 1], n_boot=4000, seed=3) == r  # seeded
    m = mcnemar([1, 1, 1, 0, 1], [0, 0, 0, 0, 1])  # 3 discordant pairs, all one way: p = 2 * (1/2)^3
    assert (m["a_only"], m["b_only"]) == (3, 0) and m["p"] == pytest.approx(0.25)
    assert mcnemar([1, 0, 1, 0], [0, 1, 0, 1])["p"] == pytest.approx(1.0)  # 2 vs 2: no evidence
    assert jaccard([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(1 / 3) and jaccard([0, 0], [0, 0]) == 1.0
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1])


def test_claims_are_judged_on_the_interval():
    pairs = [{"task": "squad", "metric": "f1", "a": "exp1", "b": "exp2", "diff": -5.0, "lo": -8.0, "hi": -2.0},
             {"task": "boolq", "metric": "acc", "a": "exp2", "b": "exp3", "diff": 0.01, "lo": -0.05, "hi": 0.07}]

    def judge(text):
        m = recipe_mod.CLAIM.match(text)
        c = recipe_mod.Claim(text, *m.groups(), line=1)
        return report._judge(c, pairs, ["exp1", "exp2", "exp3"])["results"][0]
    assert judge("exp2 > exp1 on squad.f1")["status"] == "supported"
    assert judge("exp2 > exp1 on squad.f1")["diff"] == 5.0
    assert judge("exp1 > exp2 on squad.f1")["status"] == "refuted"
    assert judge("exp2 < exp1 on squad.f1")["status"] == "refuted"
    assert judge("exp3 >= exp2 on boolq.acc")["status"] == "inconclusive"


def test_gold_nll_equals_a_hand_computation(default_tokenizer, data_dir):
    """Mean per-token NLL of the first gold answer after the exact SQuAD prompt, computed directly."""
    from conftest import tiny_model

    from hybridprune.evaluation.tasks import SQUAD_PROMPT, evaluate_model
    from hybridprune.io.data import squad_examples
    tok = default_tokenizer
    model = tiny_model("llama", vocab=len(tok), hidden=48, inter=96)
    res = evaluate_model(model, tok, ["squad"], limit=2, batch_size=2, data_dir_path=data_dir)
    doc = squad_examples("eval", data_dir)[0]
    prompt = SQUAD_PROMPT.replace("{{", "{").replace("}}", "}").format(**doc)
    ctx = tok(prompt)["input_ids"]
    whole = tok(prompt + " " + doc["answers"][0])["input_ids"]
    cont = whole[len(ctx):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    nll = -float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))) / len(cont)
    assert res["squad"]["per_example"]["gold_nll"][0] == pytest.approx(nll, rel=1e-4)
    assert res["squad"]["gold_nll"] == pytest.approx(np.mean(res["squad"]["per_example"]["gold_nll"]))


@pytest.mark.parametrize("edit,match", [
    (("tasks:", "colour: blue\ntasks:"), "line 14: unknown key 'colour'"),
    (("squad: squad", "squad: pile"), "line 5: calibration 'squad'"),
    (("boolq: {limit: 4}", "mmlu: {limit: 4}"), "line 16: unknown task 'mmlu'"),
    (("{name: exp1, calibration: wiki, finetune: wiki}", "{name: exp1, calibration: c4, finetune: wiki}"),
     "line 12: run 'exp1' names calibration 'c4'"),
    (("{name: exp1, calibration: wiki, finetune: wiki}", "{name: exp1, calibration: wiki, finetune: alpaca}"),
     "line 12: run 'exp1' names fine-tuning 'alpaca'"),
    (("{name: exp2,", "{name: exp1,"), "line 13: duplicate run name 'exp1'"),
    (("exp1 < dense on", "exp9 < dense on"), "line 19: claim 'exp9 < dense on wikitext2.ppl' names run 'exp9'"),
    (("on boolq.margin", "on boolq.f1"), "line 20: claim 'exp2 > exp1 on boolq.f1': boolq has no metric 'f1'"),
    (("boolq: {limit: 4}", "boolq: {limit: 0}"), "line 16: boolq limit must be a whole number >= 1"),
    (("method: wanda", "method: obs"), "line 2: unknown method 'obs'"),
    (("eval: {batch_size: 4}", "eval: {batch_size: 4, beam: 2}"), "line 17: unknown eval option 'beam'"),
    (("eval: {batch_size: 4}", "eval: {batch_size: 4, generate_batch_size: 0}"),
     "line 17: eval generate_batch_size must be a whole number >= 1"),
    (("\ncalibration:\n", "\nseeds: []\ncalibration:\n"), "line 3: `seeds:` must be a non-empty list"),
    (("\ncalibration:\n", "\nseeds: [0, 1.5]\ncalibration:\n"), "line 3: seed 1.5 is not a whole number"),
    (("\ncalibration:\n", "\nseeds: [0, 1, 0]\ncalibration:\n"), "line 3: seed 0 is repeated"),
    (("\ncalibration:\n", "\nseeds: 3\ncalibration:\n"), "line 3: `seeds:` must be a non-empty list"),
    (("\ncalibration:\n", "\nseeds: [0, 1]\ncalibration:\n"), "line 2: give the seed in `seeds:` or in `prune:`"),
    (("\ncalibration:\n", "\ndtype: float99\ncalibration:\n"), "line 3: unknown dtype 'float99'"),
    (("boolq: {limit: 4}", "boolq: {limit: 4, sample: 8}"), "line 16: boolq: give limit"),
    (("boolq: {limit: 4}", "boolq: {sample: 0}"), "line 16: boolq sample must be a whole number >= 1"),
    (("eval: {batch_size: 4}", "eval: {batch_size: 4, sample_seed: -1}"), "line 17: eval sample_seed must be"),
    (("\ncalibration:\n", "\nnotes: [a, b]\ncalibration:\n"), "line 3: `notes:` is free text"),
])
def test_bad_recipes_name_the_line(edit, match, tmp_path, capsys):
    from hybridprune.cli import main
    text = RECIPE.format(model="m", boolq_limit=4).replace(*edit)
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(HybridPruneError, match=match.replace("(", r"\(").replace(")", r"\)")):
        experiment.load_recipe(tmp_path / "r.yaml")
    assert main(["experiment", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_quick_also_checks_the_main_profile(tmp_path):
    """A limit of 0 in the main profile is refused under --quick too (it would run for minutes there), and a
    bad quick override names the quick profile."""
    text = RECIPE.format(model="m", boolq_limit=0) + "quick:\n  tasks: {limit: 2}\n"
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(HybridPruneError, match="line 16: boolq limit must be a whole number >= 1, got 0$"):
        experiment.load_recipe(tmp_path / "r.yaml", quick=True)
    text = RECIPE.format(model="m", boolq_limit=4) + "quick:\n  tasks: {limit: 0}\n"
    (tmp_path / "r.yaml").write_text(text)
    experiment.load_recipe(tmp_path / "r.yaml")  # the main profile is fine
    with pytest.raises(HybridPruneError, match=r"boolq limit must be a whole number >= 1, got 0 \(quick profile\)"):
        experiment.load_recipe(tmp_path / "r.yaml", quick=True)


@pytest.mark.parametrize("quick", [False, True])
def test_shipped_recipe_plans_the_study(quick, tmp_path):
    from pathlib import Path
    recipe = experiment.load_recipe(Path(__file__).parents[1] / "recipes/calibration-study.yaml", quick=quick)
    names = [r.name for r in recipe.runs]
    assert names == ["dense", "pruned-wiki", "pruned-squad", "pruned-mixed", "exp1", "exp2", "exp3", "mixture"]
    stages, by_run, pruned = experiment.plan(recipe, tmp_path)
    kinds = [s.kind for s in stages]
    # full: 3 calibrations x 3 seeds + magnitude; 4 fine-tunings x 3 seeds; dense once + 7 runs x 3 seeds, 4 tasks
    assert (kinds.count("prune"), kinds.count("finetune"), kinds.count("eval")) == \
        ((4, 4, 32) if quick else (10, 12, 4 + 7 * 3 * 4))
    assert recipe.seeds == ([0] if quick else [0, 1, 2])
    # seed by seed (a stopped run leaves whole seeds): every stage of a seed before any of the next one
    seed_of = {st.key: seed for run in by_run.values() for seed, cell in sorted(run.items(), reverse=True)
               for st in [*cell.values(), *(cell["_model"].input for _ in [0] if cell["_model"] and cell["_model"].input)]
               if st is not None}
    order = [seed_of[st.key] for st in stages if st.key in seed_of]
    assert order == sorted(order)
    for seed in recipe.seeds:
        assert by_run["exp1"][seed]["_model"].input is by_run["exp3"][seed]["_model"].input  # one pruned model
        assert by_run["exp2"][seed]["squad"].key != by_run["exp3"][seed]["squad"].key
        assert by_run["dense"][seed]["squad"] is by_run["dense"][0]["squad"]
    assert recipe.tasks["squad"] == {**({"limit": 4} if quick else {"sample": 96}), "generate_batch_size": 32}
    assert {c.a for c in recipe.claims} <= set(names) and len(recipe.claims) == 8
    assert recipe.prune["nsamples"] == (2 if quick else 32)


def test_a_generating_task_sets_its_own_generation_width(tmp_path, monkeypatch):
    """SQuAD's long prompts hold a KV cache per batch row: a task's generate_batch_size overrides eval's for
    that task alone, and is in that task's stage key only."""
    from hybridprune.core import files
    from hybridprune.evaluation import tasks
    from hybridprune.sparse import load as loader
    base = RECIPE.format(model="m", boolq_limit=4).replace("eval: {batch_size: 4}",
                                                           "eval: {batch_size: 4, generate_batch_size: 8}")
    keys = {}
    for width in ("", ", generate_batch_size: 3"):
        (tmp_path / "r.yaml").write_text(base.replace("boolq: {limit: 4}",
                                                      "boolq: {limit: 4}\n  squad: {limit: 2%s}" % width))
        recipe = experiment.load_recipe(tmp_path / "r.yaml")
        stages, by_run, _ = experiment.plan(recipe, tmp_path)
        keys[width] = {t: by_run["dense"][0][t].key for t in ("boolq", "squad")}
    assert keys[""]["boolq"] == keys[", generate_batch_size: 3"]["boolq"]
    assert keys[""]["squad"] != keys[", generate_batch_size: 3"]["squad"]
    widths = {}
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: (object(), object()))
    monkeypatch.setattr(files, "write_text_atomic", lambda *a, **k: None)
    monkeypatch.setattr(tasks, "evaluate_model", lambda m, t, names, **kw: widths.update({names[0]: kw}) or {})
    for task in ("boolq", "squad"):
        experiment._run_stage(by_run["dense"][0][task], recipe, None, {})
    assert widths["squad"]["generate_batch_size"] == 3 and widths["boolq"]["generate_batch_size"] == 8
    assert widths["squad"]["batch_size"] == widths["boolq"]["batch_size"] == 4


SEEDS_RECIPE = """\
model: {model}
prune: {{method: wanda, pattern: unstructured, sparsity: 0.5, nsamples: 2, seqlen: 32}}
seeds: {seeds}
calibration:
  wiki: wikitext2
  squad: squad
runs:
  - {{name: dense}}
  - {{name: pruned-wiki, calibration: wiki}}
  - {{name: pruned-squad, calibration: squad}}
tasks:
  wikitext2: {{windows: 24, seqlen: 16}}
  boolq: {{sample: 6}}
eval: {{batch_size: 4}}
claims:
  - pruned-wiki < pruned-squad on wikitext2.ppl
  - pruned-wiki > pruned-squad on boolq.acc
"""


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, tiny_llama_dir, data_dir):
    """Both seeds from nothing. It also records, at each prune or fine-tune stage, how many models that eval
    stages loaded are still alive (seed 1's prunes run after seed 0's evaluations)."""
    import weakref

    from hybridprune.sparse import load as loader
    root = tmp_path_factory.mktemp("seeds")
    path = root / "r.yaml"
    path.write_text(SEEDS_RECIPE.format(model=tiny_llama_dir, seeds="[0, 1]"))
    evaluated, alive, load, run_stage = [], [], loader.load_model, experiment._run_stage

    def loading(spec, *a, **k):
        model, tok = load(spec, *a, **k)
        evaluated.append(weakref.ref(model))
        return model, tok

    def running(stage, *a):
        run_stage(stage, *a)
        if stage.kind != "eval":  # counted after the stage ran with whatever the previous ones left
            alive.append(sum(r() is not None for r in evaluated))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader, "load_model", loading)
        mp.setattr(experiment, "_run_stage", running)
        res = experiment.run_experiment(path, root / "run", isolate=False, log=lambda *a: None)
    (root / "alive.json").write_text(json.dumps({"alive": alive, "evaluated": len(evaluated)}))
    return root, res


def test_prune_and_finetune_stages_do_not_hold_an_evaluated_model(two_seeds):
    """The study's peak RSS is its largest stage, not that stage plus the last model it evaluated."""
    root, _ = two_seeds
    seen = json.loads((root / "alive.json").read_text())
    assert seen["evaluated"] >= 3 and len(seen["alive"]) == 5  # 2 seeds x 2 calibrations + magnitude
    assert seen["alive"] == [0] * 5, seen


def test_seeds_axis_report(two_seeds):
    root, res = two_seeds
    assert res["seeds"] == [0, 1]
    runs = res["runs"]
    wiki = runs["pruned-wiki"]
    assert set(wiki["seeds"]) == {0, 1}
    per = [wiki["seeds"][s]["wikitext2"]["ppl"] for s in (0, 1)]
    assert per[0] != per[1]  # another calibration draw, another model
    assert wiki["tasks"]["wikitext2"]["ppl"] == pytest.approx(np.mean(per))
    assert wiki["tasks"]["wikitext2"]["ppl_sd"] == pytest.approx(np.std(per, ddof=1))
    assert runs["dense"]["tasks"]["wikitext2"]["ppl_sd"] == 0  # the dense model is evaluated once
    pair = next(p for p in res["pairs"] if p["task"] == "wikitext2" and {p["a"], p["b"]} == {"pruned-wiki",
                                                                                          "pruned-squad"})
    nll = {r: [runs[r]["seeds"][s]["wikitext2"]["per_example"]["nll"] for s in (0, 1)]
           for r in ("pruned-wiki", "pruned-squad")}
    sign = 1 if pair["a"] == "pruned-wiki" else -1
    by_hand = np.mean([np.mean(np.subtract(w, q)) for w, q in zip(nll["pruned-wiki"], nll["pruned-squad"])])
    assert sign * pair["diff"] == pytest.approx(by_hand) and pair["units"] == 24 and pair["judged"]
    assert len(pair["seed_intervals"]) == 2
    claim = res["claims"][0]["results"][0]
    assert claim["status"] in ("supported", "refuted", "inconclusive") and claim["of_seeds"] == 2
    assert res["claims"][1]["results"][0]["status"] == "too few to judge"  # 6 BoolQ questions
    summary = res["overlap"]["unstructured"]["summary"]
    assert {"squad vs wiki (same seed)", "wiki: seed vs seed", "squad: seed vs seed", "wiki vs magnitude"} <= set(summary)
    assert all(0 < v["mean"] < 1 for v in summary.values())
    text = (root / "run" / "report.md").read_text()
    assert "### Each seed's value" in text and "holds in" in text and "wiki: seed vs seed" in text
    csv_rows = (root / "run" / "results.csv").read_text().splitlines()
    assert any(r.startswith("pruned-wiki,wikitext2,ppl,mean,") for r in csv_rows)


def test_one_more_seed_computes_only_that_seed(two_seeds, tmp_path, tiny_llama_dir, monkeypatch):
    import shutil
    root, _ = two_seeds
    shutil.copytree(root / "run", tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(SEEDS_RECIPE.format(model=tiny_llama_dir, seeds="[0, 1, 2]"))
    ran, real = [], experiment._run_stage
    monkeypatch.setattr(experiment, "_run_stage", lambda st, *a: ran.append(st) or real(st, *a))
    res = experiment.run_experiment(path, tmp_path / "run", isolate=False, log=lambda *a: None)
    assert sorted(s.kind for s in ran) == ["eval"] * 4 + ["prune"] * 2  # 2 pruned models x 2 tasks; dense as before
    assert all("seed 2" in s.label for s in ran) and res["seeds"] == [0, 1, 2]


def test_partial_report_never_mixes_standard_errors_into_seed_spreads(two_seeds, tmp_path, tiny_llama_dir):
    """A report written while only seed 0 of [0, 7] exists shows values without a spread (the table's header
    promises between-seed SDs), not seed 0's standard errors over examples, and the sparsity and stage times of
    the seeds that exist."""
    import shutil
    root, _ = two_seeds
    shutil.copytree(root / "run", tmp_path / "run")
    path = tmp_path / "r.yaml"
    path.write_text(SEEDS_RECIPE.format(model=tiny_llama_dir, seeds="[0, 7]"))
    res = experiment.run_experiment(path, tmp_path / "run", only="report", log=lambda *a: None)
    wiki = res["runs"]["pruned-wiki"]
    assert wiki["sparsity"] == pytest.approx(0.5, abs=0.01) and wiki["seconds"]["prune"] > 0  # from seed 0 alone
    entry = wiki["tasks"]["boolq"]
    assert entry["acc_stderr"] > 0 and "acc_sd" not in entry  # one seed's entry, as stored
    overlap = res["overlap"]["unstructured"]
    pair = overlap["pairs"].get("wiki/seed 0 vs squad/seed 0") or overlap["pairs"]["squad/seed 0 vs wiki/seed 0"]
    summary = overlap["summary"]  # from the seed that exists
    assert summary["squad vs wiki (same seed)"]["values"] == [pair["overall"]]
    assert "wiki: seed vs seed" not in summary
    text = (tmp_path / "run" / "report.md").read_text()
    assert "between-seed SD" in text
    row = next(line for line in text.splitlines() if line.startswith("| pruned-wiki |"))
    assert f"{entry['acc']:.4g}" in row and "±" not in row
