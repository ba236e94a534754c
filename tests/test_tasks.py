import json

import pytest
import torch

from hybridprune.errors import HybridPruneError
from hybridprune.tasks import normalize_answer, parse_tasks, squad_f1, squad_scores, task_config


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
    from hybridprune.data import squad_examples
    cfg = task_config("squad")
    path = cfg["dataset_kwargs"]["data_files"]["test"]
    ids = {json.loads(line)["id"] for line in open(path)}
    assert ids == {r["id"] for r in squad_examples("eval", data_dir)}
    assert not ids & {r["id"] for r in squad_examples("fit", data_dir)}


def test_boolq_equals_direct_loglikelihood(tiny_llama_dir, data_dir, tmp_path):
    """lm-eval's BoolQ accuracy on a tiny random model equals choosing ' no'/' yes' by our own log-likelihood."""
    from hybridprune import load_model
    from hybridprune.data import boolq_examples
    from hybridprune.tasks import evaluate_model
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
