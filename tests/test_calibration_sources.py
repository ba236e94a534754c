"""Calibration text the model writes itself (self, self:SOURCE) and windows selected for diversity."""
import json
import math

import pytest
import torch

import hybridprune as hp
from hybridprune.core.config import PruneConfig
from hybridprune.core.errors import HybridPruneError
from hybridprune.experiments import experiment
from hybridprune.io import data
from hybridprune.pruning import calibration

from conftest import tiny_model


@pytest.fixture(scope="module")
def smol(default_model_dir):
    return hp.load(str(default_model_dir))


def _eval_texts(root) -> list[str]:
    """Evaluation examples: WikiText-2 test lines and SQuAD evaluation-half questions and contexts."""
    lines = [ln.strip() for ln in data.wikitext2_rows("test", root) if len(ln.strip()) > 40]
    squad = data.squad_examples("eval", root)
    return lines + [r["question"] for r in squad] + list({r["context"] for r in squad})


def test_self_text_is_the_same_for_a_seed_and_holds_no_evaluation_example(smol, data_dir):
    config = PruneConfig(calib="self", nsamples=3, seqlen=40, seed=0, data_dir=str(data_dir))
    a = calibration.draw(smol.tokenizer, config, smol.model)
    b = calibration.draw(smol.tokenizer, config, smol.model)
    c = calibration.draw(smol.tokenizer, PruneConfig(**{**config.__dict__, "seed": 1}), smol.model)
    assert torch.equal(a.samples, b.samples) and a.texts == b.texts
    assert not torch.equal(a.samples, c.samples)
    assert a.samples.shape == (3, 40)
    assert (a.samples[:, 0] == smol.tokenizer.bos_token_id).all()  # Williams et al.: from the BOS token alone
    generated = " ".join(r["text"] for r in a.texts)
    assert generated.strip()
    for example in _eval_texts(data_dir):
        assert example not in generated
    info = a.record["generated"][0]
    assert info["temperature"] == {"start": 1.5, "end": 1.0, "steps": 32} and info["dropped"] == 0


def test_self_text_does_not_depend_on_the_batch(smol, data_dir):
    """Each sequence samples from a stream of its own: in float32, --self-batch changes speed, never the text."""
    draws = [calibration.draw(smol.tokenizer, PruneConfig(calib="self", nsamples=3, seqlen=24, seed=5,
                                                           data_dir=str(data_dir), self_dtype="float32", **extra),
                              smol.model)
             for extra in ({}, {"self_batch": 1}, {"self_batch": 2})]
    for d in draws[1:]:
        assert torch.equal(d.samples, draws[0].samples)
    assert len({tuple(row.tolist()) for row in draws[0].samples}) == 3  # and the rows differ from each other


