import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_model, tiny_tokenizer

from hybridprune.core.errors import HybridPruneError
from hybridprune.evaluation.tasks import (
    normalize_answer,
    parse_tasks,
    squad_f1,
    squad_scores,
    task_config,
)
from hybridprune.finetuning.finetune import render


@pytest.mark.parametrize("text,norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  a  cat, an owl and THE dog. ", "cat owl and dog"),
    ("Theater", "theater"),           # articles only as whole words
    ("1,000 $", "1000"),
    ("", ""),
])
def test_squad_normalisation(text, norm):
    assert normalize_answer(text) == norm


def test_squad_scores_hand_checked():
    assert squad_scores("the Denver Broncos", ["Denver Broncos", "Broncos"]) == {"exact_match": 100.0, "f1": 100.0}
    # "denver broncos won" vs "broncos": P = 1/3, R = 1, F1 = 0.5; max over golds picks "Denver Broncos": 0.8
    s = squad_scores("Denver Broncos won", ["Broncos", "Denver Broncos"])
    assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(80.0)
    assert squad_f1("", "Broncos") == 0.0 and squad_f1("the", "a") == 0.0  # empty after normalisation
    assert squad_scores("", ["x"]) == {"exact_match": 0.0, "f1": 0.0}
    with pytest.raises(HybridPruneError):
        squad_scores("x", [])


def _apply_filters(cfg, text):
    from lm_eval.filters.extraction import RegexFilter
    out = {}
    for f in cfg["filter_list"]:
        rx = f["filter"][0]
        flt = RegexFilter(regex_pattern=rx["regex_pattern"], group_select=rx.get("group_select", 0))
        out[f["name"]] = list(flt.apply([[text]], [{}]))[0][0]
    return out


@pytest.mark.parametrize("text,strict,flexible", [
    ("She pays 3 x 2 = 6 dollars.\n#### 6", "6", "6"),
    ("It costs $1,250 in total.\n#### 1,250\n", "1,250", "1,250"),
    ("First 12, then 15, so the answer is 18.", "[invalid]", "18."),
    ("#### -4 degrees", "-4", "-4"),
])
def test_gsm8k_extraction_hand_checked(data_dir, text, strict, flexible):
    got = _apply_filters(task_config("gsm8k"), text)
    assert got == {"strict-match": strict, "flexible-extract": flexible}


def test_task_errors(tmp_path):
    with pytest.raises(HybridPruneError, match="unknown task"):
        parse_tasks("squad,mmlu")
    with pytest.raises(HybridPruneError, match="superglue_val.jsonl"):
        task_config("boolq", data_dir_path=tmp_path)
    with pytest.raises(HybridPruneError, match="gsm8k-mode"):
        task_config("gsm8k", gsm8k_mode="cot")


def test_squad_task_uses_only_the_evaluation_half(data_dir):
    from hybridprune.io.data import squad_examples
    cfg = task_config("squad")
    path = cfg["dataset_kwargs"]["data_files"]["test"]
    ids = {json.loads(line)["id"] for line in open(path)}
    assert ids == {r["id"] for r in squad_examples("eval", data_dir)}
    assert not ids & {r["id"] for r in squad_examples("fit", data_dir)}


def test_boolq_equals_direct_loglikelihood(tiny_llama_dir, data_dir, tmp_path):
    """lm-eval's BoolQ accuracy on a tiny random model equals choosing ' no'/' yes' by our own log-likelihood."""
    from hybridprune import load_model
    from hybridprune.evaluation.tasks import evaluate_model
    from hybridprune.io.data import boolq_examples
    model, tok = load_model(str(tiny_llama_dir))
    res = evaluate_model(model, tok, ["boolq"], limit=6, batch_size=3, samples_path=tmp_path / "s.jsonl")
    docs = boolq_examples("validation", data_dir)[:6]
    correct = []
    with torch.no_grad():
        for d in docs:
            ctx = f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"
            lls = []
            for choice in (" no", " yes"):
                c_ids = tok(ctx, add_special_tokens=False)["input_ids"]
                full = tok(ctx + choice, add_special_tokens=False)["input_ids"]
                cont = full[len(c_ids):]
                logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
                lls.append(sum(logp[len(full) - len(cont) - 1 + i, t].item() for i, t in enumerate(cont)))
            correct.append(float(int(lls[1] > lls[0]) == int(d["label"])))
    assert res["boolq"]["n"] == 6
    assert res["boolq"]["acc"] == pytest.approx(sum(correct) / 6)
    rows = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert len(rows) == 6 and all(r["task"] == "boolq" for r in rows)


