"""Evidence that holds: seeds as an axis, examples spread over the split, clustered and two-level intervals,
no verdict from too few units, and log-likelihoods / perplexity whose memory does not grow with the vocabulary."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from hybridprune.experiments import experiment
from hybridprune.experiments import report
from hybridprune.experiments.recipe import CLAIM, Claim
from hybridprune.experiments.stats import MIN_UNITS, paired_bootstrap, seeds_bootstrap


# ----------------------------------------------------------------------------- which examples

def test_spread_sample_covers_the_articles(data_dir):
    from hybridprune.evaluation.tasks import PER_CLUSTER, cluster_ids, spread_sample, task_rows
    rows = task_rows("squad", data_dir)
    first = [rows[i]["title"] for i in range(100)]
    assert len(set(first)) == 1  # lm-eval's --limit 100: one article (the finding)
    idx = spread_sample("squad", rows, 96, seed=0)
    assert len(idx) == 96 and idx == sorted(set(idx)) and idx == spread_sample("squad", rows, 96, seed=0)
    titles = {rows[i]["title"] for i in idx}
    articles = {r["title"] for r in rows}
    assert titles == articles and len(articles) == 24  # every eval-half article: 2 paragraphs x 2 questions
    per_paragraph = np.bincount(cluster_ids("squad", rows, idx))
    assert per_paragraph.max() <= PER_CLUSTER and len(per_paragraph) == 48
    assert spread_sample("squad", rows, 96, seed=1) != idx
    import collections
    per_context = collections.Counter(r["context"] for r in rows)  # more than there is: every paragraph, 2 each
    assert len(spread_sample("squad", rows, 10**6)) == sum(min(PER_CLUSTER, c) for c in per_context.values())
    g = task_rows("gsm8k", data_dir)
    sample = spread_sample("gsm8k", g, 30, seed=0)
    assert len(sample) == 30 and sample != list(range(30)) and len(set(cluster_ids("gsm8k", g, sample))) == 30


def test_eval_sample_records_docs_and_clusters(data_dir, default_tokenizer):
    from conftest import tiny_model
    from hybridprune.evaluation.tasks import cluster_ids, evaluate_model, spread_sample, task_rows
    model = tiny_model("llama", vocab=len(default_tokenizer), hidden=48, inter=96)
    res = evaluate_model(model, default_tokenizer, ["boolq"], sample=6, sample_seed=3, batch_size=4,
                         data_dir_path=data_dir)["boolq"]
    rows = task_rows("boolq", data_dir)
    want = spread_sample("boolq", rows, 6, seed=3)
    assert res["doc_ids"] == want and res["n"] == 6 and res["clusters"] == cluster_ids("boolq", rows, want)
    assert len(res["per_example"]["acc"]) == 6 and "seeded sample of 6" in res["selection"]
    # the scored prompts are the sampled documents', in doc order
    first = evaluate_model(model, default_tokenizer, ["boolq"], limit=want[0] + 1, batch_size=4,
                           data_dir_path=data_dir)["boolq"]
    assert res["per_example"]["margin"][0] == pytest.approx(first["per_example"]["margin"][-1], rel=1e-5)


# ----------------------------------------------------------------------------- intervals

def test_cluster_bootstrap_moves_clusters_together():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    plain = paired_bootstrap(a, b, seed=5)
    # every example twice, each pair one cluster: exactly the plain bootstrap of the originals
    twice = paired_bootstrap(np.repeat(a, 2), np.repeat(b, 2), seed=5, clusters=np.repeat(np.arange(30), 2))
    assert (twice["lo"], twice["hi"], twice["units"], twice["n"]) == (plain["lo"], plain["hi"], 30, 60)
    # resampled one by one, the duplicates look like 60 independent units and the interval is too narrow
    naive = paired_bootstrap(np.repeat(a, 2), np.repeat(b, 2), seed=5)
    assert naive["hi"] - naive["lo"] < 0.8 * (twice["hi"] - twice["lo"])


def test_two_level_bootstrap_covers_the_seed_spread():
    a = [np.full(40, v) for v in (0.1, 0.5, 0.9)]  # each seed's difference is constant: no example noise
    b = [np.zeros(40)] * 3
    per_seed = [paired_bootstrap(x, y) for x, y in zip(a, b)]
    assert all(r["lo"] == r["hi"] for r in per_seed)  # one seed alone: a zero-width interval
    r = seeds_bootstrap(a, b)
    assert r["diff"] == pytest.approx(0.5) and 0.1 <= r["lo"] < 0.5 < r["hi"] <= 0.9 and r["seeds"] == 3
    assert r["per_seed"] == pytest.approx([0.1, 0.5, 0.9])
    with pytest.raises(ValueError):
        seeds_bootstrap(a, b, clusters=[0, 1])


def test_claims_need_enough_units_and_count_seeds():
    pair = {"task": "squad", "metric": "f1", "a": "exp2", "b": "exp1", "diff": 2.0, "lo": 0.5, "hi": 3.5,
            "per_seed": [3.0, 1.0, 2.0], "seed_intervals": [[1.0, 5.0], [-1.0, 3.0], [0.2, 4.0]]}

    def judge(units):
        text = "exp2 > exp1 on squad.f1"
        c = Claim(text, *CLAIM.match(text).groups(), line=1)
        return report._judge(c, [{**pair, "units": units}], ["exp1", "exp2"])["results"][0]
    ok = judge(MIN_UNITS)
    assert ok["status"] == "supported" and (ok["holds_in"], ok["of_seeds"]) == (2, 3)
    assert ok["per_seed_diff"] == [3.0, 1.0, 2.0]
    assert judge(MIN_UNITS - 1)["status"] == "too few to judge"


# ----------------------------------------------------------------------------- the seed axis, end to end

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

# ----------------------------------------------------------------------------- numbers and memory

def test_perplexity_equals_a_float64_reference():
    from conftest import tiny_model
    from hybridprune.evaluation.ppl import perplexity
    model = tiny_model("llama", vocab=300)
    ids = torch.randint(0, 300, (6 * 40,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids=ids, seqlen=40, batch_size=4, progress=False)
    with torch.no_grad():
        logits = model(ids.reshape(6, 40)).logits.double()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), ids.reshape(6, 40)[:, 1:].reshape(-1),
                                            reduction="none").reshape(6, -1).mean(1)
    assert res["window_nll"] == pytest.approx(ref.tolist(), rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_loglikelihood_equals_stock_lm_eval(family, default_tokenizer, monkeypatch):
    """Our continuation-only log-likelihoods against lm-eval's own HFLM on the same requests: sums to 1e-6
    relative and the same greedy flags, also with logits made 5 positions at a time, batches split by the token
    budget, and a request longer than the context (truncated from the left)."""
    from conftest import tiny_model
    from lm_eval.models.huggingface import HFLM
    from hybridprune.evaluation import ppl as evaluate
    from hybridprune.evaluation.tasks import _lm_class
    vocab = len(default_tokenizer)
    model = tiny_model(family, vocab=vocab, hidden=32, inter=64)
    g = torch.Generator().manual_seed(1)
    reqs = []
    for n_ctx, n_cont in [(5, 1), (30, 3), (12, 12), (7, 1), (3, 2), (40, 5)]:
        reqs.append((None, torch.randint(1, vocab, (n_ctx,), generator=g).tolist(),
                     torch.randint(1, vocab, (n_cont,), generator=g).tolist()))
    with torch.no_grad():  # a continuation the model predicts greedily: is_greedy must be True there
        best = int(model(torch.tensor([reqs[0][1]])).logits[0, -1].argmax())
    reqs.append((None, reqs[0][1], [best]))
    monkeypatch.setattr(evaluate, "CHUNK_BYTES", 4 * vocab * 5)
    monkeypatch.setattr(evaluate, "TOKENS_PER_PASS", 64)

    def make(cls):
        return cls(pretrained=model, tokenizer=default_tokenizer, batch_size=3, max_length=32)
    ours = make(_lm_class())._loglikelihood_tokens(reqs, disable_tqdm=True)
    stock = HFLM._loglikelihood_tokens(make(HFLM), reqs, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in stock] and ours[-1][1]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in stock], rel=1e-6)


def test_memory_does_not_grow_with_the_vocabulary(tmp_path):
    """A tiny model with Gemma's 262,144-token vocabulary: 4 windows of 1,024 tokens at batch 4 would be 4.3 GB
    of fp32 logits (and as much again for their log-softmax); chunked, the whole process stays under 1.5 GB."""
    script = textwrap.dedent("""
        import resource, sys, torch
        sys.path.insert(0, sys.argv[1])
        from conftest import tiny_model
        from hybridprune.evaluation.ppl import perplexity
        model = tiny_model("llama", vocab=262144, hidden=32, inter=64)
        ids = torch.randint(0, 262144, (4 * 1024,), generator=torch.Generator().manual_seed(0))
        res = perplexity(model, ids=ids, seqlen=1024, batch_size=4, progress=False)
        print(res["ppl"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    from pathlib import Path
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True,
                         check=True, timeout=600)
    ppl, kb = out.stdout.split()
    assert np.isfinite(float(ppl)) and int(kb) < 1.5 * 2**20, f"peak RSS {int(kb) / 2**20:.2f} GB"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_capped_heap_gives_freed_tensors_back():
    """After one large tensor was freed, glibc serves 8 MB tensors from its heap; freed between live ones they stay
    resident (540 MB here for 60 MB alive). With the cap (every command and experiment sets it), they go back to
    the OS when freed."""
    script = textwrap.dedent("""
        import re, sys, torch
        from hybridprune.core.heap import cap_heap_growth
        def rss():
            return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) >> 10
        if sys.argv[1] == "cap":
            assert cap_heap_growth()
        big = torch.ones(16 << 18); del big          # a 16 MB mapping freed: glibc raises its threshold
        before = rss()
        tensors, kept = [], []
        for _ in range(60):                           # 8 MB tensors, each followed by a 1 MB one that stays
            tensors.append(torch.ones(2 << 20))
            kept.append(torch.ones(1 << 18))
        del tensors
        print(rss() - before)
    """)
    grown = {mode: int(subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                                      check=True, timeout=120).stdout.split()[-1]) for mode in ("plain", "cap")}
    if grown["plain"] < 300:
        pytest.skip(f"this malloc returns freed memory by itself ({grown})")
    assert grown["cap"] < 120, grown  # the 60 MB still alive


def test_heap_cap_also_caps_onednns_primitive_cache(monkeypatch):
    """bf16 matmuls on a CPU go through oneDNN, which keeps built primitives (with their buffers) for every shape
    it has seen: 1,024 by default, which raised a bf16 SQuAD LoRA stage by 0.6 GiB. The cap keeps 32, unless the
    user chose a number."""
    from hybridprune.core.heap import ONEDNN_PRIMITIVES, cap_heap_growth
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    cap_heap_growth()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_PRIMITIVES) == "32"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")
    cap_heap_growth()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
