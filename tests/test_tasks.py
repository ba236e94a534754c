import json

import pytest
import torch

from hybridprune.core.errors import HybridPruneError
from hybridprune.evaluation.tasks import normalize_answer, parse_tasks, squad_f1, squad_scores, task_config


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
    from hybridprune.io.data import boolq_examples
    from hybridprune.evaluation.tasks import evaluate_model
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