def test_generation_runs_linear_layers_weights_first_with_the_same_results(monkeypatch):
    """_WeightsFirst computes F.linear as (W @ x.T).T (a wide weight in slices) at 2-128 fp32 rows on the CPU: equal
    to F.linear within float rounding, bias and leading dimensions included; one row, bf16 and wider inputs are
    left to F.linear; and generate() runs under it."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(calibration._WeightsFirst, "SLICE", 40)  # 100 output rows: slices of 40, 40 and 20
    w, b = torch.randn(100, 24, generator=g), torch.randn(100, generator=g)
    for shape in ((2, 24), (3, 5, 24), (128, 24)):
        x = torch.randn(*shape, generator=g)
        with calibration._WeightsFirst():
            got, got_nobias = F.linear(x, w, b), F.linear(x, w)
        assert got.shape == (*shape[:-1], 100)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_nobias, F.linear(x, w), rtol=1e-5, atol=1e-5)
    calls = []
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or torch.concat(*a, **k))
    with calibration._WeightsFirst():
        for x, weight in ((torch.randn(1, 24), w), (torch.randn(129, 24), w),
                          (torch.randn(4, 24).bfloat16(), w.bfloat16())):
            F.linear(x, weight)
        assert not calls  # none of them took the weights-first path
        F.linear(torch.randn(4, 24), w)
        assert calls
    modes = []
    real = calibration._WeightsFirst.__torch_function__
    monkeypatch.setattr(calibration._WeightsFirst, "__torch_function__",
                        lambda self, func, types, args=(), kwargs=None:
                        modes.append(func) or real(self, func, types, args, kwargs))
    model = tiny_model("llama")
    calibration.generate(model, torch.zeros(2, 1, dtype=torch.long), 4, (1.0, 1.0, 0), 0, 2)
    assert F.linear in modes


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2", "opt", "gpt_neox"])
def test_generation_attends_only_to_written_positions_with_the_same_results(family, monkeypatch):
    """_FilledPositions: attention over the written part of the static cache gives the tokens and log-likelihoods
    of the model's own masked attention over the whole cache, for a one-token prompt and a three-token one (a causal
    prefill step), in each family; the model's attention implementation is restored afterwards; and a model it
    would not compute the same for (eager attention, a sliding window shorter than the text) is left alone."""
    model = tiny_model(family)
    assert model.config._attn_implementation == "sdpa"
    used = []
    real_attend = calibration._FilledPositions.attend
    monkeypatch.setattr(calibration._FilledPositions, "attend",
                        lambda self, *a, **k: used.append(self.end) or real_attend(self, *a, **k))
    for prompt in (torch.zeros(3, 1, dtype=torch.long), torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])):
        ids, nll = calibration.generate(model, prompt, 20, (1.0, 1.0, 0), 0, 2)
        assert model.config._attn_implementation == "sdpa"
        assert used and max(used) == 19 and min(used) == prompt.shape[1]
        used.clear()
        with monkeypatch.context() as m:
            m.setattr(calibration._FilledPositions, "__enter__", lambda self: self)  # the whole cache, masked
            whole_ids, whole_nll = calibration.generate(model, prompt, 20, (1.0, 1.0, 0), 0, 2)
        assert not used
        assert torch.equal(ids, whole_ids)
        torch.testing.assert_close(nll, whole_nll, rtol=0, atol=1e-6)
    model.set_attn_implementation("eager")
    assert not calibration._FilledPositions(model, 20).eligible
    model.set_attn_implementation("sdpa")
    if family == "mistral":
        assert calibration._FilledPositions(model, model.config.sliding_window).eligible
        assert not calibration._FilledPositions(model, model.config.sliding_window + 1).eligible


def test_bfloat16_generation_multiplies_bfloat16_copies_and_leaves_the_weights(smol, data_dir, monkeypatch):
    """_Bfloat16Linears: F.linear on fp32 operands equals the product of their bfloat16 roundings (fp32 sums), bias
    added in fp32, over leading dimensions; the weight keeps its fp32 values and the copies go when the mode ends.
    auto picks bfloat16 only where the CPU has AVX512_BF16 or AMX. A bfloat16 self draw is the same for a seed,
    records its dtype and batch, and scores its sequences differently from float32's (the text may coincide)."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    before = w.clone()
    for shape in ((1, 24), (3, 5, 24), (130, 24)):
        x = torch.randn(*shape, generator=g)
        with calibration._Bfloat16Linears() as mode:
            got = F.linear(x, w, b)
            assert len(mode.copies) == 1
        want = F.linear(x.bfloat16(), w.bfloat16()).float() + b
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert not torch.equal(got, F.linear(x, w, b))
        assert not mode.copies and torch.equal(w, before)
    for flags, want in ((set(), torch.float32), ({"avx2", "avx512f"}, torch.float32),
                        ({"avx512_bf16"}, torch.bfloat16), ({"amx_bf16"}, torch.bfloat16)):
        monkeypatch.setattr(calibration.specs, "cpu_flags", lambda f=frozenset(flags): f)
        assert calibration.generation_dtype("auto", torch.device("cpu")) == want
        assert calibration.generation_dtype("float32", torch.device("cpu")) == torch.float32
    monkeypatch.undo()
    config = PruneConfig(calib="self", nsamples=2, seqlen=24, seed=3, data_dir=str(data_dir), self_dtype="bfloat16")
    a, again = (calibration.draw(smol.tokenizer, config, smol.model) for _ in range(2))
    fp32 = calibration.draw(smol.tokenizer, PruneConfig(**{**config.__dict__, "self_dtype": "float32"}), smol.model)
    assert torch.equal(a.samples, again.samples)
    # bfloat16 products score every sequence differently; the sampled text itself may coincide with float32's
    # (2 x 24 tokens: on an Intel Xeon no rounding moved a sample across a token boundary)
    assert [t["ppl"] for t in a.texts] == [t["ppl"] for t in again.texts]
    assert all(x["ppl"] != y["ppl"] for x, y in zip(a.texts, fp32.texts, strict=True))
    assert (a.record["generated"][0]["matmul_dtype"], a.record["generated"][0]["batch"]) == ("bfloat16", 32)
    assert fp32.record["generated"][0]["matmul_dtype"] == "float32"