def test_generation_stops_row_by_row(default_tokenizer):
    """A row is done once any stop string is in its generated text, whichever string it is; lm-eval's own
    criteria wait until every row holds the same string, so a batch with one row ended by EOS and one by "\n"
    kept decoding to max_gen_toks."""
    from lm_eval.models.utils_hf import stop_sequences_criteria

    from hybridprune.evaluation.tasks import _StopPerRow
    tok = default_tokenizer
    stops = ["\n", tok.eos_token]
    ctx, word, other = tok.encode("Answer:")[-1], tok.encode(" Paris")[0], tok.encode(" Rome")[0]
    newline = tok.encode("\n", add_special_tokens=False)[0]
    ids = torch.tensor([[newline, word, other],          # a newline in the prompt does not count
                        [ctx, word, tok.eos_token_id],
                        [ctx, word, newline]])
    stop = _StopPerRow(tok, stops, start=1, rows=3)
    assert stop(ids, None).tolist() == [False, True, True]
    assert not any(c(ids, None) for c in stop_sequences_criteria(tok, stops, 1, 3))
    later = torch.tensor([[word, word, newline], [word, word, word], [word, word, word]])
    assert stop(torch.cat([ids, later], 1), None).tolist() == [True, True, True]  # out of sight, still done


def test_fast_generation_equals_lm_evals_own_batching(tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    """Greedy generation with the static cache, its own batch width, length buckets and row-by-row stopping gives
    lm-eval's plain HFLM outputs; every batch holds prompts of alike length (at least SAME_LENGTH of its longest),
    and a batch whose rows all stopped ends before max_gen_toks. The gold answers' log-likelihoods come from the
    generation's own prefill (no second pass over any prompt) and equal lm-eval's."""
    from lm_eval.models.huggingface import HFLM
    from transformers import StaticCache

    from hybridprune import load_model
    from hybridprune.evaluation import ppl as evaluate
    from hybridprune.evaluation import tasks
    model, tok = load_model(str(tiny_llama_dir))
    newline = tok.encode("\n", add_special_tokens=False)[0]
    with torch.no_grad():  # the random model then writes "\n" often, at different steps in different rows
        model.get_output_embeddings().weight[newline] *= 3
    batches, caches, generated = [], [], []
    plain_generate_until, plain_generate = HFLM.generate_until, model.generate

    def spy_batches(self, requests, disable_tqdm=False):
        batches.append([len(self.tok_encode(r.args[0])) for r in requests])
        return plain_generate_until(self, requests, disable_tqdm)

    def spy_generate(*args, **kwargs):
        cache = kwargs.get("past_key_values")
        caches.append("prefilled" if isinstance(cache, StaticCache) else kwargs.get("cache_implementation"))
        out = plain_generate(*args, **kwargs)
        generated.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out
    monkeypatch.setattr(HFLM, "generate_until", spy_batches)
    monkeypatch.setattr(model, "generate", spy_generate)
    passes = []  # forward passes over whole prompts that extend no KV cache: what the gold scores would cost
    plain_hidden = evaluate.OutputHead.hidden

    def spy_hidden(self, input_ids, attention_mask=None, **cache):
        passes.append(("past_key_values" in cache, tuple(input_ids.shape)))
        return plain_hidden(self, input_ids, attention_mask, **cache)
    monkeypatch.setattr(evaluate.OutputHead, "hidden", spy_hidden)

    def outputs(path):
        return [json.loads(line)["output"] for line in path.read_text().splitlines()]
    fast = tasks.evaluate_model(model, tok, ["squad"], limit=12, batch_size=2, generate_batch_size=4,
                                samples_path=tmp_path / "fast.jsonl")
    fast_batches, fast_caches, fast_generated, fast_passes = list(batches), list(caches), list(generated), list(passes)
    batches.clear(), caches.clear(), generated.clear()
    monkeypatch.setattr(tasks, "_lm_class", lambda: HFLM)
    plain = tasks.evaluate_model(model, tok, ["squad"], limit=12, batch_size=2, samples_path=tmp_path / "plain.jsonl")
    assert outputs(tmp_path / "fast.jsonl") == outputs(tmp_path / "plain.jsonl")
    fast_ex, plain_ex = fast["squad"]["per_example"], plain["squad"]["per_example"]
    assert {k: v for k, v in fast_ex.items() if k != "gold_nll"} == {k: v for k, v in plain_ex.items() if k != "gold_nll"}
    # gold_nll: log-likelihoods from the continuation's positions, reduced in float64 (lm-eval: float32)
    assert fast_ex["gold_nll"] == pytest.approx(plain_ex["gold_nll"], rel=1e-6)
    assert len(fast_batches) > 1 and sum(map(len, fast_batches)) == 12
    assert all(len(b) <= 4 and min(b) >= tasks.SAME_LENGTH * max(b) for b in fast_batches), fast_batches
    assert set(fast_caches) == {"prefilled"} and set(caches) == {None}
    # every pass extended a generation's cache, but OutputHead's one check of its split on a few tokens
    assert [shape for cached, shape in fast_passes if not cached] == [(1, 8)], fast_passes
    answers = [o[0][0] for o in outputs(tmp_path / "fast.jsonl")]
    assert len({len(a) for a in answers}) > 1, answers  # rows stopped at different steps
    assert min(fast_generated) < 32, fast_generated  # ... and a batch ended once all its rows had


def _lm_eval_task(cfg: dict):
    from lm_eval.tasks import get_task_dict
    task = next(iter(get_task_dict([{k: v for k, v in cfg.items() if not k.startswith("_")}]).values()))
    return task


def _contexts(task, seed, limit):
    task.set_fewshot_seed(seed)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [inst.arguments[0] for inst in task.instances]


def test_gsm8k_prompts_equal_stock_lm_eval_at_the_default_seed(data_dir):
    """Our GSM8K task against lm-eval's own gsm8k.yaml (only the data files pointed at the local copy)."""
    import lm_eval

    from hybridprune.evaluation.tasks import LM_EVAL_FEWSHOT_SEED, task_config
    stock = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/gsm8k/gsm8k.yaml").read_text())
    stock.pop("tag", None)
    stock.update(task="stock_gsm8k", dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": {
        "train": str(data_dir / "gsm8k/train.jsonl"), "test": str(data_dir / "gsm8k/test.jsonl")}})
    ours = _contexts(_lm_eval_task(task_config("gsm8k", data_dir)), LM_EVAL_FEWSHOT_SEED, 8)
    theirs = _contexts(_lm_eval_task(stock), 1234, 8)
    assert LM_EVAL_FEWSHOT_SEED == 1234 and ours == theirs and ours[0].count("Question:") == 6