def test_sampling_draws_from_the_tempered_softmax():
    """40,000 draws from one row: frequencies within 0.01 of softmax(logits / t) at t = 1 and 2, and a token of
    probability zero (logit -inf) never drawn."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    for t in (1.0, 2.0):
        gen = [torch.Generator().manual_seed(7)]
        draws = torch.cat([calibration.sample(logits, t, gen) for _ in range(40_000)]).flatten()
        freq = torch.bincount(draws, minlength=5).double() / len(draws)
        want = torch.softmax(logits[0].double() / t, -1)
        assert (freq - want).abs().max() < 0.01, (t, freq, want)
        assert freq[4] == 0


def test_self_source_drops_exactly_the_share_it_states(smol, data_dir):
    for share, made in ((0.2, 10), (0.5, 16), (0.0, 8)):
        config = PruneConfig(calib="self:wikitext2", nsamples=8, seqlen=32, self_filter=share, self_prefix=8,
                             data_dir=str(data_dir))
        cal = calibration.draw(smol.tokenizer, config, smol.model)
        assert made == calibration.kept_count(8, share) == math.ceil(8 / (1 - share))
        assert len(cal.texts) == made and sum(r["kept"] for r in cal.texts) == 8
        info = cal.record["generated"][0]
        assert (info["sequences"], info["kept"], info["dropped"]) == (made, 8, made - 8)
        kept = [r["ppl"] for r in cal.texts if r["kept"]]
        dropped = [r["ppl"] for r in cal.texts if not r["kept"]]
        assert not dropped or max(kept) <= min(dropped)  # the dropped ones are the most perplexing
        assert cal.samples.shape == (8, 32)
        # the prefixes come from the fitting split, whose windows data.source_windows draws with the same seed
        prefixes = data.source_windows(smol.tokenizer, "wikitext2", made, 8, 0, data_dir)
        kept_rows = [i for i, r in enumerate(cal.texts) if r["kept"]]
        assert torch.equal(cal.samples[:, :8], prefixes[kept_rows])


def test_recorded_perplexity_is_the_models_own(smol, data_dir):
    """The ppl the filter ranks by is the model's at temperature 1, whatever temperature sampled the token: it
    equals a teacher-forced forward over the generated tokens (self samples at 1.5 falling to 1.0 here)."""
    config = PruneConfig(calib="self", nsamples=2, seqlen=24, data_dir=str(data_dir), self_dtype="float32")
    cal = calibration.draw(smol.tokenizer, config, smol.model)
    with torch.no_grad():
        logits = smol.model(cal.samples).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), cal.samples[:, 1:], reduction="none").mean(1)
    ppl = torch.tensor([r["ppl"] for r in cal.texts], dtype=torch.float64)
    assert torch.allclose(ppl.log(), nll.double(), atol=1e-3)


def test_diversity_selection_hand_checked():
    pool = torch.tensor([[1, 1, 1, 1], [1, 2, 3, 1], [4, 5, 6, 4], [1, 2, 4, 4], [7, 7, 7, 7]])
    assert data.select_diverse(pool, 2).tolist() == [1, 2]       # {1,2,3} then {4,5,6}: six token ids
    assert data.select_diverse(pool, 3).tolist() == [1, 2, 4]    # then {7}: the only new one left
    assert data.lexical_coverage(pool[[1, 2]]) == 6
    with pytest.raises(HybridPruneError):
        data.select_diverse(pool, 6)


def test_generated_text_with_any_line_separator_survives_the_cache(tmp_path):
    # a model can write U+2028, U+2029 or U+0085: json.dumps keeps them as they are, and str.splitlines() cuts at them
    rows = [{"source": "self", "text": f"one{sep}two", "prefix": "", "ppl": 3.5, "kept": True}
            for sep in ("\u2028", "\u2029", "\x85", "\x1c", "\r", "\n")]
    cal = calibration.Calibration(torch.zeros(6, 4, dtype=torch.long), "always", {"source": "self"}, rows)
    calibration.save(cal, tmp_path / "c")
    again = calibration.load(tmp_path / "c")
    assert again.texts == rows and torch.equal(again.samples, cal.samples)


def test_diversity_selection_beats_a_random_draw(default_tokenizer, data_dir):
    pool = data.calibration_samples(default_tokenizer, "wikitext2", 64, 128, seed=3, data_dir_path=data_dir)
    chosen = data.calibration_samples(default_tokenizer, "wikitext2", 16, 128, seed=3, data_dir_path=data_dir,
                                      select="diversity", pool=64)
    assert chosen.shape == (16, 128)
    assert all(any(torch.equal(w, p) for p in pool) for w in chosen)  # picked from the pool, not made up
    gen = torch.Generator().manual_seed(0)
    random_scores = [data.lexical_coverage(pool[torch.randperm(64, generator=gen)[:16]]) for _ in range(50)]
    assert data.lexical_coverage(chosen) > max(random_scores)
    # random selection is the default and draws exactly as before
    assert torch.equal(data.calibration_samples(default_tokenizer, "wikitext2", 16, 128, seed=3, data_dir_path=data_dir),
                       pool[:16])


def test_a_model_without_an_lm_head_is_refused_for_self(default_tokenizer, data_dir):
    from transformers import AutoModel
    from conftest import tiny_config
    base = AutoModel.from_config(tiny_config("llama", vocab=len(default_tokenizer)))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(HybridPruneError, match="has no LM head to generate with; use a causal LM"):
        hp.prune(hp.PrunedModel(base, default_tokenizer), calib="self", nsamples=2, seqlen=8)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # refused before pruning
    lm = tiny_model("llama")  # a causal LM is accepted
    calibration.check_can_generate(lm)


def test_self_text_is_saved_beside_the_pruned_model(tiny_llama_dir, tmp_path, data_dir):
    pm = hp.prune(hp.load(str(tiny_llama_dir)), calib="mixed:self:wikitext2=0.5,wikitext2=0.5", nsamples=4,
                  seqlen=32, self_prefix=4, data_dir=str(data_dir))
    out = hp.save(pm, tmp_path / "m")
    rows = [json.loads(line) for line in (out / "calibration.jsonl").read_text().splitlines()]
    assert len(rows) == calibration.kept_count(2, 0.2) and sum(r["kept"] for r in rows) == 2
    record = json.loads((out / "hybridprune.json").read_text())
    assert record["calibration"]["generated"][0]["source"] == "self:wikitext2"
    assert record["calibration"]["file"] == "calibration.jsonl"


SOURCES_RECIPE = """\
model: {model}
prune: {{method: wanda, nsamples: 4, seqlen: 32}}
patterns:
  u50: {{pattern: unstructured, sparsity: 0.5}}
  nm24: {{pattern: "2:4"}}
calibration:
  wiki: wikitext2
  self: self
  self-wiki: self:wikitext2
  wiki-div: {{calib: wikitext2, calib_select: diversity}}
runs:
  - {{name: magnitude, calibration: magnitude}}
  - {{name: wiki, calibration: wiki}}
  - {{name: self, calibration: self}}
  - {{name: self-wiki, calibration: self-wiki}}
  - {{name: wiki-div, calibration: wiki-div}}
tasks:
  wikitext2: {{windows: 20, seqlen: 16}}
eval: {{batch_size: 4}}
claims:
  - self <= wiki on wikitext2.ppl
  - magnitude < wiki on wikitext2.ppl
quick:
  prune: {{nsamples: 2, seqlen: 24, self_prefix: 4}}
  tasks: {{windows: 20, seqlen: 16}}
notes: |
  Budgets: tiny, so that the test runs in seconds.
"""


def test_a_recipe_with_the_new_sources_runs_in_the_quick_profile(tiny_llama_dir, data_dir, tmp_path):
    (tmp_path / "r.yaml").write_text(SOURCES_RECIPE.format(model=tiny_llama_dir))
    out = tmp_path / "run"
    results = experiment.run_experiment(tmp_path / "r.yaml", out, quick=True, isolate=False, log=lambda *a: None)
    # generated once per seed and shared by both patterns
    assert len(list((out / "stages").glob("calibration-*"))) == 2
    pruned = [p for p in (out / "stages").glob("prune-*") if (p / "calibration.jsonl").is_file()]
    assert len(pruned) == 4
    ranking = results["ranking"]
    assert set(ranking) == {"u50", "nm24"}
    ranked = ranking["u50"]["tasks"]["wikitext2.ppl"]
    assert {r["run"] for r in ranked} == {f"{n}@u50" for n in ("magnitude", "wiki", "self", "self-wiki", "wiki-div")}
    assert [r["value"] for r in ranked] == sorted(r["value"] for r in ranked)
    assert all("interval" in r for r in ranked[1:])
    claims = {c["claim"]: c for c in results["claims"]}
    assert len(claims["magnitude < wiki on wikitext2.ppl"]["results"]) == 2  # one per pattern
    text = (out / "report.md").read_text()
    assert "Sources ranked per pattern" in text and "Spread between calibration sources" in text
    # the recipe's notes and the calibration budget of the profile that ran head the report
    assert "Budgets: tiny, so that the test runs in seconds." in text
    assert "Calibration per prune: 2 windows of 24 tokens (48 tokens)." in text


def test_the_shipped_sources_recipe_plans_the_study():
    from pathlib import Path
    recipe = experiment.load_recipe(Path(__file__).parents[1] / "recipes/calibration-sources.yaml")
    assert recipe.seeds == [0, 1, 2]
    assert set(recipe.patterns) == {"u50", "u70", "nm24", "three-tier"}
    specs = {k: v["calib"] for k, v in recipe.calibration.items()}
    assert specs == {"wiki": "wikitext2", "c4": "c4", "squad": "squad", "gsm8k": "gsm8k", "self": "self",
                     "self-wiki": "self:wikitext2", "wiki-div": "wikitext2"}
    assert recipe.calibration["wiki-div"]["calib_select"] == "diversity"
    stages, by_run, pruned = experiment.plan(recipe, Path("/nonexistent"))
    prunes = [s for s in stages if s.kind == "prune"]
    assert len(prunes) == 7 * 4 * 3 + 4  # every source x pattern x seed, and magnitude once per pattern
    assert recipe.tasks["squad"]["generate"] is False and recipe.tasks["gsm8k"]["generate"] is False