def test_eval_default_fewshot_seed_is_lm_evals(monkeypatch, data_dir):
    import lm_eval

    from hybridprune.cli import build_parser
    from hybridprune.evaluation.tasks import evaluate_model
    args = build_parser().parse_args(["eval", "default"])
    assert args.fewshot_seed == 1234 and args.seed == 0
    seen = {}

    def spy(**kw):  # what lm-eval is asked to do; stop there
        seen.update(kw)
        raise KeyboardInterrupt
    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(tiny_model("llama"), tiny_tokenizer(False), ["gsm8k"], seed=0, data_dir_path=data_dir)
    assert seen["fewshot_random_seed"] == 1234 and seen["random_seed"] == 0


def test_fewshot_exemplars_come_from_training_data(data_dir):
    from hybridprune.evaluation.tasks import task_config
    from hybridprune.io.data import boolq_examples, squad_examples
    val_passages = {r["passage"] for r in boolq_examples("validation", data_dir)}
    task = _lm_eval_task(task_config("boolq", data_dir, num_fewshot=2))
    for ctx in _contexts(task, 1234, 3):
        *shots, query = ctx.split("\n\n")  # lm-eval joins exemplars and the query with a blank line
        assert len(shots) == 2 and query.split("\nQuestion:")[0] in val_passages  # the query is a validation doc
        assert not any(s.split("\nQuestion:")[0] in val_passages for s in shots)  # its exemplars are not
    fit_contexts = {r["context"] for r in squad_examples("fit", data_dir)}
    task = _lm_eval_task(task_config("squad", data_dir, num_fewshot=1))
    ctx = _contexts(task, 1234, 1)[0]
    exemplar, query = (part.split("\n\nQuestion:")[0] for part in ctx.split("Background: ")[1:3])
    eval_contexts = {d["context"] for d in task.eval_docs}
    assert exemplar in fit_contexts and exemplar not in eval_contexts and query in eval_contexts


def test_fewshot_without_a_training_split_is_refused(tmp_path, data_dir):
    from hybridprune.evaluation.tasks import task_config
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "superglue_val.jsonl").write_text((data_dir / "boolq/superglue_val.jsonl").read_text())
    assert task_config("boolq", tmp_path)["num_fewshot"] == 0  # zero-shot needs no training split
    with pytest.raises(HybridPruneError, match="--num-fewshot 2 needs a boolq training split"):
        task_config("boolq", tmp_path, num_fewshot=2)


@pytest.mark.parametrize("data", ["squad", "boolq", "gsm8k"])
def test_simple_template_trains_exactly_the_eval_prompt(data, default_tokenizer, data_dir):
    """Byte for byte up to the answer; the answer follows lm-eval's target delimiter (one space)."""
    from hybridprune.evaluation.tasks import task_config
    from hybridprune.finetuning.finetune import _records
    from hybridprune.io.data import boolq_examples, gsm8k_examples, squad_examples
    task = _lm_eval_task(task_config(data, data_dir))
    docs = {"squad": lambda: squad_examples("fit", data_dir),
            "boolq": lambda: [{**r, "label": int(r["label"])} for r in boolq_examples("train", data_dir)],
            "gsm8k": lambda: gsm8k_examples("train", data_dir)}[data]()[:3]
    for doc, record in zip(docs, _records(data, data_dir)[:3]):
        prompt, answer = render(data, "simple", record, default_tokenizer)
        assert prompt == task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        gold = task.doc_to_choice(doc)[target] if data == "boolq" else target
        assert answer == task.config.target_delimiter + gold


def test_spread_sample_covers_the_articles(data_dir):
    from hybridprune.evaluation.tasks import (
        PER_CLUSTER,
        cluster_ids,
        spread_sample,
        task_rows,
    )
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

    from hybridprune.evaluation.tasks import (
        cluster_ids,
        evaluate_model,
        spread_sample,
        task_rows,
    )
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


@pytest.mark.parametrize("task", ["squad", "gsm8k"])
def test_gold_only_evaluation_scores_the_same_gold_nll_without_answers(task, tiny_llama_dir, data_dir, tmp_path):
    """generate=False reports the gold answer's NLL, example for example as the full evaluation does, and no
    accuracy (nothing was generated to score)."""
    from hybridprune import load_model
    from hybridprune.evaluation.tasks import evaluate_model
    model, tok = load_model(str(tiny_llama_dir))
    kw = dict(limit=3, batch_size=2, num_fewshot=0)
    full = evaluate_model(model, tok, [task], **kw)[task]
    gold = evaluate_model(model, tok, [task], generate=False, samples_path=tmp_path / "s.jsonl", **kw)[task]
    answers = [json.loads(line)["output"][0][0] for line in open(tmp_path / "s.jsonl")]
    assert answers and all(len(tok(a, add_special_tokens=False)["input_ids"]) <= 1 for a in answers)
    assert gold["per_example"]["gold_nll"] == pytest.approx(full["per_example"]["gold_nll"], rel=1e-5)
    assert gold["gold_nll"] == pytest.approx(full["gold_nll"], rel=1e-5)
    assert not any(k.startswith(("exact_match", "f1")) for k in gold) and set(gold["per_example"]) == {"gold_nll"}
    assert "gold NLL only" in gold["mode"] and any(k.startswith("exact_match") for k in full)
